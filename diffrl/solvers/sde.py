"""Euler-Maruyama on the reverse-time SDE dx = [f x - g^2 score] dt + g dw (Song et al. 2021)."""

from __future__ import annotations

import torch

from diffrl.schedules import expand_like
from diffrl.solvers.base import AffineStep, Solver, coefs


class EulerMaruyama(Solver):
    """Stochastic sampler: one Euler-Maruyama step of the reverse SDE per interval."""

    name = "euler-maruyama"

    def step(self, model, x, t, s, cond, guidance, generator, state):
        _, eps = model.denoise(x, t, cond, guidance)
        _, sigma = coefs(model, t, x)
        f = expand_like(model.schedule.drift_coef(t), x)
        g = expand_like(model.schedule.diffusion_coef(t), x)
        dt = expand_like(s - t, x)  # negative
        score = -eps / sigma
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + (f * x - g * g * score) * dt + g * (-dt).sqrt() * noise

    def affine_step(self, model, grid, i):
        t, dt = grid[i], float(grid[i + 1] - grid[i])
        f, g, sigma = (float(v) for v in (model.schedule.drift_coef(t), model.schedule.diffusion_coef(t),
                                          model.schedule.sigma(t)))
        return AffineStep(x=1.0 + f * dt, eps=g * g * dt / sigma, x0=(0.0,), noise=g * (-dt) ** 0.5)
