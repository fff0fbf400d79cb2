"""SamplingPlan (precomputed solver runs) reproduces Solver.sample for every affine solver and prediction type."""

import itertools

import pytest
import torch

from diffrl.model import DiffusionModel
from diffrl.nets import ResidualMLP
from diffrl.schedules import VPSDE, DiscreteVP, LinearFlow, TrigFlow
from diffrl.solvers import DDIM, DDPM, DPMSolverPP, Euler, EulerMaruyama, Heun, SamplingPlan

SOLVERS = [DDPM(), DDIM(), DDIM(eta=0.5), DPMSolverPP(order=1), DPMSolverPP(), DPMSolverPP(order=3), Euler(),
           EulerMaruyama()]


@pytest.mark.parametrize("schedule", [DiscreteVP.vp(5), VPSDE(), LinearFlow(), TrigFlow()], ids=type)
def test_plan_matches_solver_sample(schedule):
    torch.manual_seed(0)
    net = ResidualMLP(3, 4, hidden=32, depth=2)
    cond = torch.randn(6, 4)
    for prediction, clip, solver, steps in itertools.product(["eps", "x0", "v", "velocity"], [None, 1.0], SOLVERS,
                                                             [1, 2, 5, 8]):
        model = DiffusionModel(net, schedule, prediction, clip_x0=clip)
        plan = SamplingPlan.build(model, solver, steps)
        x_T = torch.randn(6, 3)
        expected = solver.sample(model, x_T, cond, steps=steps, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            got = plan(x_T, cond, torch.Generator().manual_seed(1))
        scale = expected.abs().max().clamp_min(1.0)
        assert (got - expected).abs().max() / scale < 1e-3, (prediction, clip, solver, steps)


def test_plan_is_none_for_solvers_without_affine_steps():
    model = DiffusionModel(ResidualMLP(2, 0, hidden=16, depth=1), DiscreteVP.vp(5))
    assert SamplingPlan.build(model, Heun(), 4) is None
    assert SamplingPlan.build(model, DPMSolverPP(multistep=False), 4) is None


def test_plan_draws_fresh_noise_per_call_and_is_seeded():
    model = DiffusionModel(ResidualMLP(2, 0, hidden=16, depth=1), DiscreteVP.vp(5))
    plan = SamplingPlan.build(model, DDPM(), 5)
    x_T = torch.zeros(4, 2)
    g = torch.Generator().manual_seed(3)
    a, b = plan(x_T, None, g), plan(x_T, None, g)
    assert not torch.allclose(a, b)
    assert torch.equal(a, plan(x_T, None, torch.Generator().manual_seed(3)))


def test_model_sample_uses_one_cached_plan_per_solver_kind_and_keeps_gradients():
    torch.manual_seed(0)
    model = DiffusionModel(ResidualMLP(3, 4, hidden=32, depth=2), DiscreteVP.vp(5), clip_x0=1.0)
    assert model.sampling_plan(DDPM(), 5) is model.sampling_plan(DDPM(), 5)
    assert model.sampling_plan(DDIM(), 5) is not model.sampling_plan(DDPM(), 5)
    assert model.sampling_plan(Heun(), 5) is None
    cond, x_T = torch.randn(6, 4), torch.randn(6, 3)

    def run_and_grads(sample):
        model.zero_grad()
        out = sample(torch.Generator().manual_seed(1))
        out.pow(2).sum().backward()
        return out.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]

    fast, fast_grads = run_and_grads(lambda g: model.sample(x_T.shape, cond, solver=DDPM(), steps=5, x_T=x_T,
                                                            grad=True, generator=g))
    slow, slow_grads = run_and_grads(lambda g: DDPM().sample(model, x_T, cond, steps=5, grad=True, generator=g))
    assert torch.allclose(fast, slow, atol=1e-5)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)
    assert any(g.abs().sum() > 0 for g in fast_grads)
