"""Noise processes: boundary values, log-SNR inverse, derivatives and the SDE view against closed forms."""

import math

import pytest
import torch
from diffusion_reference import SCHEDULES

from diffrl.schedules import VESDE, VPSDE, DiscreteVP, LinearFlow, TrigFlow, make_schedule

NAMES = sorted(SCHEDULES)
VARIANCE_PRESERVING = ["ddpm-linear", "ddpm-cosine", "ddpm-vp", "vp-sde", "trig-flow"]


def dense_grid(schedule, n: int = 4001) -> torch.Tensor:
    return torch.linspace(schedule.t_min, schedule.t_max, n, dtype=torch.float64)


def off_grid(schedule, n: int = 997) -> torch.Tensor:
    """Times strictly inside [t_min, t_max] that avoid DiscreteVP's grid points (where log alpha has kinks)."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    t = schedule.t_min + (schedule.t_max - schedule.t_min) * u
    if isinstance(schedule, DiscreteVP):
        pos = t * schedule.num_steps
        t = (pos.floor() + 0.5).clamp(1, schedule.num_steps - 0.5) / schedule.num_steps
    return t


@pytest.mark.parametrize("name", NAMES)
def test_clean_end(name):
    schedule = SCHEDULES[name]
    zero = torch.zeros(1, dtype=torch.float64)
    assert schedule.alpha(zero).item() == pytest.approx(1.0, abs=1e-12)
    expected_sigma = schedule.sigma_min if isinstance(schedule, VESDE) else 0.0
    assert schedule.sigma(zero).item() == pytest.approx(expected_sigma, abs=1e-12)


@pytest.mark.parametrize("name", VARIANCE_PRESERVING)
def test_variance_preserving(name):
    schedule = SCHEDULES[name]
    t = dense_grid(schedule)
    torch.testing.assert_close(schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2, torch.ones_like(t), rtol=0,
                               atol=1e-12)


def test_flow_and_ve_paths():
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    flow, trig, ve = LinearFlow(), TrigFlow(), VESDE(0.01, 50.0)
    torch.testing.assert_close(flow.alpha(t) + flow.sigma(t), torch.ones_like(t))
    torch.testing.assert_close(trig.sigma(t), torch.sin(0.5 * math.pi * t))
    torch.testing.assert_close(ve.sigma(t), 0.01 * 5000.0**t)
    torch.testing.assert_close(ve.alpha(t), torch.ones_like(t))


@pytest.mark.parametrize("name", NAMES)
def test_prior_matches_marginal_at_t_max(name):
    """KL(q(x_T | x_0) || prior) is small for data with |mean| <= 1 and unit variance."""
    schedule = SCHEDULES[name]
    t = torch.tensor([schedule.t_max], dtype=torch.float64)
    a, s, p = schedule.alpha(t).item(), schedule.sigma(t).item(), schedule.prior_std()
    mean, var = a * 1.0, a * a * 1.0 + s * s  # marginal of x_0 ~ N(1, 1)
    kl = 0.5 * (var / p**2 + mean**2 / p**2 - 1.0 - math.log(var / p**2))
    assert kl < 0.01, f"{name}: KL(marginal || prior) = {kl:.4f}"


@pytest.mark.parametrize("name", NAMES)
def test_prior_draws(name):
    schedule = SCHEDULES[name]
    x = schedule.prior((20000, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert x.dtype == torch.float64
    assert x.std().item() == pytest.approx(schedule.prior_std(), rel=0.02)
    assert abs(x.mean().item()) < 0.03 * schedule.prior_std()


@pytest.mark.parametrize("name", NAMES)
def test_log_snr_strictly_decreasing(name):
    schedule = SCHEDULES[name]
    lam = schedule.log_snr(dense_grid(schedule))
    assert torch.isfinite(lam).all()
    assert (lam[1:] < lam[:-1]).all()


@pytest.mark.parametrize("name", NAMES)
def test_t_from_log_snr_inverts_log_snr(name):
    schedule = SCHEDULES[name]
    t = dense_grid(schedule)
    torch.testing.assert_close(schedule.t_from_log_snr(schedule.log_snr(t)), t, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["ddpm-linear", "ddpm-cosine", "ddpm-vp"])
def test_discrete_grid_points_are_cumprod(name):
    schedule = SCHEDULES[name]
    n = torch.arange(schedule.num_steps + 1, dtype=torch.float64)
    alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - schedule.betas, 0)])
    torch.testing.assert_close(schedule.alpha(n / schedule.num_steps) ** 2, alpha_bar, rtol=1e-14, atol=1e-15)


def test_discrete_constructors():
    linear = DiscreteVP.linear()
    torch.testing.assert_close(linear.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    cosine = DiscreteVP.cosine(s=0.008)
    f = torch.cos((torch.tensor([0.5], dtype=torch.float64) + 0.008) / 1.008 * math.pi / 2) ** 2
    f0 = math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(cosine.alpha(torch.tensor([0.5], dtype=torch.float64)) ** 2, f / f0)
    vp = DiscreteVP.vp(num_steps=5, beta_min=0.1, beta_max=10.0)
    # alpha_bar_N = exp(-beta_min - (beta_max - beta_min) / 2) at the last step: the VP-SDE's integral over [0, 1].
    assert vp.alpha(torch.ones(1, dtype=torch.float64)).item() ** 2 == pytest.approx(math.exp(-0.1 - 4.95))
    with pytest.raises(ValueError, match="betas"):
        DiscreteVP(torch.tensor([0.1, 1.5]))


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_finite_differences(name):
    schedule = SCHEDULES[name]
    t, h = off_grid(schedule), 1e-7
    da, ds = schedule.derivatives(t)
    torch.testing.assert_close(da, (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ds, (schedule.sigma(t + h) - schedule.sigma(t - h)) / (2 * h), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_sde_coefficients_solve_variance_ode(name):
    """f = d log alpha / dt, and the marginal variance of any data variance v0 obeys dV/dt = 2 f V + g^2."""
    schedule = SCHEDULES[name]
    t, h = off_grid(schedule), 1e-7
    f, g = schedule.drift_coef(t), schedule.diffusion_coef(t)
    assert (g > 0).all()
    torch.testing.assert_close(f, (schedule.log_alpha(t + h) - schedule.log_alpha(t - h)) / (2 * h), rtol=1e-6,
                               atol=1e-7)
    for v0 in (0.0, 0.3, 2.0):
        def var(tt, v0=v0):
            return schedule.alpha(tt) ** 2 * v0 + schedule.sigma(tt) ** 2
        dvar = (var(t + h) - var(t - h)) / (2 * h)
        torch.testing.assert_close(dvar, 2 * f * var(t) + g**2, rtol=1e-6, atol=1e-6)


def test_sde_coefficients_closed_forms():
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    vp = VPSDE(0.1, 20.0)
    beta = 0.1 + t * 19.9
    torch.testing.assert_close(vp.drift_coef(t), -0.5 * beta)
    torch.testing.assert_close(vp.diffusion_coef(t), beta.sqrt())
    ve = VESDE(0.01, 50.0)
    torch.testing.assert_close(ve.drift_coef(t), torch.zeros_like(t))
    torch.testing.assert_close(ve.diffusion_coef(t), ve.sigma(t) * math.sqrt(2 * math.log(5000.0)))


@pytest.mark.parametrize("name", NAMES)
def test_sample_t_range(name):
    schedule = SCHEDULES[name]
    t = schedule.sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,)
    assert t.min().item() >= schedule.t_min - 1e-7 and t.max().item() <= schedule.t_max + 1e-7
    span = schedule.t_max - schedule.t_min
    assert t.min().item() < schedule.t_min + 0.01 * span and t.max().item() > schedule.t_max - 0.01 * span
    if isinstance(schedule, DiscreteVP):  # exactly the chain's grid {1/T, ..., 1}
        n = t.double() * schedule.num_steps
        torch.testing.assert_close(n, n.round(), rtol=0, atol=1e-4)


def test_make_schedule():
    assert isinstance(make_schedule("vp-sde", beta_max=10.0), VPSDE)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("nope")
