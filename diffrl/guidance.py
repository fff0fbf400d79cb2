"""Guidance hooks that every solver calls at each step.

A guidance object may change the model's (x0, eps) estimate at (x_t, t) through ``apply`` and may overwrite entries
of the sample after each solver update through ``project``. Several hooks compose in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffrl.schedules import expand_like

if TYPE_CHECKING:
    from diffrl.model import DiffusionModel


class Guidance:
    """Base hook: leaves the estimate and the sample unchanged."""

    def apply(self, model: DiffusionModel, x: Tensor, t: Tensor, cond, x0: Tensor,
              eps: Tensor) -> tuple[Tensor, Tensor]:
        return x0, eps

    def project(self, x: Tensor, t: Tensor) -> Tensor:
        return x


class ClassifierFree(Guidance):
    """Classifier-free guidance: eps = eps(x, none) + w (eps(x, cond) - eps(x, none)); w = 1 is plain conditioning."""

    def __init__(self, weight: float, uncond=None):
        self.weight = weight
        self.uncond = uncond

    def apply(self, model, x, t, cond, x0, eps):
        if self.weight == 1.0:
            return x0, eps
        x0_u, eps_u = model.x0_eps(x, t, self.uncond)
        w = self.weight
        return x0_u + w * (x0 - x0_u), eps_u + w * (eps - eps_u)


class GradientGuidance(Guidance):
    """Steer sampling up the gradient of a differentiable objective f(x_t, t, cond) -> (B,).

    The score is shifted by ``scale * grad_x f``, i.e. eps <- eps - scale * sigma * grad, which covers classifier
    guidance (f = log p(y | x_t)), value guidance (f = predicted return) and energy guidance (f = -energy).
    Guidance is switched off for t < ``t_stop``. With ``n_steps > 1`` the gradient is taken ``n_steps`` times per
    solver step, each at the point moved by the shifts so far (x <- x + scale * sigma^2 * grad, the matching move of
    x_t), and the shifts add up: Diffuser's several guide steps per denoising step.
    """

    def __init__(self, fn: Callable[[Tensor, Tensor, object], Tensor], scale: float = 1.0, t_stop: float = 0.0,
                 max_grad_norm: float | None = None, n_steps: int = 1):
        if n_steps < 1:
            raise ValueError(f"GradientGuidance needs n_steps >= 1, got {n_steps}")
        self.fn, self.scale, self.t_stop, self.max_grad_norm, self.n_steps = fn, scale, t_stop, max_grad_norm, n_steps

    def gradient(self, x: Tensor, t: Tensor, cond) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            value = self.fn(xg, t, cond)
            grad, = torch.autograd.grad(value.sum(), xg)
        if self.max_grad_norm is not None:
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
            grad = grad * expand_like((self.max_grad_norm / norm).clamp(max=1.0), grad)
        return grad

    def apply(self, model, x, t, cond, x0, eps):
        if self.scale == 0.0:
            return x0, eps
        on = t >= self.t_stop
        if not bool(on.any()):  # past t_stop: skip the gradient evaluations altogether
            return x0, eps
        active = expand_like(on.to(x.dtype), x)
        a, s = expand_like(model.schedule.alpha(t), x), expand_like(model.schedule.sigma(t), x)
        total = torch.zeros_like(x)
        for _ in range(self.n_steps):
            total = total + self.gradient(x + self.scale * active * s**2 * total, t, cond)
        eps = eps - self.scale * active * s * total
        return (x - s * eps) / a, eps


class Inpainting(Guidance):
    """Hold fixed entries (``mask`` True) at ``values``: in the x0 estimate and, Diffuser-style, in the sample."""

    def __init__(self, mask: Tensor, values: Tensor):
        self.mask, self.values = mask, values

    def apply(self, model, x, t, cond, x0, eps):
        x0 = torch.where(self.mask, self.values, x0)
        a, s = expand_like(model.schedule.alpha(t), x), expand_like(model.schedule.sigma(t), x)
        return x0, (x - a * x0) / s

    def project(self, x, t):
        return torch.where(self.mask, self.values, x)


class Compose(Guidance):
    """Apply several hooks in order."""

    def __init__(self, hooks: Sequence[Guidance]):
        self.hooks = list(hooks)

    def apply(self, model, x, t, cond, x0, eps):
        for hook in self.hooks:
            x0, eps = hook.apply(model, x, t, cond, x0, eps)
        return x0, eps

    def project(self, x, t):
        for hook in self.hooks:
            x = hook.project(x, t)
        return x


def as_guidance(guidance: Guidance | Sequence[Guidance] | None) -> Guidance:
    """Normalise None / one hook / a list of hooks to a single hook."""
    if guidance is None:
        return Guidance()
    if isinstance(guidance, Guidance):
        return guidance
    return Compose(guidance)
