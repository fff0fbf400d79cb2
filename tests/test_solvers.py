"""Samplers against exact answers: the closed-form ODE flow of a Gaussian, a fine reference solve on a 2-D mixture,
convergence orders, distribution distances, NFE counts, seeding and DDIM's per-step Gaussian."""

import math

import pytest
import torch
from diffusion_reference import SCHEDULES, exact_model, four_modes, moment_errors, prior, reference_output

from diffrl.analytic import GaussianMixture, sliced_wasserstein
from diffrl.solvers import DDIM, DDPM, DPMSolverPP, Euler, Heun, make_solver, make_timesteps, solver_variants

MIX = four_modes(0.3)
VP = SCHEDULES["vp-sde"]
SOLVERS = solver_variants()
STOCHASTIC = ["ddpm", "ddim-eta0.5", "euler-maruyama"]
DETERMINISTIC = [name for name in SOLVERS if name not in STOCHASTIC]
FIRST_ORDER = ["ddim", "dpm++1", "euler"]
SECOND_ORDER = ["heun", "dpm++2m", "dpm++2s"]


def run(solver, model, x_T, steps, seed=0):
    return solver.sample(model, x_T, steps=steps, generator=torch.Generator().manual_seed(seed))


# --- a single Gaussian: the probability-flow ODE is an affine map ------------------------------------------------

GAUSS_MU = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
GAUSS_STD = torch.tensor([[0.7, 1.3]], dtype=torch.float64)


