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
