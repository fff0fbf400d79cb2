"""Guidance hooks with exact denoisers: classifier-free weights, gradient guidance and inpainting."""

import pytest
import torch
from diffusion_reference import SCHEDULES, exact_model, four_modes, prior
from torch import Tensor, nn

from diffrl.analytic import ExactDenoiser, GaussianMixture
from diffrl.guidance import (
    ClassifierFree,
    Compose,
    GradientGuidance,
    Guidance,
    Inpainting,
    PosteriorValueGuidance,
    as_guidance,
)
from diffrl.model import DiffusionModel
from diffrl.schedules import DiscreteVP, expand_like
from diffrl.solvers import DDIM, DDPM, DPMSolverPP, Heun, make_timesteps

VP = SCHEDULES["vp-sde"]
MIX = four_modes(0.3)
SOLVERS = {"ddim": DDIM(), "ddpm": DDPM(), "dpm++2m": DPMSolverPP(2), "heun": Heun()}


class ClassConditionalExact(nn.Module):
    """Exact eps of mixture component ``cond`` (an int), or of the whole mixture when ``cond`` is None."""

    def __init__(self, mixture: GaussianMixture, schedule):
        super().__init__()
        self.full = ExactDenoiser(mixture, schedule)
        self.components = [ExactDenoiser(GaussianMixture(m[None], s[None]), schedule)
                           for m, s in zip(mixture.means, mixture.stds, strict=True)]

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        return self.full(x_t, t) if cond is None else self.components[cond](x_t, t)


def sample(model, solver, guidance=None, cond=None, n=2000, dim=2, steps=20):
    x_T = prior(model.schedule, n, dim, seed=0)
    return solver.sample(model, x_T, cond, steps=steps, guidance=guidance, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_classifier_free_weights(solver):
    model = DiffusionModel(ClassConditionalExact(MIX, VP), VP)
    cond_only, uncond_only = sample(model, SOLVERS[solver], cond=2), sample(model, SOLVERS[solver], cond=None)
    torch.testing.assert_close(sample(model, SOLVERS[solver], ClassifierFree(1.0), cond=2), cond_only, rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(sample(model, SOLVERS[solver], ClassifierFree(0.0), cond=2), uncond_only, rtol=0,
                               atol=1e-12)
    # w = 1 through the general formula (not the shortcut) is the conditional model too.
    torch.testing.assert_close(sample(model, SOLVERS[solver], ClassifierFree(1.0 + 1e-12), cond=2), cond_only,
                               rtol=0, atol=1e-9)
    # Class 2 is the mode at (-1, -1); the conditional samples sit there, w > 1 pushes further out.
    target = MIX.means[2]
    assert (cond_only.mean(0) - target).norm() < 0.05
    strong = sample(model, SOLVERS[solver], ClassifierFree(3.0), cond=2)
    assert (strong.mean(0) - target).norm() > 0.1 and (strong.mean(0) * target).sum() > (target * target).sum()


def gaussian_1d_model():
    return exact_model(GaussianMixture(torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)),
                       VP)


def log_gauss_objective(target: float, width: float):
    def f(x, t, cond):
        return -((x - target) ** 2).sum(1) / (2 * width**2)
    return f


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_gradient_guidance_moves_toward_target(solver):
    model = gaussian_1d_model()
    base = sample(model, SOLVERS[solver], dim=1)
    unguided = sample(model, SOLVERS[solver], GradientGuidance(log_gauss_objective(2.0, 1.0), 0.0), dim=1)
    assert torch.equal(unguided, base)
    means = [sample(model, SOLVERS[solver], GradientGuidance(log_gauss_objective(2.0, 1.0), scale), dim=1).mean().item()
             for scale in (0.0, 0.3, 1.0)]
    assert abs(means[0]) < 0.08
    assert means[0] < means[1] < means[2] < 2.0, means
    assert means[2] > 0.7, means


def test_gradient_guidance_is_a_score_shift():
    """eps' = eps - scale * sigma * grad f, i.e. score' = score + scale * grad f, with x0 kept consistent."""
    model = gaussian_1d_model()
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    t = torch.full((9,), 0.4, dtype=torch.float64)
    x0, eps = model.x0_eps(x, t)
    hook = GradientGuidance(log_gauss_objective(1.0, 0.5), scale=0.7)
    x0_g, eps_g = hook.apply(model, x, t, None, x0, eps)
    a, s = expand_like(VP.alpha(t), x), expand_like(VP.sigma(t), x)
    grad = -(x - 1.0) / 0.25
    torch.testing.assert_close(-eps_g / s, -eps / s + 0.7 * grad)
    torch.testing.assert_close(a * x0_g + s * eps_g, x)
    stopped = GradientGuidance(log_gauss_objective(1.0, 0.5), scale=0.7, t_stop=0.5).apply(model, x, t, None, x0, eps)
    torch.testing.assert_close(stopped[1], eps)
    clipped = GradientGuidance(log_gauss_objective(1.0, 0.5), scale=1.0, max_grad_norm=0.1)
    assert clipped.gradient(x, t, None).abs().max().item() == pytest.approx(0.1)


class CorrelatedGaussian(nn.Module):
    """Exact eps of data N(mu, cov) with a full covariance: E[x0 | x_t] = mu + a cov (a^2 cov + s^2 I)^-1 (x - a mu)."""

    def __init__(self, mu: Tensor, cov: Tensor, schedule):
        super().__init__()
        self.mu, self.cov, self.schedule = mu, cov, schedule

    def forward(self, x_t, t, cond=None):
        a, s = expand_like(self.schedule.alpha(t), x_t), expand_like(self.schedule.sigma(t), x_t)
        var = a[..., None] ** 2 * self.cov + s[..., None] ** 2 * torch.eye(len(self.mu), dtype=x_t.dtype)
        x0 = self.mu + (a[..., None] * self.cov @ torch.linalg.solve(var, (x_t - a * self.mu)[..., None]))[..., 0]
        return (x_t - a * x0) / s


MU = torch.tensor([0.5, -0.5], dtype=torch.float64)


def inpaint(cov: Tensor, solver, value: float | None = 1.5):
    """Samples of the correlated Gaussian with x1 held at ``value`` (no guidance when None)."""
    model = DiffusionModel(CorrelatedGaussian(MU, cov, VP), VP)
    hook = None if value is None else Inpainting(torch.tensor([True, False]),
                                                 torch.tensor([value, 0.0], dtype=torch.float64))
    return sample(model, solver, hook, n=20_000, steps=30)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_inpainting_with_independent_entries(solver):
    """With independent coordinates the conditional of x2 is its marginal: the free entry is sampled exactly as
    without inpainting (same draws), the fixed one is held exactly."""
    cov = torch.diag(torch.tensor([1.0, 0.49], dtype=torch.float64))
    out, free = inpaint(cov, SOLVERS[solver]), inpaint(cov, SOLVERS[solver], value=None)
    assert (out[:, 0] == 1.5).all()
    torch.testing.assert_close(out[:, 1], free[:, 1], rtol=0, atol=1e-12)
    assert out[:, 1].mean().item() == pytest.approx(-0.5, abs=0.02)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_inpainting_correlated_conditional(solver):
    """rho = 0.8, x1 fixed at mu1 + 1: the exact conditional mean of x2 is -0.5 + 0.8 = 0.3 (variance 0.36).

    Replacement conditioning (the fixed entries written into x_t, as in Diffuser) only approximates the conditional:
    with an unconditional model the free entry moves from the marginal mean -0.5 towards 0.3 but stops near 0.0.
    This pins that known bias so that a change of method shows up here.
    """
    out = inpaint(torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64), SOLVERS[solver])
    assert (out[:, 0] == 1.5).all()
    mean = out[:, 1].mean().item()
    assert -0.1 < mean < 0.35, mean


