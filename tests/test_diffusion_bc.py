"""DiffusionBC and the Gaussian BC baseline: normalisation, updates, sampling settings, state dicts, and a tiny
training run on a multimodal bandit where diffusion must beat the Gaussian."""

import numpy as np
import pytest
import torch

from agents import AGENTS
from agents.baselines import GaussianBC, GaussianBCConfig
from agents.diffusion_bc import DiffusionBC, DiffusionBCConfig, minmax_normalizer
from diffrl.training import TrainConfig, Trainer
from envs.datasets import OfflineDataset

SMALL = dict(hidden=32, depth=2)


def dataset(n=64, seed=0):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, 3)).astype(np.float32)
    actions = np.stack([obs[:, 0] * 2 + 1, -obs[:, 1]], 1).astype(np.float32)
    return OfflineDataset(obs, actions, np.zeros(n, np.float32), terminals=np.arange(n) % 8 == 7)


def test_registered():
    assert AGENTS["diffusion_bc"] == (DiffusionBCConfig, DiffusionBC)
    assert AGENTS["gaussian_bc"] == (GaussianBCConfig, GaussianBC)


def test_minmax_normalizer_maps_data_range_to_unit_interval():
    actions = torch.tensor([[0.0, -3.0], [2.0, 1.0], [1.0, 0.0]])
    norm = minmax_normalizer(actions)
    scaled = norm.normalize(actions)
    assert torch.allclose(scaled.amin(0), torch.tensor([-1.0, -1.0]))
    assert torch.allclose(scaled.amax(0), torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("solver, steps", [("ddpm", 5), ("ddim", 3), ("dpm-solver++", 8), ("euler-maruyama", 6),
                                           ("euler", 4), ("heun", 3)])
def test_policy_with_any_solver_stays_in_data_range(solver, steps):
    data = dataset()
    agent = DiffusionBC.from_dataset(data, DiffusionBCConfig(**SMALL))
    for _ in range(3):
        metrics = agent.update(data.sample(32, torch.Generator().manual_seed(0)))
    assert np.isfinite(metrics["loss"]) and {"grad_norm", "lr"} <= set(metrics)
    policy = agent.policy(seed=0, solver=solver, steps=steps)
    assert policy.actor.steps == steps and policy.actor.solver.name == solver
    actions = policy.act(data.observations.numpy())
    low, high = data.actions.amin(0).numpy(), data.actions.amax(0).numpy()
    assert actions.shape == (64, 2) and np.all(actions >= low - 1e-5) and np.all(actions <= high + 1e-5)


def test_unknown_sampling_override_is_rejected():
    agent = DiffusionBC.from_dataset(dataset(), DiffusionBCConfig(**SMALL))
    with pytest.raises(ValueError, match="unknown sampling overrides"):
        agent.policy(hidden=3)


@pytest.mark.parametrize("cls, config", [(DiffusionBC, DiffusionBCConfig(**SMALL, ema_start=0)),
                                         (GaussianBC, GaussianBCConfig(**SMALL, deterministic=False))])
def test_state_dict_round_trip_restores_policy(cls, config):
    data = dataset()
    agent = cls.from_dataset(data, config)
    for _ in range(5):
        agent.update(data.sample(32))
    clone = cls(config, 3, 2)
    clone.load_state_dict(agent.state_dict())
    obs = data.observations[:10].numpy()
    assert np.array_equal(agent.policy(seed=1).act(obs), clone.policy(seed=1).act(obs))


MODES = np.array([[0.6, 0.6], [-0.6, -0.6]])


def bandit(n=2000, seed=0):
    """A 2-mode bandit: constant observation, actions at one of two points (std 0.05)."""
    rng = np.random.default_rng(seed)
    actions = (MODES[rng.integers(0, 2, n)] + 0.05 * rng.normal(size=(n, 2))).astype(np.float32)
    return OfflineDataset(np.zeros((n, 1), np.float32), actions, np.zeros(n, np.float32), terminals=np.ones(n, bool))


def in_mode_share(actions: np.ndarray, radius: float = 0.2) -> float:
    return float((np.linalg.norm(actions[:, None] - MODES[None], axis=-1).min(1) < radius).mean())


@pytest.mark.slow
def test_diffusion_bc_captures_modes_the_gaussian_averages():
    data = bandit()
    assert in_mode_share(data.actions.numpy()) > 0.99
    shares, sides = {}, {}
    for cls, config in [(DiffusionBC, DiffusionBCConfig(hidden=64, depth=2, lr=1e-3, ema_start=0, ema_decay=0.99,
                                                        ema_every=1)),
                        (GaussianBC, GaussianBCConfig(hidden=64, depth=2, lr=1e-3, deterministic=False))]:
        torch.manual_seed(0)
        agent = cls.from_dataset(data, config)
        Trainer(agent, data.sample, TrainConfig(steps=3000, batch_size=256, log_every=3000, progress=False)).fit()
        actions = agent.policy(seed=0).act(np.zeros((1000, 1), np.float32))
        shares[cls.kind], sides[cls.kind] = in_mode_share(actions), float((actions[:, 0] > 0).mean())
    assert shares["diffusion_bc"] > 0.5 and shares["diffusion_bc"] > 3 * shares["gaussian_bc"], shares
    assert 0.3 < sides["diffusion_bc"] < 0.7, sides  # both modes are drawn
