"""Euler-Maruyama on the reverse-time SDE dx = [f x - g^2 score] dt + g dw (Song et al. 2021)."""

from __future__ import annotations

import torch

from diffrl.schedules import expand_like
from diffrl.solvers.base import Solver, coefs


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
