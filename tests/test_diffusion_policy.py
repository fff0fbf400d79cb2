"""DiffusionPolicy: window sampling with start/end padding, chunk execution through the Policy, backbones, config
checks and a short training run."""

import numpy as np
import pytest
import torch

from agents import AGENTS
from agents.diffusion_policy import DiffusionPolicy, DiffusionPolicyConfig, WindowSampler
from envs.datasets import OfflineDataset

SMALL = dict(horizon=8, n_obs_steps=2, n_action_steps=4, dims=(8, 16), time_dim=8, total_steps=100, warmup_steps=5)


def dataset(lengths=(5, 7, 3)):
    """Episodes whose observation and action at step k of episode e both equal 100 e + k."""
    values = np.concatenate([100 * e + np.arange(n) for e, n in enumerate(lengths)]).astype(np.float32)
    ends = np.zeros(len(values), bool)
    ends[np.cumsum(lengths) - 1] = True
    return OfflineDataset(np.stack([values, -values], 1), values[:, None], np.zeros(len(values), np.float32),
                          terminals=ends)


def test_registered():
    assert AGENTS["diffusion_policy"] == (DiffusionPolicyConfig, DiffusionPolicy)


def test_windows_pad_at_episode_start_and_end():
    data = dataset()
    sampler = WindowSampler(data, horizon=4, n_obs_steps=3)
    assert len(sampler) == (5 + 7 + 3) + 2 * 3
    batch = sampler(4000, torch.Generator().manual_seed(0))
    obs = batch["observations"][..., 0]
    assert torch.equal(batch["actions"][..., 0], obs)
    episode, step = obs // 100, obs % 100
    assert (episode == episode[:, :1]).all()  # never crosses an episode
    diffs = step[:, 1:] - step[:, :-1]
    assert ((diffs == 0) | (diffs == 1)).all()
    repeats_at_start = (diffs[:, 0] == 0) & (step[:, 0] == 0)
    repeats_at_end = (diffs[:, -1] == 0) & ~repeats_at_start
    assert repeats_at_start.any() and repeats_at_end.any()
    # start padding: the first observation repeated up to n_obs_steps - 1 = 2 times, then consecutive steps
    starts = {tuple(r.tolist()) for r in step[repeats_at_start]}
    assert starts == {(0, 0, 0, 1), (0, 0, 1, 2)}  # shifted by 2 and by 1 (episode lengths >= 3)


def test_policy_executes_chunks_from_the_newest_observation():
    data = dataset()
    agent = DiffusionPolicy.from_dataset(data, DiffusionPolicyConfig(**SMALL))
    policy = agent.policy(seed=0)
    assert (policy.n_obs_steps, policy.n_action_steps) == (2, 4)
    actor = policy.actor
    assert actor.action_start == 1 and actor.steps == 10 and actor.solver.name == "ddim"
    out = actor(torch.zeros(3, 2, 2))
    assert out.shape == (3, 7, 1)  # horizon - action_start
    actions = [policy.act(np.array([1.0, -1.0])) for _ in range(9)]
    assert np.array(actions).shape == (9, 1)
    low, high = data.actions.min().item(), data.actions.max().item()
    assert all(low - 1e-4 <= a[0] <= high + 1e-4 for a in actions)


@pytest.mark.parametrize("net, extra", [("unet1d", {}), ("dit1d", dict(d_model=16, n_layers=1, heads=2)),
                                        ("mlp", dict(hidden=32, depth=2))])
def test_backbones_train_and_sample(net, extra):
    data = dataset()
    agent = DiffusionPolicy.from_dataset(data, DiffusionPolicyConfig(**SMALL, net=net, **extra))
    sampler = agent.batch_sampler(data)
    metrics = agent.update(sampler(16, torch.Generator().manual_seed(0)))
    assert np.isfinite(metrics["loss"])
    assert agent.policy(seed=0, solver="dpm-solver++", steps=5).act(np.zeros((2, 2))).shape == (2, 1)


def test_state_dict_round_trip():
    data = dataset()
    config = DiffusionPolicyConfig(**SMALL, ema_decay=0.5)
    agent = DiffusionPolicy.from_dataset(data, config)
    sampler = agent.batch_sampler(data)
    for _ in range(3):
        agent.update(sampler(16))
    clone = DiffusionPolicy(config, 2, 1)
    clone.load_state_dict(agent.state_dict())
    obs = np.array([[3.0, -3.0]])
    assert np.array_equal(agent.policy(seed=4).act(obs), clone.policy(seed=4).act(obs))


@pytest.mark.parametrize("kw, match", [(dict(net="cnn"), "net must be"), (dict(n_obs_steps=9), "n_obs_steps"),
                                       (dict(n_action_steps=8), "n_action_steps")])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        DiffusionPolicyConfig(**{**SMALL, **kw})


def test_short_training_lowers_the_loss():
    torch.manual_seed(0)
    data = dataset((30, 30))
    agent = DiffusionPolicy.from_dataset(data, DiffusionPolicyConfig(**{**SMALL, "total_steps": 150}, lr=3e-3))
    sampler = agent.batch_sampler(data)
    generator = torch.Generator().manual_seed(0)
    losses = [agent.update(sampler(32, generator))["loss"] for _ in range(150)]
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20])
