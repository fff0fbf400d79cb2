"""Training objectives: denoising score matching for any prediction type, and conditional flow matching."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffrl.predictions import Prediction, VelocityPrediction, make_prediction
from diffrl.schedules import LinearFlow, NoiseSchedule

Weighting = Callable[[Tensor, Prediction], Tensor]


def uniform_weighting(log_snr: Tensor, prediction: Prediction) -> Tensor:
    """Plain MSE on the prediction's own target."""
    return torch.ones_like(log_snr)


def min_snr_weighting(gamma: float = 5.0) -> Weighting:
    """Min-SNR-gamma (Hang et al. 2023): x0-space weight min(SNR, gamma), expressed for eps, x0 and v targets."""

    def weight(log_snr: Tensor, prediction: Prediction) -> Tensor:
        snr = log_snr.exp()
        x0_weight = snr.clamp(max=gamma)
        # MSE in x0 equals MSE(eps) / snr and MSE(v) / (snr + 1) for variance-preserving processes.
        factor = {"x0": torch.ones_like(snr), "eps": snr, "v": snr + 1.0}.get(prediction.name)
        if factor is None:
            raise ValueError(f"min-SNR weighting is defined for eps, x0 and v predictions, not {prediction.name!r}")
        return x0_weight / factor

    return weight


WEIGHTINGS: dict[str, Callable[[], Weighting]] = {
    "uniform": lambda: uniform_weighting,
    "min_snr": min_snr_weighting,
}


def denoising_loss(net: Callable[[Tensor, Tensor, object], Tensor], schedule: NoiseSchedule,
                   prediction: Prediction | str, x0: Tensor, cond=None, *, t: Tensor | None = None,
                   noise: Tensor | None = None, weighting: Weighting = uniform_weighting,
                   generator: torch.Generator | None = None, reduction: str = "mean") -> Tensor:
    """Denoising score matching: regress ``net(x_t, t, cond)`` on the prediction's target.

    ``reduction="none"`` returns one loss per sample (B,), e.g. for weighting by Q-values.
    """
    prediction = make_prediction(prediction)
    if t is None:
        t = schedule.sample_t(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.marginal(x0, t, noise)
    target = prediction.from_x0_eps(x0, noise, x_t, t, schedule)
    per_sample = (net(x_t, t, cond) - target).pow(2).flatten(1).mean(1)
    per_sample = per_sample * weighting(schedule.log_snr(t), prediction)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def flow_matching_loss(net: Callable[[Tensor, Tensor, object], Tensor], x0: Tensor, cond=None, *,
                       source: Tensor | None = None, schedule: NoiseSchedule | None = None,
                       generator: torch.Generator | None = None, reduction: str = "mean") -> Tensor:
    """Conditional flow matching: regress the path velocity between data ``x0`` and ``source`` (default N(0, I)).

    With the linear path (the default) the target is ``source - x0``; ``source`` may come from any coupling.
    """
    return denoising_loss(net, schedule or LinearFlow(), VelocityPrediction(), x0, cond, noise=source,
                          generator=generator, reduction=reduction)
