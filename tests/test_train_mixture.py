"""End to end: a small ResidualMLP trained on an 8-mode 2-D mixture samples every mode, as diffusion and as flow."""

import math

import pytest
import torch

from diffrl.analytic import GaussianMixture
from diffrl.model import DiffusionModel
from diffrl.nets.mlp import ResidualMLP
from diffrl.schedules import VPSDE, LinearFlow
from diffrl.solvers import DPMSolverPP, Euler

MODE_STD = 0.1
ANGLES = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
RING = GaussianMixture(torch.stack([ANGLES.cos(), ANGLES.sin()], 1) * 1.5, torch.full((2,), MODE_STD))


def train(schedule, prediction: str, steps: int, seed: int) -> DiffusionModel:
    """A 3x128 ResidualMLP trained with DiffusionModel.loss (Adam, cosine learning rate, batch 256)."""
    torch.manual_seed(seed)
    model = DiffusionModel(ResidualMLP(2, hidden=128, depth=3), schedule, prediction)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model.loss(RING.sample(256, gen).float(), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model


def check_modes(samples: torch.Tensor) -> None:
    """Every mode gets at least half its share of samples and few samples lie far (> 4 std) from every mode."""
    dist = torch.cdist(samples.double(), RING.means)
    nearest = dist.argmin(1)
    share = torch.bincount(nearest, minlength=8).double() / len(samples)
    assert (share >= 0.5 / 8).all(), share
    far = (dist.min(1).values > 4 * MODE_STD).double().mean().item()  # exact samples: exp(-8) = 0.03%
    assert far < 0.1, far


def sample(model, solver, steps):
    return model.sample((4000, 2), solver=solver, steps=steps, generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
def test_diffusion_model_reproduces_all_modes():
    model = train(VPSDE(), "eps", steps=3000, seed=0)
    check_modes(sample(model, DPMSolverPP(2), steps=20))


@pytest.mark.slow
def test_flow_matching_reproduces_all_modes():
    model = train(LinearFlow(), "velocity", steps=3000, seed=1)
    check_modes(sample(model, Euler(), steps=30))
