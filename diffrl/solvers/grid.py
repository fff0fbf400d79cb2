"""DDIM on an explicit time grid whose last step lands on the data (t = 0): the sampler of distilled students.

A student distilled to ``n`` network calls is exact only on the grid it was trained on, so that grid travels with
it (``times``, plain floats in the policy file). Without ``times`` the grid is ``t_max (n - i) / n`` for
i = 0..n-1, uniform in t down to the data; halving it keeps every other point, so a student with n calls covers
two steps of a 2n-call teacher per step (progressive distillation). On the linear (rectified-flow) path each DDIM
step is an exact Euler step along the predicted velocity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffrl.schedules import NoiseSchedule
from diffrl.solvers.ddim import DDIM


def uniform_to_data(schedule: NoiseSchedule, steps: int) -> Tensor:
    """``steps`` times ``t_max (steps - i) / steps`` (float64); the sampler's last step goes on to t = 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return schedule.t_max * torch.arange(steps, 0, -1, dtype=torch.float64) / steps


def explicit_times(times: Sequence[float], steps: int, what: str) -> Tensor:
    """``times`` as a float64 grid, checked to hold ``steps`` strictly decreasing positive values."""
    grid = torch.as_tensor([float(t) for t in times], dtype=torch.float64)
    if len(grid) != steps:
        raise ValueError(f"{what} was given {len(grid)} times but runs {steps} steps; pass steps={len(grid)}")
    if not bool((grid > 0).all()) or not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(f"{what} times must be positive and strictly decreasing, got {grid.tolist()}")
    return grid


class GridDDIM(DDIM):
    """Deterministic DDIM evaluated at ``times`` (default :func:`uniform_to_data`); one network call per time."""

    name = "ddim-grid"

    def __init__(self, times: Sequence[float] | None = None):
        super().__init__(eta=0.0)
        self.times = None if times is None else [float(t) for t in times]

    def timesteps(self, model, steps: int) -> Tensor:
        if self.times is None:
            return uniform_to_data(model.schedule, steps)
        return explicit_times(self.times, steps, "ddim-grid")

    def __repr__(self) -> str:
        return f"GridDDIM(times={self.times})"
