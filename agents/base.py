"""What every agent shares about placement: one device and dtype for its modules, learners, normalisers and
constant tensors, and the training precision of its learners."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffrl.device import module_device, module_dtype, resolve_device
from diffrl.training import Learner


def _members(value: Any) -> list[Any]:
    """``value`` itself, or the items of a dict / list / tuple attribute (one level)."""
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


class TorchAgent:
    """Mixin: ``to(device, dtype)`` moves everything an agent holds; ``device`` / ``dtype`` report where it is.

    Modules (EMA copies and target networks included, as they are modules or live in a Learner), optimiser state,
    normalisers (anything with a ``to(device, dtype)`` returning a moved copy) and tensor attributes follow.
    Call it before training starts; the agent's policy and sampler then follow its device.

    ``presets`` maps task names to :class:`agents.presets.Preset` rows (the CLI applies the dataset's row);
    ``default_batch_size`` is the paper's batch size, the run's default.
    """

    presets: dict[str, Any] = {}
    default_batch_size: int = 256

    def _placed(self) -> tuple[list[nn.Module], list[Learner]]:
        modules: dict[int, nn.Module] = {}
        learners: dict[int, Learner] = {}
        for value in vars(self).values():
            for item in _members(value):
                if isinstance(item, nn.Module):
                    modules[id(item)] = item
                elif isinstance(item, Learner):
                    learners[id(item)] = item
        return list(modules.values()), list(learners.values())

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TorchAgent:
        """Move the agent to ``device`` (auto, cpu, cuda, cuda:N) and/or floating ``dtype``; returns the agent."""
        device = resolve_device(device) if device is not None else None
        modules, learners = self._placed()
        for module in modules:
            module.to(device=device, dtype=dtype)
        for learner in learners:
            learner.to(device, dtype)
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device=device, dtype=dtype if value.is_floating_point() else None))
            elif hasattr(value, "to") and hasattr(value, "normalize"):
                setattr(self, name, value.to(device, dtype))
        return self

    @property
    def device(self) -> torch.device:
        modules, _ = self._placed()
        return module_device(modules[0]) if modules else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        modules, _ = self._placed()
        return module_dtype(modules[0]) if modules else torch.float32

    def set_precision(self, precision: str) -> None:
        """Training precision (fp32, bf16, fp16) of every learner: fp16 scales the losses with a GradScaler."""
        for learner in self._placed()[1]:
            learner.set_precision(precision)
