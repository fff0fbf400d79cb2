"""Input shape checks for the backbones (skipped while tracing, where shapes are fixed by the example)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_shape(x: Tensor, shape: tuple[int | None, ...], name: str) -> None:
    """Raise ValueError unless ``x.shape`` matches ``shape``; ``None`` entries match any size."""
    if torch.jit.is_tracing():
        return
    if x.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape, strict=True)):
        expected = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape ({expected}), got {tuple(x.shape)}")