def test_compose_and_as_guidance():
    model = gaussian_1d_model()
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None]
    t = torch.full((5,), 0.3, dtype=torch.float64)
    x0, eps = model.x0_eps(x, t)
    g1 = GradientGuidance(log_gauss_objective(1.0, 1.0), scale=0.5)
    g2 = Inpainting(torch.tensor([True]), torch.tensor([0.25], dtype=torch.float64))
    both = as_guidance([g1, g2])
    assert isinstance(both, Compose) and isinstance(as_guidance(None), Guidance) and as_guidance(g1) is g1
    expected = g2.apply(model, x, t, None, *g1.apply(model, x, t, None, x0, eps))
    for got, want in zip(both.apply(model, x, t, None, x0, eps), expected, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(both.project(x, t), torch.full_like(x, 0.25))


def official_posterior_variance(schedule: DiscreteVP) -> Tensor:
    """beta_n (1 - abar_{n-1}) / (1 - abar_n) for n = 1..T (jannerm/diffuser GaussianDiffusion.posterior_variance)."""
    abar = torch.cumprod(1 - schedule.betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    return schedule.betas * (1 - abar_prev) / (1 - abar)


def test_posterior_value_guidance_shifts_x_t_by_hand():
    """A linear value f = <w, x> has gradient w: each of the n guide steps adds scale * var_n * w, the held entries
    are put back after each, and the last t_stopgrad steps of the chain are left alone."""
    schedule = DiscreteVP.cosine(20)
    grid = make_timesteps(schedule, 20)  # t = n / 20, n = 20..1, with linspace round-off
    w = torch.randn(1, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 6, 3, dtype=torch.bool)
    mask[:, 0, :2] = True
    hold = Inpainting(mask, torch.full_like(x, 0.25))
    hook = PosteriorValueGuidance(lambda y, t, cond: (w * y).sum((1, 2)), schedule, scale=0.1, chain_step=1 / 20,
                                  t_stopgrad=2, n_steps=2, hold=hold)
    var = official_posterior_variance(schedule)
    for i, n in enumerate(range(20, 0, -1)):
        t = grid[i].expand(4)
        torch.testing.assert_close(hook.variance(t), var[n - 1].expand(4))
        expected = x
        if n > 2:  # official: grad[t < t_stopgrad] = 0 with t = n - 1
            for _ in range(2):
                expected = torch.where(mask, 0.25, expected + 0.1 * var[n - 1] * w)
        torch.testing.assert_close(hook.project(x, t), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(hook.project(x, torch.zeros(4, dtype=torch.float64)), x)  # the final sample
    assert PosteriorValueGuidance(lambda y, t, c: y.sum((1, 2)), schedule, 0.0, 1 / 20).project(x, grid[0].expand(4)) \
        is x
    with pytest.raises(ValueError, match="n_steps"):
        PosteriorValueGuidance(lambda y, t, c: y.sum(), schedule, 0.1, 1 / 20, n_steps=0)


def test_posterior_value_guidance_follows_the_moving_gradient():
    """The second guide step takes the gradient at the point the first one moved to."""
    schedule = DiscreteVP.cosine(20)
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    t = torch.full((9,), 0.5, dtype=torch.float64)
    hook = PosteriorValueGuidance(log_gauss_objective(1.0, 0.5), schedule, scale=3.0, chain_step=1 / 20, n_steps=2)
    step = 3.0 * official_posterior_variance(schedule)[9]
    once = x + step * (-(x - 1.0) / 0.25)
    torch.testing.assert_close(hook.project(x, t), once + step * (-(once - 1.0) / 0.25))