def gaussian_flow_output(schedule, x_T):
    """Exact output for data N(mu, diag(std^2)): the ODE keeps (x_t - alpha_t mu) / sqrt(v_t) fixed, with
    v_t = alpha_t^2 std^2 + sigma_t^2, and the sampler returns E[x0 | x_tmin] = mu + alpha std^2 / v (x - alpha mu):
    x_out = mu + alpha_m std^2 / sqrt(v_m v_T) (x_T - alpha_T mu)."""
    ends = torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64)
    (a_T, a_m), (s_T, s_m) = schedule.alpha(ends), schedule.sigma(ends)
    v_T, v_m = a_T**2 * GAUSS_STD**2 + s_T**2, a_m**2 * GAUSS_STD**2 + s_m**2
    return GAUSS_MU + a_m * GAUSS_STD**2 / (v_m * v_T).sqrt() * (x_T - a_T * GAUSS_MU)


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
def test_fine_solve_recovers_gaussian_flow(schedule_name):
    schedule = SCHEDULES[schedule_name]
    model = exact_model(GaussianMixture(GAUSS_MU, GAUSS_STD), schedule)
    x_T = prior(schedule, 200, 2, seed=0)
    out = run(DPMSolverPP(3, multistep=False), model, x_T, steps=200)
    torch.testing.assert_close(out, gaussian_flow_output(schedule, x_T), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_gaussian_flow_error_shrinks(name):
    model = exact_model(GaussianMixture(GAUSS_MU, GAUSS_STD), VP)
    x_T = prior(VP, 200, 2, seed=1)
    exact = gaussian_flow_output(VP, x_T)
    errors = [(run(SOLVERS[name], model, x_T, steps) - exact).abs().max().item() for steps in (10, 20, 40, 80)]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    bound = {"ddim": 0.15, "dpm++1": 0.15, "euler": 0.02}.get(name, 0.01)
    assert errors[-1] < bound, errors


# --- a 2-D mixture: pathwise convergence to a fine reference solve ---------------------------------------------


@pytest.fixture(scope="module")
def mixture_paths():
    """Mean pathwise error of each deterministic solver at 5..80 steps against a fine solve from the same x_T."""
    model = exact_model(MIX, VP)
    x_T = prior(VP, 500, 2, seed=2)
    reference = run(DPMSolverPP(3), model, x_T, steps=500)
    heun = run(Heun(spacing="logsnr"), model, x_T, steps=500)
    steps = [5, 10, 20, 40, 80]
    errors = {name: [(run(SOLVERS[name], model, x_T, n) - reference).norm(dim=1).mean().item() for n in steps]
              for name in DETERMINISTIC}
    return steps, errors, (heun - reference).norm(dim=1).max().item()


def test_reference_solves_agree(mixture_paths):
    _, _, heun_gap = mixture_paths
    assert heun_gap < 1e-4


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_mixture_error_decreases_with_steps(mixture_paths, name):
    _, errors, _ = mixture_paths
    errors = errors[name]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors


def convergence_order(steps, errors):
    """Least-squares slope of -log(error) against log(intervals) over 10..80 steps."""
    x = torch.log(torch.tensor(steps[1:], dtype=torch.float64) - 1)
    y = -torch.log(torch.tensor(errors[1:], dtype=torch.float64))
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


@pytest.mark.parametrize("name,low,high", [(n, 0.8, 1.35) for n in FIRST_ORDER] + [(n, 1.6, 2.4) for n in SECOND_ORDER]
                         + [("dpm++3s", 2.4, 3.6), ("dpm++3m", 1.8, 3.6)])
def test_convergence_order(mixture_paths, name, low, high):
    steps, errors, _ = mixture_paths
    order = convergence_order(steps, errors[name])
    assert low <= order <= high, f"{name}: empirical order {order:.2f}, errors {errors[name]}"


@pytest.mark.parametrize("spacing", ["uniform", "logsnr", "quadratic"])
@pytest.mark.parametrize("schedule_name", ["ddpm-linear", "vp-sde", "ve-sde", "linear-flow"])
def test_ddim_equals_first_order_dpm_solver(spacing, schedule_name):
    schedule = SCHEDULES[schedule_name]
    model = exact_model(MIX, schedule)
    x_T = prior(schedule, 300, 2, seed=3)
    ddim = run(DDIM(eta=0.0, spacing=spacing), model, x_T, steps=12)
    dpm = run(DPMSolverPP(1, spacing=spacing), model, x_T, steps=12)
    torch.testing.assert_close(ddim, dpm, rtol=0, atol=1e-10)


# --- distributions ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddpm_chain_samples():
    """Samples on DDPM's own 1000-step linear chain from one large prior draw (t_min = 1e-3: the exact output law is
    the mixture with component std shrunk by under 2e-4, far below the distances compared here)."""
    schedule = SCHEDULES["ddpm-linear"]
    model = exact_model(MIX, schedule)
    x_T = prior(schedule, 50_000, 2, seed=4)
    runs = {"dpm++2m-20": (DPMSolverPP(2, spacing="logsnr"), 20), "ddpm-100": (DDPM(), 100),
            "ddpm-10": (DDPM(), 10), "ddim-10": (DDIM(), 10)}
    return {key: (run(solver, model, x_T, steps, seed=5), solver.nfe(steps)) for key, (solver, steps) in runs.items()}


def test_dpm_solver_20_calls_at_least_as_good_as_ddpm_100(ddpm_chain_samples):
    (dpm, dpm_nfe), (ddpm, ddpm_nfe) = ddpm_chain_samples["dpm++2m-20"], ddpm_chain_samples["ddpm-100"]
    assert (dpm_nfe, ddpm_nfe) == (20, 100)
    d_dpm, d_ddpm = sliced_wasserstein(dpm, MIX), sliced_wasserstein(ddpm, MIX)
    assert d_dpm <= d_ddpm, f"DPM-Solver++ 20 calls: {d_dpm:.4f}, DDPM 100 calls: {d_ddpm:.4f}"
    assert moment_errors(dpm, MIX)[1] <= moment_errors(ddpm, MIX)[1]


def test_ddim_beats_ddpm_at_10_calls(ddpm_chain_samples):
    d_ddim = sliced_wasserstein(ddpm_chain_samples["ddim-10"][0], MIX)
    d_ddpm = sliced_wasserstein(ddpm_chain_samples["ddpm-10"][0], MIX)
    assert d_ddim < d_ddpm, f"DDIM 10 calls: {d_ddim:.4f}, DDPM 10 calls: {d_ddpm:.4f}"


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_samples_match_mixture(name):
    """Every sampler with 50 grid points on the VP-SDE: distance, mean and covariance close to the data."""
    model = exact_model(MIX, VP)
    out = run(SOLVERS[name], model, prior(VP, 10_000, 2, seed=6), steps=50)
    mean_err, cov_err = moment_errors(out, MIX)
    assert sliced_wasserstein(out, MIX) < 0.06 and mean_err < 0.04 and cov_err < 0.12, (mean_err, cov_err)


@pytest.fixture(scope="module")
def reference_outputs():
    return {name: reference_output(MIX, schedule, 20_000, seed=7) for name, schedule in SCHEDULES.items()}


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
def test_every_solver_on_every_schedule(reference_outputs, schedule_name):
    """Finite samples close in distribution to E[x0 | x_tmin], x_tmin ~ p_tmin (what an exact sampler returns)."""
    schedule = SCHEDULES[schedule_name]
    x_T = prior(schedule, 1000, 2, seed=8)
    failures = {}
    for name, solver in SOLVERS.items():
        out = run(solver, exact_model(MIX, schedule), x_T, steps=25)
        assert torch.isfinite(out).all(), name
        distance = sliced_wasserstein(out, reference_outputs[schedule_name])
        # Euler in uniform t on the VE-SDE (sigma grows 5000-fold exponentially) needs far more than 25 steps.
        if distance > (0.4 if (name, schedule_name) == ("euler", "ve-sde") else 0.15):
            failures[name] = distance
    assert not failures, failures


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
def test_prediction_types_give_the_same_samples(schedule_name):
    """A network output as x0, v, score or velocity (exactly converted) samples what the eps network samples."""
    schedule = SCHEDULES[schedule_name]
    x_T = prior(schedule, 64, 2, seed=9)
    for name, solver in SOLVERS.items():
        eps_out = run(solver, exact_model(MIX, schedule), x_T, steps=6, seed=10)
        for kind in ("x0", "v", "score", "velocity"):
            out = run(solver, exact_model(MIX, schedule, kind), x_T, steps=6, seed=10)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, eps_out, rtol=1e-6, atol=1e-6, msg=f"{name} with {kind} on {schedule_name}")


