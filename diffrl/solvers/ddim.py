"""DDIM (Song et al. 2021) and DDPM ancestral sampling (Ho et al. 2020) on any grid.

One step t -> s draws x_s ~ N(mean, std^2) with mean = alpha_s x0 + sqrt(sigma_s^2 - std^2) eps and
std = eta * (sigma_s / sigma_t) * sqrt(sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2). eta = 0 is the deterministic DDIM
ODE step; eta = 1 is exactly the DDPM posterior q(x_s | x_t, x0). The per-step Gaussian is exposed so that
policy-gradient fine-tuning (DDPO) can evaluate log-probabilities of sampled chains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffrl.guidance import Guidance, as_guidance
from diffrl.solvers.base import AffineStep, Solver, coefs, gaussian_log_prob


@dataclass
class StepDistribution:
    """The Gaussian of one DDIM step and the x0 estimate it came from."""

    mean: Tensor
    std: Tensor
    x0: Tensor

    def log_prob(self, x: Tensor) -> Tensor:
        return gaussian_log_prob(x, self.mean, self.std)


@dataclass
class Trajectory:
    """A sampled chain: latents[0] = x_T, latents[k+1] drawn at times[k+1] from the step at times[k]."""

    sample: Tensor
    latents: list[Tensor]
    times: Tensor
    log_probs: Tensor  # (B, steps - 1): one per stochastic step


class DDIM(Solver):
    """DDIM with stochasticity ``eta`` in [0, 1]."""

    name = "ddim"

    def __init__(self, eta: float = 0.0, spacing: str = "uniform"):
        super().__init__(spacing)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        self.eta = eta

    def step_distribution(self, model, x: Tensor, t: Tensor, s: Tensor, cond=None,
                          guidance: Guidance | None = None) -> StepDistribution:
        """The Gaussian p(x_s | x_t) of one step (differentiable in the model's parameters)."""
        x0, eps = model.denoise(x, t, cond, guidance)
        a_s, _ = coefs(model, s, x)
        std, eps_coef = self._std_and_eps_coef(model, t, s, x)
        mean = a_s * x0 + eps_coef * eps
        return StepDistribution(mean, std.expand_as(mean), x0)

    def _std_and_eps_coef(self, model, t: Tensor, s: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """The step's noise std and the weight of eps in its mean."""
        a_t, s_t = coefs(model, t, like)
        a_s, s_s = coefs(model, s, like)
        posterior_var = (s_s / s_t) ** 2 * (s_t**2 - (a_t / a_s) ** 2 * s_s**2)
        std = self.eta * posterior_var.clamp_min(0.0).sqrt()
        return std, (s_s**2 - std**2).clamp_min(0.0).sqrt()

    def affine_step(self, model, grid, i):
        std, eps_coef = self._std_and_eps_coef(model, grid[i], grid[i + 1], grid[i])
        return AffineStep(x=0.0, eps=float(eps_coef),
                          x0=(float(model.schedule.alpha(grid[i + 1])),),
                          noise=float(std) if self.eta > 0.0 else None)

    def step(self, model, x, t, s, cond, guidance, generator, state):
        dist = self.step_distribution(model, x, t, s, cond, guidance)
        if self.eta == 0.0:
            return dist.mean
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return dist.mean + dist.std * noise

    @torch.no_grad()
    def sample_trajectory(self, model, x_T: Tensor, cond=None, steps: int = 20, guidance: Guidance | None = None,
                          generator: torch.Generator | None = None) -> Trajectory:
        """Sample like :meth:`sample` but keep every latent and each stochastic step's log-probability."""
        if self.eta == 0.0:
            raise ValueError("log-probabilities need a stochastic sampler: use eta > 0")
        guidance = as_guidance(guidance)
        grid = self.timesteps(model, steps).to(device=x_T.device, dtype=x_T.dtype)
        batch = x_T.shape[0]
        x = guidance.project(x_T, grid[0].expand(batch))
        latents, log_probs = [x], []
        for i in range(steps - 1):
            t, s = grid[i].expand(batch), grid[i + 1].expand(batch)
            dist = self.step_distribution(model, x, t, s, cond, guidance)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = guidance.project(dist.mean + dist.std * noise, s)
            latents.append(x)
            log_probs.append(dist.log_prob(x))
        x0, _ = model.denoise(x, grid[-1].expand(batch), cond, guidance)
        lp = torch.stack(log_probs, 1) if log_probs else x_T.new_zeros(batch, 0)
        return Trajectory(guidance.project(x0, torch.zeros_like(grid[-1]).expand(batch)), latents, grid, lp)

    def __repr__(self) -> str:
        return f"DDIM(eta={self.eta}, spacing={self.spacing!r})"


class DDPM(DDIM):
    """Ancestral sampling from the DDPM posterior (DDIM with eta = 1)."""

    name = "ddpm"

    def __init__(self, spacing: str = "uniform"):
        super().__init__(eta=1.0, spacing=spacing)

    def __repr__(self) -> str:
        return f"DDPM(spacing={self.spacing!r})"
