"""Multistep consistency sampling (Song et al. 2023, Algorithm 1) for models with the ``consistency`` prediction.

At each time the consistency function maps x_t straight to the data, ``x0 = f(x_t, t)``; a further step re-noises
that estimate to the next, lower time, ``x_s = alpha_s x0 + sqrt(sigma_s^2 - alpha_s^2 s0^2) z`` (s0: the noise
level at t = 0, zero for VP processes and flows), and applies f again. One time gives the one-step sampler. The
update is affine in (x0, z), so unguided runs go through the precomputed :class:`~diffrl.solvers.SamplingPlan`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffrl.predictions import noise_level
from diffrl.schedules import NoiseSchedule, expand_like
from diffrl.solvers.base import AffineStep, Solver, coefs
from diffrl.solvers.grid import explicit_times


def karras_levels(s_max: float, s_min: float, points: int, rho: float = 7.0) -> Tensor:
    """``points`` noise levels from ``s_max`` down to ``s_min``, uniform in s^(1/rho) (Karras et al. 2022)."""
    u = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    return (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho


def times_of_levels(schedule: NoiseSchedule, levels: Tensor) -> Tensor:
    """The times at which x_t / alpha has noise levels ``levels`` (> 0)."""
    return schedule.t_from_log_snr(-2.0 * levels.log())


def karras_times(schedule: NoiseSchedule, points: int, s_min: float, rho: float = 7.0) -> Tensor:
    """``points`` times from ``t_max`` down to the time of noise level ``s_min`` on the Karras grid (float64)."""
    ends = noise_level(schedule, torch.tensor([schedule.t_max], dtype=torch.float64))
    grid = times_of_levels(schedule, karras_levels(float(ends[0]), s_min, points, rho))
    grid[0] = schedule.t_max
    return grid


class ConsistencySampler(Solver):
    """Evaluates the consistency function at ``times`` (default: the Karras grid of ``steps + 1`` levels from
    ``t_max`` to the data, without its last point), re-noising in between."""

    name = "consistency"

    def __init__(self, times: Sequence[float] | None = None, rho: float = 7.0):
        super().__init__()
        self.times = None if times is None else [float(t) for t in times]
        self.rho = rho

    def timesteps(self, model, steps: int) -> Tensor:
        if self.times is not None:
            return explicit_times(self.times, steps, "consistency")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        data_level = float(noise_level(model.schedule, torch.zeros((), dtype=torch.float64)))
        return karras_times(model.schedule, steps + 1, data_level, self.rho)[:-1]

    def _noise_coef(self, model, s: Tensor, like: Tensor) -> Tensor:
        a_s, sig_s = coefs(model, s, like)
        floor = a_s * expand_like(noise_level(model.schedule, torch.zeros_like(s)), like)
        return (sig_s * sig_s - floor * floor).clamp_min(0.0).sqrt()

    def step(self, model, x, t, s, cond, guidance, generator, state):
        x0, _ = model.denoise(x, t, cond, guidance)
        a_s, _ = coefs(model, s, x)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return a_s * x0 + self._noise_coef(model, s, x) * noise

    def affine_step(self, model, grid, i):
        s = grid[i + 1]
        return AffineStep(x=0.0, eps=0.0, x0=(float(model.schedule.alpha(s)),),
                          noise=float(self._noise_coef(model, s, s)))

    def __repr__(self) -> str:
        return f"ConsistencySampler(times={self.times}, rho={self.rho})"