# --- bookkeeping: seeds, NFE, grids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STOCHASTIC)
def test_same_generator_same_samples(name):
    model = exact_model(MIX, VP)
    x_T = prior(VP, 100, 2, seed=11)
    a, b, c = (run(SOLVERS[name], model, x_T, 10, seed=s) for s in (1, 1, 2))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    s1, s2 = (model.sample((100, 2), solver=SOLVERS[name], steps=10, generator=torch.Generator().manual_seed(3))
              for _ in range(2))
    assert torch.equal(s1, s2)


def test_ddpm_is_ddim_with_eta_one():
    model = exact_model(MIX, VP)
    x_T = prior(VP, 100, 2, seed=12)
    assert torch.equal(run(DDPM(), model, x_T, 10, seed=4), run(DDIM(eta=1.0), model, x_T, 10, seed=4))


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_network_calls_equal_nfe(name, steps):
    model = exact_model(MIX, VP)
    run(SOLVERS[name], model, prior(VP, 8, 2, seed=0), steps)
    assert model.denoiser.calls == SOLVERS[name].nfe(steps)


def test_nfe_formula():
    assert DDPM().nfe(100) == 100 and DPMSolverPP(2).nfe(20) == 20 and Heun().nfe(11) == 21
    assert DPMSolverPP(3, multistep=False).nfe(5) == 13


@pytest.mark.parametrize("spacing", ["uniform", "logsnr", "quadratic"])
@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
def test_timesteps(spacing, schedule_name):
    schedule = SCHEDULES[schedule_name]
    grid = make_timesteps(schedule, 17, spacing)
    assert grid.shape == (17,) and grid[0] == schedule.t_max and grid[-1] == schedule.t_min
    assert (grid[1:] < grid[:-1]).all()
    if spacing == "logsnr":
        gaps = schedule.log_snr(grid).diff()
        torch.testing.assert_close(gaps, gaps.mean().expand_as(gaps), rtol=1e-8, atol=1e-8)


