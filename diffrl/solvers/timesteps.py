"""Time grids for samplers: ``steps`` points from ``t_max`` down to ``t_min`` (the final x0 prediction follows)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffrl.schedules import NoiseSchedule


def uniform_t(schedule: NoiseSchedule, steps: int) -> Tensor:
    """Equal spacing in t (with T steps on a T-step discrete chain this is exactly DDPM's grid)."""
    return torch.linspace(schedule.t_max, schedule.t_min, steps, dtype=torch.float64)


def uniform_log_snr(schedule: NoiseSchedule, steps: int) -> Tensor:
    """Equal spacing in log-SNR (DPM-Solver's recommended grid)."""
    ends = torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64)
    lam = schedule.log_snr(ends)
    return schedule.t_from_log_snr(torch.linspace(float(lam[0]), float(lam[1]), steps, dtype=torch.float64))


def quadratic_t(schedule: NoiseSchedule, steps: int) -> Tensor:
    """Equal spacing in sqrt(t): denser near the data."""
    u = torch.linspace(schedule.t_max**0.5, schedule.t_min**0.5, steps, dtype=torch.float64)
    return u * u


SPACINGS = {"uniform": uniform_t, "logsnr": uniform_log_snr, "quadratic": quadratic_t}


def make_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "uniform") -> Tensor:
    """A decreasing grid of ``steps`` times (float64) by spacing name."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    try:
        grid = SPACINGS[spacing](schedule, steps)
    except KeyError:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {sorted(SPACINGS)}") from None
    grid[0] = schedule.t_max  # remove round-off of the log-SNR inverse at the ends
    if steps > 1:
        grid[-1] = schedule.t_min
    return grid
