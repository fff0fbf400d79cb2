"""Optimisation building blocks (EMA, Learner) and the one training loop (Trainer) used by every agent.

A non-finite update (NaN or infinite gradient norm) is never applied: the Learner skips it on the device, without
reading anything back, and counts it. The Trainer reads the count when it logs and before it checkpoints, and
then stops with a :class:`NonFiniteError` (``on_nonfinite="stop"``, the default) or logs how many updates it
skipped (``"skip"``); a checkpoint whose agent state holds NaN or infinity is never written.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffrl.checkpoint import (
    CheckpointError,
    atomic_open,
    load_checkpoint,
    nonfinite_tensors,
    remove_orphans,
    save_checkpoint,
)
from diffrl.device import autocast, check_precision, resolve_device
from diffrl.distributed import all_gather_object, all_reduce_mean, barrier, broadcast_tensors, rank, world_size
from diffrl.seeding import derive_seed, get_rng_state, preserved_rng_state, seed_everything, set_rng_state

LR_SCHEDULES = ("constant", "cosine", "linear")
NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient norm or parameter."""


class EMA:
    """Exponential moving average of a module's parameters, held in a frozen copy of the module.

    ``update()`` moves every parameter of the copy towards the source: ``ema <- decay * ema + (1 - decay) * p``;
    buffers (e.g. normalisation statistics) are copied as they are. With ``power`` set, the decay of update ``n``
    (0-based) warms up as in the EMAModel of Chi et al.'s diffusion_policy: 0 for ``n <= 1``, else
    ``min(decay, 1 - (1 + (n - 1) / inv_gamma) ** -power)``; without it every update uses ``decay``.
    """

    def __init__(self, module: nn.Module, decay: float, power: float | None = None, inv_gamma: float = 1.0) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        if (power is not None and not power > 0) or not inv_gamma > 0:
            raise ValueError(f"EMA warmup needs power > 0 and inv_gamma > 0, got {power}, {inv_gamma}")
        self.decay = float(decay)
        self.power, self.inv_gamma = power, float(inv_gamma)
        self.source = module
        self.module = copy.deepcopy(module).requires_grad_(False)
        for p in self.module.parameters():
            p.grad = None
        self._pair_up()
        self.num_updates = 0

    def _pair_up(self) -> None:
        self._pairs = (list(self.module.parameters()), list(self.source.parameters()))
        self._buffer_pairs = (list(self.module.buffers()), list(self.source.buffers()))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EMA:
        """Move the averaged copy to the source module's new place (call after moving the source)."""
        self.module.to(device=device, dtype=dtype)
        self._pair_up()  # moving replaces buffer tensors
        return self

    def decay_at(self, n: int) -> float:
        """The decay used by update number ``n`` (0-based)."""
        if self.power is None:
            return self.decay
        step = n - 1
        return 0.0 if step <= 0 else min(self.decay, 1.0 - (1.0 + step / self.inv_gamma) ** -self.power)

    @torch.no_grad()
    def update(self) -> None:
        """One averaging step towards the source module's current parameters."""
        ema_params, params = self._pairs
        if ema_params:
            torch._foreach_lerp_(ema_params, params, 1.0 - self.decay_at(self.num_updates))
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

    An update whose gradient norm is NaN or infinite is skipped: parameters and optimiser moments stay as they
    were (the update count, the LR schedule and the EMA, which averages towards the unchanged parameters, go on).
    With the fused AdamW on float32 parameters the skip is decided on the device; otherwise it costs one read of
    a flag. ``nonfinite_updates`` (a device tensor) counts the updates with a non-finite loss or gradient norm,
    for the Trainer to read.

    The learning rate of update ``s`` (0-based) is ``lr * warmup(s) * decay(s)``: linear warmup
    ``(s + 1) / warmup_steps`` over the first ``warmup_steps`` updates, then for "cosine" / "linear" a decay
    from 1 to 0 over the remaining ``total_steps - warmup_steps`` updates; with ``restart_every`` the schedule
    starts again every ``restart_every`` updates (update ``s`` uses ``s % restart_every``). The EMA copies the
    parameters for the first ``ema_start`` updates and averages every ``ema_update_every`` updates afterwards, with the
    decay ``ema_decay`` or, given ``ema_power``, warmed up to it (see :class:`EMA`).
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
        ema_power: float | None = None,
        ema_inv_gamma: float = 1.0,
        restart_every: int | None = None,
    ) -> None:
        module = module_or_params if isinstance(module_or_params, nn.Module) else None
        params = module.parameters() if module is not None else module_or_params
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("Learner needs at least one parameter that requires grad")
        settings = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "max_grad_norm": max_grad_norm,
                    "ema_decay": ema_decay}
        for name, value in settings.items():
            if value is not None and not all(math.isfinite(v) for v in (value if name == "betas" else (value,))):
                raise ValueError(f"{name} must be finite, got {value}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if lr_schedule != "constant" and total_steps is None:
            raise ValueError(f"lr_schedule={lr_schedule!r} needs total_steps, the schedule's horizon (diffrl train "
                             "sets it to the run's --steps when the config leaves it unset)")
        if lr_schedule != "constant" and total_steps <= warmup_steps:
            raise ValueError(
                f"lr_schedule={lr_schedule!r} needs total_steps > warmup_steps ({warmup_steps}), got {total_steps}"
            )
        if restart_every is not None and restart_every < 1:
            raise ValueError(f"restart_every must be >= 1 or None, got {restart_every}")
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
        self.restart_every = restart_every
        self.ema_update_every = ema_update_every
        self.ema_start = ema_start
        self.num_steps = 0
        broadcast_tensors(self.params)  # all ranks start from rank 0's initialisation
        self.optimizer = _make_adamw(self.params, lr=self.base_lr, betas=tuple(betas), weight_decay=weight_decay)
        self.ema = EMA(module, ema_decay, ema_power, ema_inv_gamma) if ema_decay is not None else None
        self.scaler: torch.amp.GradScaler | None = None
        self.nonfinite_updates = torch.zeros((), dtype=torch.int64, device=self.params[0].device)

    @property
    def ema_module(self) -> nn.Module | None:
        """The averaged copy of the module, or the module itself when no EMA is kept."""
        return self.ema.module if self.ema is not None else self.module

    def lr_at(self, step: int) -> float:
        """Learning rate used by update number ``step`` (0-based)."""
        factor = 1.0
        if self.restart_every is not None:
            step %= self.restart_every
        if step < self.warmup_steps:
            factor = (step + 1) / self.warmup_steps
        if self.lr_schedule != "constant":
            progress = min(max((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 0.0), 1.0)
            factor *= 0.5 * (1.0 + math.cos(math.pi * progress)) if self.lr_schedule == "cosine" else 1.0 - progress
        return self.base_lr * factor

    def set_precision(self, precision: str) -> None:
        """Scale the loss with a GradScaler for ``fp16`` (bf16 and fp32 need none)."""
        device_type = self.params[0].device.type
        self.scaler = torch.amp.GradScaler(device_type) if check_precision(precision) == "fp16" else None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Learner:
        """Follow the parameters to a new device / dtype (call after moving the module): EMA and optimiser state."""
        if self.ema is not None:
            self.ema.to(device, dtype)
        if self.optimizer.state:  # torch's own load casts the moments to the parameters' device and dtype
            self.optimizer.load_state_dict(self.optimizer.state_dict())
        return self

    def step(self, loss: torch.Tensor) -> dict[str, Any]:
        """One gradient update on ``loss``; returns the pre-clipping gradient norm (a tensor, not read back to
        the host) and the learning rate used."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(loss.device.type, enabled=False):  # backward and the update outside autocast
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            grads = [p.grad for p in self.params if p.grad is not None]
            if not grads:
                raise RuntimeError("the loss does not depend on any parameter of this Learner")
            if world_size() > 1:
                flat = all_reduce_mean(torch._utils._flatten_dense_tensors(grads))
                torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            if self.max_grad_norm is not None:
                torch._foreach_mul_(grads, (self.max_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0))
            lr = self.lr_at(self.num_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            bad = ~torch.isfinite(loss.detach())
            if self.scaler is not None:  # the scaler skips overflowing steps itself; only the loss is counted
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                skip = ~torch.isfinite(grad_norm)  # the same on every rank: the gradients are averaged
                self._step_unless(skip)
                bad = bad | skip
            if self.nonfinite_updates.device != bad.device:  # the parameters moved since the last update
                self.nonfinite_updates = self.nonfinite_updates.to(bad.device)
            self.nonfinite_updates += bad
        self.num_steps += 1
        if self.ema is not None:
            if self.num_steps <= self.ema_start:
                self.ema.reset()
            elif self.num_steps % self.ema_update_every == 0:
                self.ema.update()
        return {"grad_norm": grad_norm.detach(), "lr": lr}

    def _step_unless(self, skip: torch.Tensor) -> None:
        """The optimiser step, left out where ``skip`` is true: on the device with the fused kernel (its
        ``found_inf`` input, float32 only), else after reading the flag."""
        if self.optimizer.defaults.get("fused") and self.params[0].dtype == torch.float32:
            self.optimizer.found_inf = skip.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not bool(skip):
            self.optimizer.step()

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "num_steps": self.num_steps,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "nonfinite_updates": self.nonfinite_updates.detach().clone(),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["ema"] is None) != (self.ema is None):
            have, got = ("an EMA", "none") if self.ema is not None else ("no EMA", "one")
            raise ValueError(f"this Learner keeps {have} but the saved state has {got}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_steps = int(state["num_steps"])
        if "nonfinite_updates" in state:  # absent from states saved before the count existed
            self.nonfinite_updates.copy_(state["nonfinite_updates"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def default_log_every(steps: int) -> int:
    """Updates between logged means for a run of ``steps`` updates: about 20 logs, at most every 1,000 updates."""
    return max(1, min(1000, steps // 20))


@dataclass
class TrainConfig:
    """Length, batching, seeding and the logging / evaluation / checkpoint cadence of a training run.

    ``eval_every`` and ``checkpoint_every`` of 0 disable evaluation and checkpoints; logs and evaluations
    happen at multiples of their period, checkpoints at multiples of theirs and after the last step. ``log_every``
    left None becomes :func:`default_log_every` of ``steps`` (about 20 logs per run, at most every 1,000 updates).
    ``progress`` shows a bar on a terminal and a line every 5% of the run when stderr is a file or pipe.
    ``run_dir`` receives ``tb/`` (TensorBoard), ``eval.csv``, ``eval.json`` and ``checkpoints/``.
    ``device`` (auto, cpu, cuda, cuda:N) is where the batch generator lives (the agent and the data must be
    there too); ``precision`` (fp32, bf16, fp16) is the compute type of the updates. ``on_nonfinite`` says what
    a NaN / infinite loss or gradient norm does: ``stop`` raises :class:`NonFiniteError` at the next log or
    checkpoint (the last checkpoint written stays the last good one), ``skip`` leaves such updates out and logs
    their number as ``train/skipped_updates``.
    """

    steps: int = 100_000
    batch_size: int = 256
    seed: int = 0
    log_every: int | None = None
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    progress: bool = True
    run_dir: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    on_nonfinite: str = "stop"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.log_every is None:
            self.log_every = default_log_every(self.steps)
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"TrainConfig.on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, "
                             f"got {self.on_nonfinite!r}")
        positive = {"batch_size": self.batch_size, "log_every": self.log_every,
                    "keep_checkpoints": self.keep_checkpoints}
        non_negative = {"steps": self.steps, "seed": self.seed, "eval_every": self.eval_every,
                        "checkpoint_every": self.checkpoint_every}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {value}")
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {value}")
        if self.checkpoint_every and self.run_dir is None:
            raise ValueError("TrainConfig.checkpoint_every needs a run_dir to write checkpoints to")


class LineProgress:
    """Progress for a log file (the bar's stream is not a terminal): one line every ``percent`` % of the run
    instead of a bar redrawn with carriage returns. Same calls as the tqdm bar the Trainer uses otherwise."""

    def __init__(self, total: int, initial: int = 0, percent: float = 5.0, desc: str = "train") -> None:
        self.total, self.n, self.desc = total, initial, desc
        self.every = max(1, math.ceil(total * percent / 100))
        self.postfix: dict[str, str] = {}
        self._clock = (time.perf_counter(), initial)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            now = time.perf_counter()
            rate = (self.n - self._clock[1]) / max(now - self._clock[0], 1e-9)
            self._clock = (now, self.n)
            values = "".join(f", {k} {v}" for k, v in self.postfix.items())
            print(f"{self.desc}: step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%), "
                  f"{rate:.1f} steps/s{values}", file=sys.stderr, flush=True)

    def set_postfix(self, values: dict[str, str], refresh: bool = False) -> None:
        self.postfix = dict(values)

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """:class:`LineProgress` lines when enabled and stderr is a file or pipe, else a tqdm bar (showing nothing
    when disabled)."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(total, initial)
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="train")


def agent_kind(agent: Any) -> str:
    """The name stored in an agent's checkpoints: its ``kind`` attribute, else its class name."""
    return getattr(agent, "kind", None) or type(agent).__name__


def learners_of(agent: Any) -> list[Learner]:
    """The Learners an agent holds as attributes (or in a dict / list / tuple attribute)."""
    found: dict[int, Learner] = {}
    for value in getattr(agent, "__dict__", {}).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else [value]
        found.update((id(item), item) for item in items if isinstance(item, Learner))
    return list(found.values())


def _step_of(path: Path) -> int:
    return int(path.stem.split("_")[1])


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


class Trainer:
    """The training loop shared by all agents: ``batch = sample_batch(batch_size, generator)``, then
    ``agent.update(batch)``, with logging, evaluation and checkpoints on rank 0.

    The batch generator is owned by the trainer and seeded from ``(config.seed, rank)``; the global RNGs are
    seeded from the same pair when a fresh run starts. A checkpoint holds the agent, the step, the history,
    and every rank's batch-generator and global RNG states, so a resumed run takes exactly the steps the
    uninterrupted run would have taken. Evaluation runs with the global RNG states saved and restored, so
    how often one evaluates does not change training; ``evaluate(agent, step)`` returns a dict of numbers and
    must leave the agent as it found it. Temporary files of writes cut short by a killed process are removed
    when ``fit`` starts.
    """

    def __init__(
        self,
        agent: Any,
        sample_batch: Callable[[int, torch.Generator], dict[str, torch.Tensor]],
        config: TrainConfig,
        evaluate: Callable[[Any, int], dict[str, float]] | None = None,
    ) -> None:
        self.agent = agent
        self.sample_batch = sample_batch
        self.config = config
        self.evaluate = evaluate
        self.rank, self.world_size = rank(), world_size()
        self.is_main = self.rank == 0
        self.run_dir = Path(config.run_dir) if config.run_dir is not None else None
        self.device = resolve_device(config.device)
        self.generator = torch.Generator(self.device).manual_seed(derive_seed(config.seed, self.rank, 0))
        if hasattr(agent, "set_precision"):
            agent.set_precision(config.precision)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.evaluations: list[dict[str, float]] = []
        self._sums: dict[str, Any] = {}  # floats or (device) tensors, read back every log_every steps
        self._count = 0
        self._started = False
        self._learners = learners_of(agent)
        self._last_checkpoint: Path | None = None

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.run_dir / "checkpoints" if self.run_dir is not None else None

    def fit(self, resume: bool = False) -> list[dict[str, float]]:
        """Train up to ``config.steps`` updates and return the history of logged means and evaluations.

        With ``resume=True`` the run continues from its newest valid checkpoint when it has one and starts
        afresh when it has none. History records are ``{"step": s, "train/<metric>": mean, ...}`` and
        ``{"step": s, "eval/<metric>": value, ...}``; non-main ranks return an empty history.
        """
        cfg = self.config
        if self.is_main and self.run_dir is not None:
            for folder in (self.run_dir, self.checkpoint_dir):
                if folder.is_dir():
                    remove_orphans(folder)
        if resume and not self._started and self.checkpoint_dir and self._checkpoint_files(self.checkpoint_dir):
            self.resume()
        if not self._started:
            seed_everything(derive_seed(cfg.seed, self.rank, 1))
            self._started = True
        writer = self._open_writer() if self.is_main and self.run_dir is not None else None
        bar = progress_bar(cfg.steps, self.step, enabled=cfg.progress and self.is_main)
        clock = (time.perf_counter(), self.step)
        try:
            while self.step < cfg.steps:
                batch = self.sample_batch(cfg.batch_size, self.generator)
                with autocast(self.device, cfg.precision):
                    metrics = self.agent.update(batch)
                self.step += 1
                for key, value in metrics.items():
                    value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
                    self._sums[key] = self._sums.get(key, 0.0) + value
                self._count += 1
                bar.update()
                if self.step % cfg.log_every == 0:
                    clock = self._log(writer, bar, clock)
                if self.evaluate is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    self._evaluate(writer)
                if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                    self.save_checkpoint()
            self._check_finite()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return self.history

    def _open_writer(self):
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

        return SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=self.step + 1 if self.step else None)

    def _check_finite(self, means: dict[str, float] | None = None) -> int:
        """The number of non-finite updates counted since the last call with ``means`` (which also resets the
        counts); raises NonFiniteError in ``stop`` mode when there are any or a logged mean is not finite."""
        counts = [learner.nonfinite_updates for learner in self._learners]
        local = sum(int(c) for c in counts) if counts else 0
        if means is not None:
            for c in counts:
                c.zero_()
        bad_means = [k for k, v in (means or {}).items() if not math.isfinite(v)]
        gathered = all_gather_object((local, bad_means))  # every rank takes the same decision
        total = sum(n for n, _ in gathered)
        bad_means = sorted({k for _, keys in gathered for k in keys})
        if self.config.on_nonfinite == "stop" and (total or bad_means):
            what = f"{total} update(s) with a non-finite loss or gradient norm" if total else \
                f"non-finite {', '.join(bad_means)}"
            last = self._last_checkpoint or "none written"
            raise NonFiniteError(f"training stopped at step {self.step}: {what} (NaN/inf); the last good checkpoint "
                                 f"is {last}; lower the learning rate, or set on_nonfinite='skip' (diffrl train "
                                 "--on-nonfinite skip) to leave such updates out")
        return total

    def _log(self, writer, bar, clock: tuple[float, int]) -> tuple[float, int]:
        means = {f"train/{k}": float(v) / self._count for k, v in self._sums.items()}
        self._sums, self._count = {}, 0
        skipped = self._check_finite(means)
        if skipped:
            means["train/skipped_updates"] = float(skipped)
            tqdm.write(f"step {self.step}: skipped {skipped} update(s) with a non-finite loss or gradient norm",
                       file=sys.stderr)
        now = time.perf_counter()
        if self.is_main:
            self.history.append({"step": self.step, **means})
            steps_per_sec = (self.step - clock[1]) / max(now - clock[0], 1e-9)
            if writer is not None:
                for key, value in means.items():
                    writer.add_scalar(key, value, self.step)
                writer.add_scalar("time/steps_per_sec", steps_per_sec, self.step)
            bar.set_postfix({k.removeprefix("train/"): f"{v:.4g}" for k, v in means.items()}, refresh=False)
        return now, self.step

    def _evaluate(self, writer) -> None:
        if not self.is_main:
            return
        with preserved_rng_state():
            results = self.evaluate(self.agent, self.step)
        try:
            results = {str(k): float(v) for k, v in results.items()}
        except (TypeError, ValueError) as e:
            raise TypeError(f"evaluate() must return a dict of numbers, got {results!r}") from e
        self.evaluations.append({"step": self.step, **results})
        self.history.append({"step": self.step, **{f"eval/{k}": v for k, v in results.items()}})
        if self.run_dir is not None:
            for key, value in results.items():
                writer.add_scalar(f"eval/{key}", value, self.step)
            writer.flush()
            self._write_eval_files()

    def _write_eval_files(self) -> None:
        fields = list(dict.fromkeys(k for record in self.evaluations for k in record))
        text = io.StringIO()
        table = csv.DictWriter(text, fieldnames=fields, restval="", lineterminator="\n")
        table.writeheader()
        table.writerows(self.evaluations)
        with atomic_open(self.run_dir / "eval.csv", "w") as f:
            f.write(text.getvalue())
        with atomic_open(self.run_dir / "eval.json", "w") as f:
            json.dump(self.evaluations, f, indent=1)

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step_XXXXXXX.pt`` and point ``latest.pt`` at it; keep the newest
        ``keep_checkpoints`` step files.

        Every rank must call it (their RNG states are gathered into the file); rank 0 writes and returns the
        path, the others return None once the file is complete. In ``stop`` mode a non-finite update since the
        last check raises NonFiniteError first; an agent state holding NaN or infinity is never saved.
        """
        if self.checkpoint_dir is None:
            raise ValueError("cannot save a checkpoint: TrainConfig.run_dir is not set")
        self._check_finite()
        state = self.agent.state_dict()
        bad = nonfinite_tensors(state)
        if bad:
            raise NonFiniteError(f"not saving the checkpoint of step {self.step}: the agent state holds NaN/inf in "
                                 f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; the last good checkpoint "
                                 f"is {self._last_checkpoint or 'none written'}")
        rng_states = all_gather_object({"global": get_rng_state(), "batches": self.generator.get_state()})
        if not self.is_main:
            barrier()
            return None
        payload = {
            "agent": state,
            "step": self.step,
            "rng": rng_states,
            "history": self.history,
            "evaluations": self.evaluations,
            "log_sums": {k: float(v) for k, v in self._sums.items()},
            "log_count": self._count,
            "config": asdict(self.config),
        }
        path = save_checkpoint(self.checkpoint_dir / f"step_{self.step:07d}.pt", payload, agent_kind(self.agent))
        self._point_latest_to(path)
        self._last_checkpoint = path
        old = sorted(self.checkpoint_dir.glob("step_*.pt"), key=_step_of)
        for stale in old[: -self.config.keep_checkpoints]:
            if stale != path:
                stale.unlink()
        barrier()
        return path

    def _point_latest_to(self, path: Path) -> None:
        """Atomically replace latest.pt by a hard link to ``path`` (a copy where links are unsupported)."""
        latest = path.with_name("latest.pt")
        tmp = path.with_name(".latest.pt.tmp")  # a name remove_orphans() clears after a kill
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:
            with open(path, "rb") as src, atomic_open(tmp) as dst:
                shutil.copyfileobj(src, dst)
        os.replace(tmp, latest)

    @staticmethod
    def _checkpoint_files(folder: Path) -> list[Path]:
        """Step files, newest first, then ``latest.pt`` (a link to the newest one written)."""
        steps = sorted(folder.glob("step_*.pt"), key=_step_of, reverse=True)
        return steps + [p for p in (folder / "latest.pt",) if p.is_file()]

    def _newest_valid(self, folder: Path) -> tuple[Path, dict]:
        """The newest checkpoint in ``folder`` that loads and passes its checksum, and its payload; damaged
        newer step files are renamed to ``*.damaged`` so that they neither shadow nor prune the new ones."""
        files = self._checkpoint_files(folder)
        if not files:
            raise FileNotFoundError(f"no checkpoint in {folder}")
        errors = []
        for path in files:
            try:
                payload = load_checkpoint(path, expected_kind=agent_kind(self.agent))
            except CheckpointError as err:
                errors.append((path, err))
                continue
            barrier()  # every rank has read its checkpoint before rank 0 renames anything
            for damaged, err in errors:
                if self.is_main:
                    tqdm.write(f"skipping a damaged checkpoint: {_one_line(err)}", file=sys.stderr)
                    if damaged.name != "latest.pt":
                        damaged.replace(damaged.with_name(damaged.name + ".damaged"))
            return path, payload
        raise CheckpointError(f"no usable checkpoint in {folder}: {_one_line(errors[0][1])}"
                              + (f" (and {len(errors) - 1} older file(s) unusable too)" if len(errors) > 1 else ""))

    def resume(self, run_dir: str | os.PathLike | None = None) -> int:
        """Load the newest valid checkpoint of ``<run_dir>/checkpoints`` (default: the config's run_dir); returns
        the step reached.

        Later logs and checkpoints still go to the config's run_dir.
        """
        source = Path(run_dir) if run_dir is not None else self.run_dir
        if source is None:
            raise ValueError("resume() needs a run_dir: none given and TrainConfig.run_dir is not set")
        path, payload = self._newest_valid(source / "checkpoints")
        if len(payload["rng"]) != self.world_size:
            raise ValueError(
                f"checkpoint was written by {len(payload['rng'])} processes; resume with the same number "
                f"(this run has {self.world_size})"
            )
        try:
            self.agent.load_state_dict(payload["agent"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{path} does not fit this agent (was its config changed?): {_one_line(err)}") \
                from err
        self._last_checkpoint = path
        self.step = payload["step"]
        self.history = payload["history"] if self.is_main else []
        self.evaluations = payload["evaluations"] if self.is_main else []
        self._sums, self._count = payload["log_sums"], payload["log_count"]
        states = payload["rng"][self.rank]
        set_rng_state(states["global"])
        self.generator.set_state(states["batches"])
        self._started = True
        return self.step
