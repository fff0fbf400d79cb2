"""Explicit ODE solvers on the probability-flow ODE dx/dt = alpha'(t) x0 + sigma'(t) eps.

For flow-matching paths this is the learned velocity field; for diffusion processes it is the probability-flow ODE
f x - g^2/2 score written through (x0, eps), so one Euler/Heun implementation serves both.
"""

from __future__ import annotations

from torch import Tensor

from diffrl.schedules import expand_like
from diffrl.solvers.base import AffineStep, Solver


def velocity(model, x: Tensor, t: Tensor, cond, guidance) -> Tensor:
    """dx/dt at (x, t) from the model's guided (x0, eps)."""
    x0, eps = model.denoise(x, t, cond, guidance)
    da, ds = model.schedule.derivatives(t)
    return expand_like(da, x) * x0 + expand_like(ds, x) * eps


class Euler(Solver):
    """Forward Euler in t."""

    name = "euler"

    def step(self, model, x, t, s, cond, guidance, generator, state):
        return x + expand_like(s - t, x) * velocity(model, x, t, cond, guidance)

    def affine_step(self, model, grid, i):
        dt = float(grid[i + 1] - grid[i])
        da, ds = model.schedule.derivatives(grid[i])
        return AffineStep(x=1.0, eps=dt * float(ds), x0=(dt * float(da),))


class Heun(Solver):
    """Heun's second-order method (explicit trapezoid), two network calls per interval."""

    name = "heun"
    calls_per_step = 2

    def step(self, model, x, t, s, cond, guidance, generator, state):
        dt = expand_like(s - t, x)
        v_t = velocity(model, x, t, cond, guidance)
        v_s = velocity(model, x + dt * v_t, s, cond, guidance)
        return x + 0.5 * dt * (v_t + v_s)
