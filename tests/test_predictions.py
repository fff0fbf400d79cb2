"""Prediction types: exact round trips between every pair on every schedule, and the defining formulas."""

import itertools

import pytest
import torch
from diffusion_reference import SCHEDULES

from diffrl.predictions import PREDICTIONS, convert, make_prediction
from diffrl.schedules import expand_like

NAMES = sorted(PREDICTIONS)


def state(schedule, seed: int = 0, n: int = 256):
    """(x0, eps, x_t, t) at times spread over [t_min, t_max]."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    t = schedule.t_min + (schedule.t_max - schedule.t_min) * torch.rand(n, generator=gen, dtype=torch.float64)
    return x0, eps, schedule.marginal(x0, t, eps), t


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("kind", NAMES)
def test_to_x0_eps_inverts_from_x0_eps(schedule_name, kind):
    schedule = SCHEDULES[schedule_name]
    x0, eps, x_t, t = state(schedule)
    pred = make_prediction(kind)
    x0_hat, eps_hat = pred.to_x0_eps(pred.from_x0_eps(x0, eps, x_t, t, schedule), x_t, t, schedule)
    # Recovering x0 divides by alpha(t), which is ~1e-3 at the prior end of the flows: scale the tolerance with it.
    scale = 1.0 / expand_like(schedule.alpha(t), x0)
    assert ((x0_hat - x0).abs() / scale).max() < 1e-9
    assert (eps_hat - eps).abs().max() < 1e-9


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
def test_every_pair_round_trips(schedule_name):
    schedule = SCHEDULES[schedule_name]
    x0, eps, x_t, t = state(schedule, seed=1)
    for a, b in itertools.permutations(NAMES, 2):
        out = make_prediction(a).from_x0_eps(x0, eps, x_t, t, schedule)
        back = convert(convert(out, a, b, x_t, t, schedule), b, a, x_t, t, schedule)
        torch.testing.assert_close(back, out, rtol=1e-8, atol=1e-8, msg=f"{a} -> {b} -> {a} on {schedule_name}")


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
def test_definitions(schedule_name):
    schedule = SCHEDULES[schedule_name]
    x0, eps, x_t, t = state(schedule, seed=2)
    a, s = expand_like(schedule.alpha(t), x0), expand_like(schedule.sigma(t), x0)
    da, ds = (expand_like(d, x0) for d in schedule.derivatives(t))

    def target(kind):
        return make_prediction(kind).from_x0_eps(x0, eps, x_t, t, schedule)

    torch.testing.assert_close(target("eps"), eps)
    torch.testing.assert_close(target("x0"), x0)
    torch.testing.assert_close(target("v"), a * eps - s * x0)
    torch.testing.assert_close(target("score"), -eps / s)
    torch.testing.assert_close(target("velocity"), da * x0 + ds * eps)


def test_score_is_gaussian_score():
    """For data N(0, 1), the exact score of x_t ~ N(0, alpha^2 + sigma^2) is -x_t / (alpha^2 + sigma^2)."""
    schedule = SCHEDULES["vp-sde"]
    t = torch.full((5,), 0.4, dtype=torch.float64)
    x_t = torch.linspace(-2, 2, 5, dtype=torch.float64)[:, None]
    a, s = expand_like(schedule.alpha(t), x_t), expand_like(schedule.sigma(t), x_t)
    eps_exact = s * x_t / (a * a + s * s)  # E[eps | x_t]
    torch.testing.assert_close(convert(eps_exact, "eps", "score", x_t, t, schedule), -x_t / (a * a + s * s))


def test_velocity_is_linear_flow_target():
    schedule = SCHEDULES["linear-flow"]
    x0, eps, x_t, t = state(schedule, seed=3)
    torch.testing.assert_close(make_prediction("velocity").from_x0_eps(x0, eps, x_t, t, schedule), eps - x0)


def test_unknown_prediction():
    with pytest.raises(ValueError, match="unknown prediction type"):
        make_prediction("noise")
    pred = make_prediction("v")
    assert make_prediction(pred) is pred
