"""Training objectives: the exact denoiser attains the irreducible loss, flow-matching targets, min-SNR weights."""

import math

import pytest
import torch
from diffusion_reference import SCHEDULES, ConvertedDenoiser

from diffrl.analytic import ExactDenoiser, GaussianMixture
from diffrl.losses import WEIGHTINGS, denoising_loss, flow_matching_loss, min_snr_weighting, uniform_weighting
from diffrl.predictions import convert, make_prediction
from diffrl.schedules import LinearFlow, expand_like

VP = SCHEDULES["vp-sde"]
STD = 0.6
GAUSS = GaussianMixture(torch.zeros(1, 2, dtype=torch.float64), torch.full((1, 2), STD, dtype=torch.float64))


def fixed_batch(n=200_000, t_value=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = GAUSS.sample(n, gen)
    return x0, torch.full((n,), t_value, dtype=torch.float64), torch.randn(x0.shape, generator=gen, dtype=torch.float64)


def test_exact_eps_attains_irreducible_loss():
    """For data N(0, std^2), Var(eps | x_t) = alpha^2 std^2 / (alpha^2 std^2 + sigma^2): the exact model's eps-loss."""
    x0, t, noise = fixed_batch()
    exact = ExactDenoiser(GAUSS, VP)
    loss = denoising_loss(exact, VP, "eps", x0, t=t, noise=noise).item()
    a, s = VP.alpha(t[:1]).item(), VP.sigma(t[:1]).item()
    irreducible = a * a * STD**2 / (a * a * STD**2 + s * s)
    assert loss == pytest.approx(irreducible, rel=0.01)
    for bias in (0.05, -0.05):
        def perturbed(x_t, tt, cond, bias=bias):
            return exact(x_t, tt) + bias
        assert denoising_loss(perturbed, VP, "eps", x0, t=t, noise=noise).item() > loss
    assert denoising_loss(lambda x_t, tt, cond: 1.05 * exact(x_t, tt), VP, "eps", x0, t=t, noise=noise).item() > loss


@pytest.mark.parametrize("kind", ["x0", "v", "velocity", "score"])
def test_exact_model_is_best_for_every_prediction_type(kind):
    x0, t, noise = fixed_batch(n=50_000, t_value=0.5, seed=1)
    exact = ConvertedDenoiser(ExactDenoiser(GAUSS, VP), kind)
    best = denoising_loss(exact, VP, kind, x0, t=t, noise=noise).item()
    for bias in (0.1, -0.1):  # raises the expected loss by bias^2 = 0.01, far above the Monte Carlo error
        def shifted(x_t, tt, cond, bias=bias):
            return exact(x_t, tt) + bias
        assert denoising_loss(shifted, VP, kind, x0, t=t, noise=noise).item() > best + 0.005


def test_targets_and_noised_input():
    """The network sees x_t = alpha x0 + sigma noise and is regressed on the prediction's target."""
    x0, t, noise = fixed_batch(n=64, t_value=0.7, seed=2)
    seen = {}

    def net(x_t, tt, cond):
        seen["x_t"], seen["t"], seen["cond"] = x_t, tt, cond
        return torch.zeros_like(x_t)

    loss = denoising_loss(net, VP, "v", x0, "c", t=t, noise=noise, reduction="none")
    a, s = expand_like(VP.alpha(t), x0), expand_like(VP.sigma(t), x0)
    torch.testing.assert_close(seen["x_t"], a * x0 + s * noise)
    assert seen["cond"] == "c" and torch.equal(seen["t"], t)
    torch.testing.assert_close(loss, (a * noise - s * x0).pow(2).mean(1))


def test_flow_matching_target_is_source_minus_data():
    gen = torch.Generator().manual_seed(3)
    x0, source = torch.randn(256, 3, generator=gen), torch.randn(256, 3, generator=gen)
    seen = {}

    def net(x_t, t, cond):
        seen["x_t"], seen["t"] = x_t, t
        return source - x0  # the exact target: zero loss

    assert flow_matching_loss(net, x0, source=source, generator=gen).item() == 0.0
    t = seen["t"][:, None]
    torch.testing.assert_close(seen["x_t"], (1 - t) * x0 + t * source)
    flow = LinearFlow()
    assert seen["t"].min() >= flow.t_min and seen["t"].max() <= flow.t_max
    zero = flow_matching_loss(lambda x_t, t, c: torch.zeros_like(x_t), x0, source=source, reduction="none")
    torch.testing.assert_close(zero, (source - x0).pow(2).mean(1))


@pytest.mark.parametrize("log_snr,gamma,expected", [
    (math.log(2.0), 5.0, {"x0": 2.0, "eps": 1.0, "v": 2.0 / 3.0}),
    (math.log(10.0), 5.0, {"x0": 5.0, "eps": 0.5, "v": 5.0 / 11.0}),
    (math.log(0.1), 1.0, {"x0": 0.1, "eps": 1.0, "v": 0.1 / 1.1}),
])
def test_min_snr_weights(log_snr, gamma, expected):
    weight = min_snr_weighting(gamma)
    for kind, value in expected.items():
        got = weight(torch.tensor([log_snr], dtype=torch.float64), make_prediction(kind))
        assert got.item() == pytest.approx(value, rel=1e-12), kind
    with pytest.raises(ValueError, match="min-SNR"):
        weight(torch.zeros(1), make_prediction("velocity"))


def test_min_snr_is_the_same_objective_for_eps_x0_v():
    """On a VP process, min-SNR-weighted eps, x0 and v losses of one (x0, eps) estimate coincide."""
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(512, 2, generator=gen, dtype=torch.float64)
    t, noise = VP.sample_t(512, generator=gen).double(), torch.randn(512, 2, generator=gen, dtype=torch.float64)

    def guess_eps(x_t, tt):  # any estimate will do: a crude shrinkage guess of eps
        return 0.7 * x_t

    losses = {}
    for kind in ("eps", "x0", "v"):
        def net(x_t, tt, cond, kind=kind):
            return convert(guess_eps(x_t, tt), "eps", kind, x_t, tt, VP)
        losses[kind] = denoising_loss(net, VP, kind, x0, t=t, noise=noise, weighting=min_snr_weighting(5.0),
                                      reduction="none")
    torch.testing.assert_close(losses["eps"], losses["x0"])
    torch.testing.assert_close(losses["v"], losses["x0"])


def test_registry_and_errors():
    assert WEIGHTINGS["uniform"]() is uniform_weighting
    x0 = torch.randn(4, 2)
    with pytest.raises(ValueError, match="reduction"):
        denoising_loss(lambda x, t, c: x, VP, "eps", x0, reduction="sum")