def test_uniform_grid_is_ddpm_chain():
    schedule = SCHEDULES["ddpm-linear"]
    grid = make_timesteps(schedule, schedule.num_steps, "uniform")
    torch.testing.assert_close(grid * schedule.num_steps, torch.arange(1000, 0, -1, dtype=torch.float64))


# --- DDIM's per-step Gaussian ----------------------------------------------------------------------------------


def test_ddpm_step_is_textbook_posterior():
    """On the chain's own grid, the DDPM step is q(x_{n-1} | x_n, x0) of Ho et al. (2020), eqs. 6-7."""
    schedule = SCHEDULES["ddpm-linear"]
    model = exact_model(MIX, schedule)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    betas, alpha_bar = schedule.betas, torch.cumprod(1 - schedule.betas, 0)
    for n in (2, 10, 500, 1000):  # step n -> n - 1, 1-based
        t = torch.full((16,), n / 1000, dtype=torch.float64)
        dist = DDPM().step_distribution(model, x, t, t - 1e-3)
        ab_n, ab_prev, beta = alpha_bar[n - 1], alpha_bar[n - 2], betas[n - 1]
        mean = ab_prev.sqrt() * beta / (1 - ab_n) * dist.x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_n) * x
        torch.testing.assert_close(dist.mean, mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(dist.std, ((1 - ab_prev) / (1 - ab_n) * beta).sqrt().expand_as(x), rtol=1e-9,
                                   atol=1e-12)


def test_step_distribution_log_prob():
    model = exact_model(MIX, VP)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    t, s = torch.full((32,), 0.6, dtype=torch.float64), torch.full((32,), 0.5, dtype=torch.float64)
    dist = DDIM(eta=0.7).step_distribution(model, x, t, s)
    x_s = dist.mean + dist.std * torch.randn(32, 2, generator=gen, dtype=torch.float64)
    expected = torch.distributions.Normal(dist.mean, dist.std).log_prob(x_s).sum(-1)
    torch.testing.assert_close(dist.log_prob(x_s), expected, rtol=1e-12, atol=1e-12)


def test_sample_trajectory():
    model = exact_model(MIX, VP)
    solver, steps = DDIM(eta=1.0), 8
    x_T = prior(VP, 16, 2, seed=13)
    traj = solver.sample_trajectory(model, x_T, steps=steps, generator=torch.Generator().manual_seed(6))
    assert len(traj.latents) == steps and traj.log_probs.shape == (16, steps - 1) and traj.times.shape == (steps,)
    assert torch.equal(traj.latents[0], x_T)
    torch.testing.assert_close(traj.sample, run(solver, model, x_T, steps, seed=6), rtol=0, atol=1e-12)
    for k in range(steps - 1):  # each log-prob is that of the next latent under the step from the current one
        t, s = traj.times[k].expand(16), traj.times[k + 1].expand(16)
        lp = solver.step_distribution(model, traj.latents[k], t, s).log_prob(traj.latents[k + 1])
        torch.testing.assert_close(traj.log_probs[:, k], lp)
    with pytest.raises(ValueError, match="eta > 0"):
        DDIM(eta=0.0).sample_trajectory(model, x_T, steps=steps)


def test_bad_options():
    with pytest.raises(ValueError, match="eta"):
        DDIM(eta=1.5)
    with pytest.raises(ValueError, match="order"):
        DPMSolverPP(order=4)
    with pytest.raises(ValueError, match="unknown solver"):
        make_solver("rk45")
    with pytest.raises(ValueError, match="unknown spacing"):
        make_timesteps(VP, 10, "cubic")
    with pytest.raises(ValueError, match="steps"):
        make_timesteps(VP, 0)
    assert isinstance(make_solver("euler"), Euler) and math.isclose(make_solver("ddim", eta=0.3).eta, 0.3)
