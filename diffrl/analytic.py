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

    def projected_quantiles(self, theta: Tensor, levels: Tensor, iters: int = 60) -> Tensor:
        """Quantiles (len(levels), P) of the mixture projected on the unit columns of ``theta`` (D, P), by bisection."""
        mu = self.means @ theta  # (K, P)
        sd = (self.stds**2 @ theta**2).sqrt()
        lo = (mu - 10 * sd).min(0).values.expand(len(levels), -1).clone()
        hi = (mu + 10 * sd).max(0).values.expand(len(levels), -1).clone()
        w = self.weights[:, None, None]
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            below = (w * torch.special.ndtr((mid[None] - mu[:, None]) / sd[:, None])).sum(0) < levels[:, None]
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)


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


def sliced_wasserstein(x: Tensor, target: Tensor | GaussianMixture, projections: int = 64, levels: int = 1000,
                       seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance from samples ``x`` (N, D) to samples or to an exact mixture.

    Each 1-D distance is the root mean square gap between quantile functions at ``levels`` evenly spaced levels;
    the ``projections`` directions are drawn from ``seed``, so distances of different samples are comparable.
    """
    theta = torch.randn(x.shape[1], projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta = theta / theta.norm(dim=0)
    lev = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels

    def sample_quantiles(y: Tensor) -> Tensor:
        return (y.double() @ theta).sort(0).values[(lev * len(y)).long()]

    q = target.projected_quantiles(theta, lev) if isinstance(target, GaussianMixture) else sample_quantiles(target)
    return float(((sample_quantiles(x) - q) ** 2).mean().sqrt())
