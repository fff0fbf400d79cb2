"""Optimisation building blocks (EMA, Learner) and the one training loop (Trainer) used by every agent."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import nn

from diffrl.distributed import all_reduce_mean, broadcast_tensors, world_size

LR_SCHEDULES = ("constant", "cosine", "linear")


class EMA:
    """Exponential moving average of a module's parameters, held in a frozen copy of the module.

    ``update()`` moves every parameter of the copy towards the source: ``ema <- decay * ema + (1 - decay) * p``;
    buffers (e.g. normalisation statistics) are copied as they are.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.source = module
        self.module = copy.deepcopy(module).requires_grad_(False)
        for p in self.module.parameters():
            p.grad = None
        self._pairs = (list(self.module.parameters()), list(module.parameters()))
        self._buffer_pairs = (list(self.module.buffers()), list(module.buffers()))
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One averaging step towards the source module's current parameters."""
        ema_params, params = self._pairs
        if ema_params:
            torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        self._copy_buffers()
        self.num_updates += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Set the average to the source module's current parameters."""
        ema_params, params = self._pairs
        if ema_params:
            torch._foreach_copy_(ema_params, params)
        self._copy_buffers()

    @torch.no_grad()
    def copy_to(self, module: nn.Module | None = None) -> None:
        """Write the averaged parameters and buffers into ``module`` (default: the source module)."""
        target = self.source if module is None else module
        target.load_state_dict(self.module.state_dict())

    def _copy_buffers(self) -> None:
        ema_bufs, bufs = self._buffer_pairs
        if ema_bufs:
            torch._foreach_copy_(ema_bufs, bufs)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["module"])


def _make_adamw(params: list[nn.Parameter], **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel where this torch build and device support it, else the foreach one."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


class Learner:
    """Optimisation of one module (or parameter list): AdamW, gradient clipping, LR schedule and EMA.

    ``step(loss)`` does one update: zero the gradients, backpropagate, average gradients over ranks when
    ``torch.distributed`` runs with several processes, clip to ``max_grad_norm``, set the scheduled learning
    rate, take the optimiser step and update the EMA. Agents hold one Learner per trained module.

    The learning rate of update ``s`` (0-based) is ``lr * warmup(s) * decay(s)``: linear warmup
    ``(s + 1) / warmup_steps`` over the first ``warmup_steps`` updates, then for "cosine" / "linear" a decay
    from 1 to 0 over the remaining ``total_steps - warmup_steps`` updates. The EMA copies the parameters
    for the first ``ema_start`` updates and averages every ``ema_update_every`` updates afterwards.
    ``state_dict`` holds the optimiser, the update count and the EMA, not the module's own parameters.
    """

    def __init__(
        self,
        module_or_params: nn.Module | Iterable[nn.Parameter],
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        max_grad_norm: float | None = None,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        ema_decay: float | None = None,
        ema_update_every: int = 1,
        ema_start: int = 0,
    ) -> None:
        module = module_or_params if isinstance(module_or_params, nn.Module) else None
        params = module.parameters() if module is not None else module_or_params
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("Learner needs at least one parameter that requires grad")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if lr_schedule != "constant" and (total_steps is None or total_steps <= warmup_steps):
            raise ValueError(
                f"lr_schedule={lr_schedule!r} needs total_steps > warmup_steps ({warmup_steps}), got {total_steps}"
            )
        if ema_decay is not None and module is None:
            raise ValueError("ema_decay needs an nn.Module, not a bare parameter list")
        if ema_update_every < 1 or ema_start < 0:
            raise ValueError(f"need ema_update_every >= 1 and ema_start >= 0, got {ema_update_every}, {ema_start}")

        self.module = module
        self.base_lr = float(lr)
        self.max_grad_norm = max_grad_norm
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.ema_update_every = ema_update_every
        self.ema_start = ema_start
        self.num_steps = 0
        broadcast_tensors(self.params)  # all ranks start from rank 0's initialisation
        self.optimizer = _make_adamw(self.params, lr=self.base_lr, betas=tuple(betas), weight_decay=weight_decay)
        self.ema = EMA(module, ema_decay) if ema_decay is not None else None

    @property
    def ema_module(self) -> nn.Module | None:
        """The averaged copy of the module, or the module itself when no EMA is kept."""
        return self.ema.module if self.ema is not None else self.module

    def lr_at(self, step: int) -> float:
        """Learning rate used by update number ``step`` (0-based)."""
        factor = 1.0
        if step < self.warmup_steps:
            factor = (step + 1) / self.warmup_steps
        if self.lr_schedule != "constant":
            progress = min(max((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 0.0), 1.0)
            factor *= 0.5 * (1.0 + math.cos(math.pi * progress)) if self.lr_schedule == "cosine" else 1.0 - progress
        return self.base_lr * factor

    def step(self, loss: torch.Tensor) -> dict[str, float]:
        """One gradient update on ``loss``; returns the pre-clipping gradient norm and the learning rate used."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            raise RuntimeError("the loss does not depend on any parameter of this Learner")
        if world_size() > 1:
            flat = all_reduce_mean(torch._utils._flatten_dense_tensors(grads))
            torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if self.max_grad_norm is not None:
            torch._foreach_mul_(grads, (self.max_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0))
        lr = self.lr_at(self.num_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.num_steps += 1
        if self.ema is not None:
            if self.num_steps <= self.ema_start:
                self.ema.reset()
            elif self.num_steps % self.ema_update_every == 0:
                self.ema.update()
        return {"grad_norm": grad_norm.item(), "lr": lr}

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "num_steps": self.num_steps,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["ema"] is None) != (self.ema is None):
            have, got = ("an EMA", "none") if self.ema is not None else ("no EMA", "one")
            raise ValueError(f"this Learner keeps {have} but the saved state has {got}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_steps = int(state["num_steps"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
