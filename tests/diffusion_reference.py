"""Shared ground truth for solver, guidance and loss tests: schedules, samplers and exact Gaussian-mixture models."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffrl.analytic import ExactDenoiser, GaussianMixture
from diffrl.model import DiffusionModel
from diffrl.predictions import convert
from diffrl.schedules import VESDE, VPSDE, DiscreteVP, LinearFlow, NoiseSchedule, TrigFlow, expand_like

SCHEDULES: dict[str, NoiseSchedule] = {
    "ddpm-linear": DiscreteVP.linear(),
    "ddpm-cosine": DiscreteVP.cosine(),
    "ddpm-vp": DiscreteVP.vp(),
    "vp-sde": VPSDE(0.1, 20.0),
    "ve-sde": VESDE(),
    "linear-flow": LinearFlow(),
    "trig-flow": TrigFlow(),
}


def four_modes(std: float = 0.3) -> GaussianMixture:
    """Four equal modes at (+-1, +-1), component std ``std``."""
    means = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]], dtype=torch.float64)
    return GaussianMixture(means, torch.full((2,), std, dtype=torch.float64))


class ConvertedDenoiser(nn.Module):
    """An exact eps denoiser whose output is converted to another prediction type."""

    def __init__(self, exact: ExactDenoiser, prediction: str):
        super().__init__()
        self.exact, self.prediction = exact, prediction

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        return convert(self.exact(x_t, t, cond), "eps", self.prediction, x_t, t, self.exact.schedule)


def exact_model(mixture: GaussianMixture, schedule: NoiseSchedule, prediction: str = "eps") -> DiffusionModel:
    """A DiffusionModel whose network is the exact denoiser of ``mixture``, output as ``prediction``."""
    exact = ExactDenoiser(mixture, schedule)
    net = exact if prediction == "eps" else ConvertedDenoiser(exact, prediction)
    return DiffusionModel(net, schedule, prediction)


def prior(schedule: NoiseSchedule, n: int, dim: int, seed: int) -> Tensor:
    return schedule.prior((n, dim), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference_output(mixture: GaussianMixture, schedule: NoiseSchedule, n: int, seed: int) -> Tensor:
    """Draws of what a perfect sampler returns: E[x0 | x_{t_min}] with x_{t_min} from the true marginal."""
    gen = torch.Generator().manual_seed(seed)
    x0 = mixture.sample(n, gen)
    t = torch.full((n,), schedule.t_min, dtype=torch.float64)
    x_t = schedule.marginal(x0, t, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
    a, s = expand_like(schedule.alpha(t), x_t), expand_like(schedule.sigma(t), x_t)
    return mixture.posterior_x0(x_t, a, s)


def moment_errors(x: Tensor, mixture: GaussianMixture) -> tuple[float, float]:
    """(|mean error|, Frobenius covariance error) of samples against the mixture."""
    x = x.double()
    return float((x.mean(0) - mixture.mean()).norm()), float((torch.cov(x.T) - mixture.covariance()).norm())
