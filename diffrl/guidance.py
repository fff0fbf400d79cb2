"""Guidance hooks that every solver calls at each step.

A guidance object may change the model's (x0, eps) estimate at (x_t, t) through ``apply`` and may change the sample
through ``project``, which solvers apply to the prior draw and after each update, i.e. to every x_t before the model
sees it (and to the final sample at t = 0). Several hooks compose in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffrl.schedules import expand_like

if TYPE_CHECKING:
    from diffrl.model import DiffusionModel
    from diffrl.schedules import NoiseSchedule


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


def objective_gradient(fn: Callable[[Tensor, Tensor, object], Tensor], x: Tensor, t: Tensor, cond) -> Tensor:
    """grad_x of ``fn(x, t, cond).sum()``, taken even where the caller runs without gradients."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        grad, = torch.autograd.grad(fn(xg, t, cond).sum(), xg)
    return grad


class GradientGuidance(Guidance):
    """Steer sampling up the gradient of a differentiable objective f(x_t, t, cond) -> (B,).

    The score is shifted by ``scale * grad_x f``, i.e. eps <- eps - scale * sigma * grad, which covers classifier
    guidance (f = log p(y | x_t)) and energy guidance (f = -energy). Guidance is switched off for t < ``t_stop``.
    """

    def __init__(self, fn: Callable[[Tensor, Tensor, object], Tensor], scale: float = 1.0, t_stop: float = 0.0,
                 max_grad_norm: float | None = None):
        self.fn, self.scale, self.t_stop, self.max_grad_norm = fn, scale, t_stop, max_grad_norm

    def gradient(self, x: Tensor, t: Tensor, cond) -> Tensor:
        grad = objective_gradient(self.fn, x, t, cond)
        if self.max_grad_norm is not None:
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
            grad = grad * expand_like((self.max_grad_norm / norm).clamp(max=1.0), grad)
        return grad

    def apply(self, model, x, t, cond, x0, eps):
        if self.scale == 0.0:
            return x0, eps
        on = t >= self.t_stop
        if not bool(on.any()):  # past t_stop: skip the gradient evaluation altogether
            return x0, eps
        active = expand_like(on.to(x.dtype), x)
        a, s = expand_like(model.schedule.alpha(t), x), expand_like(model.schedule.sigma(t), x)
        eps = eps - self.scale * active * s * self.gradient(x, t, cond)
        return (x - s * eps) / a, eps


class PosteriorValueGuidance(Guidance):
    """Value guidance as Diffuser's official sampler applies it (``n_step_guided_p_sample``, Janner et al. 2022).

    Before the model sees x_t, ``n_steps`` times: x_t <- hold(x_t + scale * var(t) * grad_x f(x_t, t)), where
    var(t) is the posterior variance of the diffusion chain's step from t to t - ``chain_step`` and ``hold``
    (an Inpainting hook, or None) puts the fixed entries back after each shift. No guidance at the last
    ``t_stopgrad`` steps of the chain (t = n * chain_step with n <= t_stopgrad; the comparison is made half a step
    above, so grid round-off cannot switch a step on). It acts in ``project``, which every solver applies to x_t
    before the model call at t (the prior draw and each update).
    """

    def __init__(self, fn: Callable[[Tensor, Tensor, object], Tensor], schedule: NoiseSchedule, scale: float,
                 chain_step: float, t_stopgrad: int = 0, n_steps: int = 1, hold: Guidance | None = None):
        if n_steps < 1 or chain_step <= 0 or t_stopgrad < 0:
            raise ValueError(f"PosteriorValueGuidance needs n_steps >= 1, chain_step > 0 and t_stopgrad >= 0, got "
                             f"{n_steps}, {chain_step}, {t_stopgrad}")
        self.fn, self.schedule, self.scale, self.chain_step = fn, schedule, scale, chain_step
        self.t_stop = (t_stopgrad + 0.5) * chain_step
        self.n_steps, self.hold = n_steps, hold

    def variance(self, t: Tensor) -> Tensor:
        """Posterior variance of x_{t - chain_step} given x_t and x0: beta_t (1 - abar_{t-1}) / (1 - abar_t)."""
        s = (t - self.chain_step).clamp_min(0.0)
        a_t, s_t = self.schedule.alpha(t), self.schedule.sigma(t)
        a_s, s_s = self.schedule.alpha(s), self.schedule.sigma(s)
        return ((s_s / s_t) ** 2 * (s_t**2 - (a_t / a_s) ** 2 * s_s**2)).clamp_min(0.0)

    def project(self, x, t):
        on = t > self.t_stop
        if self.scale == 0.0 or not bool(on.any()):  # past t_stop: no gradient evaluations at all
            return x
        step = expand_like(torch.where(on, self.scale * self.variance(t), torch.zeros_like(t)), x)
        for _ in range(self.n_steps):
            x = x + step * objective_gradient(self.fn, x, t, None)
            if self.hold is not None:
                x = self.hold.project(x, t)
        return x


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
