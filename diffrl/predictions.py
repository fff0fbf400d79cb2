"""What a denoising network outputs, and exact conversions between output types.

Every prediction type maps to and from the pair (x0, eps) given x_t = alpha x0 + sigma eps, so any two types convert
through it. A network trained as one type can therefore be sampled by any solver, which asks for (x0, eps).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from diffrl.schedules import NoiseSchedule, expand_like


class Prediction(ABC):
    """A network output type."""

    name: str

    @abstractmethod
    def to_x0_eps(self, out: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule) -> tuple[Tensor, Tensor]:
        """Recover (x0, eps) from the network output ``out`` at (x_t, t)."""

    @abstractmethod
    def from_x0_eps(self, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        """The output a perfect network of this type would give; also the regression target in training."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _coefs(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    return expand_like(schedule.alpha(t), like), expand_like(schedule.sigma(t), like)


class EpsPrediction(Prediction):
    """The noise eps."""

    name = "eps"

    def to_x0_eps(self, out, x_t, t, schedule):
        a, s = _coefs(schedule, t, x_t)
        return (x_t - s * out) / a, out

    def from_x0_eps(self, x0, eps, x_t, t, schedule):
        return eps


class X0Prediction(Prediction):
    """The clean sample x0."""

    name = "x0"

    def to_x0_eps(self, out, x_t, t, schedule):
        a, s = _coefs(schedule, t, x_t)
        return out, (x_t - a * out) / s

    def from_x0_eps(self, x0, eps, x_t, t, schedule):
        return x0


class VPrediction(Prediction):
    """v = alpha eps - sigma x0 (Salimans & Ho 2022); exact for any alpha, sigma."""

    name = "v"

    def to_x0_eps(self, out, x_t, t, schedule):
        a, s = _coefs(schedule, t, x_t)
        norm = a * a + s * s
        return (a * x_t - s * out) / norm, (s * x_t + a * out) / norm

    def from_x0_eps(self, x0, eps, x_t, t, schedule):
        a, s = _coefs(schedule, t, x_t)
        return a * eps - s * x0


class ScorePrediction(Prediction):
    """The score of the marginal, grad log p_t(x_t) = -eps / sigma."""

    name = "score"

    def to_x0_eps(self, out, x_t, t, schedule):
        a, s = _coefs(schedule, t, x_t)
        eps = -s * out
        return (x_t - s * eps) / a, eps

    def from_x0_eps(self, x0, eps, x_t, t, schedule):
        _, s = _coefs(schedule, t, x_t)
        return -eps / s


class VelocityPrediction(Prediction):
    """The probability-flow velocity dx_t/dt = alpha' x0 + sigma' eps (flow matching's target)."""

    name = "velocity"

    def to_x0_eps(self, out, x_t, t, schedule):
        a, s = _coefs(schedule, t, x_t)
        da, ds = (expand_like(d, x_t) for d in schedule.derivatives(t))
        det = a * ds - s * da
        return (ds * x_t - s * out) / det, (a * out - da * x_t) / det

    def from_x0_eps(self, x0, eps, x_t, t, schedule):
        da, ds = (expand_like(d, x_t) for d in schedule.derivatives(t))
        return da * x0 + ds * eps


def noise_level(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """sigma(t) / alpha(t): the noise standard deviation of x_t / alpha(t) = x0 + (sigma / alpha) eps."""
    return (schedule.log_sigma(t) - schedule.log_alpha(t)).exp()


class ConsistencyPrediction(Prediction):
    """A consistency function's network output F (Song et al. 2023, their boundary-condition parametrisation).

    In the variables x = x_t / alpha (noise level s = sigma / alpha) the output is
    ``f = c_skip(s) x + c_out(s) F`` with ``c_skip = sd^2 / ((s - s0)^2 + sd^2)``,
    ``c_out = sd (s - s0) / sqrt(sd^2 + s^2)``, ``sd = sigma_data`` (0.5) and ``s0`` the noise level at t = 0, so
    ``f(x_t, 0) = x_t`` exactly. The boundary sits at the data end t = 0 (s0 = 0 except for VE processes) rather than
    at a small s0 as in the paper, because the last grid point of a short discrete chain is far from clean data.
    """

    name = "consistency"

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def scalings(self, x_t: Tensor, t: Tensor, schedule: NoiseSchedule) -> tuple[Tensor, Tensor]:
        """(c_skip / alpha, c_out) shaped like ``x_t``: f = (c_skip / alpha) x_t + c_out F."""
        s = noise_level(schedule, t)
        gap = s - noise_level(schedule, torch.zeros_like(t))
        sd2 = self.sigma_data**2
        c_skip = sd2 / (gap * gap + sd2)
        c_out = self.sigma_data * gap / (sd2 + s * s).sqrt()
        return expand_like(c_skip / schedule.alpha(t), x_t), expand_like(c_out, x_t)

    def to_x0_eps(self, out, x_t, t, schedule):
        skip, c_out = self.scalings(x_t, t, schedule)
        x0 = skip * x_t + c_out * out
        a, s = _coefs(schedule, t, x_t)
        return x0, (x_t - a * x0) / s

    def from_x0_eps(self, x0, eps, x_t, t, schedule):
        skip, c_out = self.scalings(x_t, t, schedule)
        return (x0 - skip * x_t) / c_out

    def __repr__(self) -> str:
        return f"ConsistencyPrediction(sigma_data={self.sigma_data})"


PREDICTIONS: dict[str, type[Prediction]] = {
    p.name: p for p in (EpsPrediction, X0Prediction, VPrediction, ScorePrediction, VelocityPrediction,
                        ConsistencyPrediction)
}


def make_prediction(kind: str | Prediction) -> Prediction:
    """A prediction object from its name ('eps', 'x0', 'v', 'score', 'velocity') or itself."""
    if isinstance(kind, Prediction):
        return kind
    try:
        return PREDICTIONS[kind]()
    except KeyError:
        raise ValueError(f"unknown prediction type {kind!r}; choose one of {sorted(PREDICTIONS)}") from None


def convert(out: Tensor, source: str | Prediction, target: str | Prediction, x_t: Tensor, t: Tensor,
            schedule: NoiseSchedule) -> Tensor:
    """Convert a network output from one prediction type to another."""
    x0, eps = make_prediction(source).to_x0_eps(out, x_t, t, schedule)
    return make_prediction(target).from_x0_eps(x0, eps, x_t, t, schedule)
