"""Exact denoisers for Gaussian-mixture data: ground truth for testing solvers and guidance.

For data ~ sum_k w_k N(mu_k, diag(s_k^2)), the noisy marginal at time t is the mixture of
N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2)), so the posterior mean E[x0 | x_t] and eps are available in closed form.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffrl.schedules import NoiseSchedule, expand_like


class GaussianMixture:
    """A diagonal Gaussian mixture in ``dim`` dimensions."""

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand_as(self.means).clone()
        k = self.means.shape[0]
        self.weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64) / torch.as_tensor(weights, dtype=torch.float64).sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.stds[comp] * noise

    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> Tensor:
        mu = self.mean()
        parts = zip(self.weights, self.means, self.stds, strict=True)
        second = sum(w * (torch.diag(s**2) + torch.outer(m, m)) for w, m, s in parts)
        return second - torch.outer(mu, mu)

    def posterior_x0(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """E[x0 | x_t] with alpha, sigma shaped (B, 1)."""
        x = x_t.double()
        a, s = alpha.double(), sigma.double()
        var = a[:, None] ** 2 * self.stds[None] ** 2 + s[:, None] ** 2  # (B, K, D)
        diff = x[:, None] - a[:, None] * self.means[None]
        log_resp = torch.log(self.weights)[None] - 0.5 * ((diff**2) / var + torch.log(var)).sum(-1)
        resp = torch.softmax(log_resp, dim=1)  # (B, K)
        comp_x0 = self.means[None] + (a[:, None] * self.stds[None] ** 2 / var) * diff
        return (resp[..., None] * comp_x0).sum(1).to(x_t.dtype)


class ExactDenoiser(nn.Module):
    """A 'network' that outputs the exact eps of a Gaussian mixture under ``schedule`` (use prediction='eps')."""

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule
        self.calls = 0

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        self.calls += 1
        a, s = expand_like(self.schedule.alpha(t), x_t), expand_like(self.schedule.sigma(t), x_t)
        x0 = self.mixture.posterior_x0(x_t, a, s)
        return (x_t - a * x0) / s
