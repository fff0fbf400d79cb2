"""Checks shared by the offline-RL agent tests (Diffusion-QL, QGPO, IDQL) on a tiny 2-D bandit."""

import numpy as np
import torch

from agents.policy import Policy, load_policy
from diffrl.checkpoint import load_checkpoint, save_checkpoint
from envs import load_dataset
from envs.toy import bandit_reward_fn

BANDIT = "toy:bandit-8gaussians"


def bandit(n: int = 2000):
    return load_dataset(BANDIT, n=n, seed=0)


def train(agent, dataset, steps: int, batch_size: int = 128, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    metrics = {}
    for _ in range(steps):
        metrics = agent.update(dataset.sample(batch_size, g))
    return metrics


def mean_reward(policy, n: int = 400) -> float:
    actions = policy.act(np.zeros((n, 1), dtype=np.float32))
    return float(bandit_reward_fn(BANDIT.removeprefix("toy:"))(actions).mean())


def check_metrics(metrics: dict, keys: set) -> None:
    assert keys <= set(metrics), f"missing metrics {keys - set(metrics)}"
    assert all(np.isfinite(v) for v in metrics.values()), metrics


def check_state_round_trip(make_agent, dataset, tmp_path) -> None:
    """Save -> load into a fresh agent: same weights, same actions, and the next update matches exactly."""
    a = make_agent()
    train(a, dataset, 3)
    path = save_checkpoint(tmp_path / "agent.pt", {"agent": a.state_dict()}, a.kind)
    b = make_agent()
    b.load_state_dict(load_checkpoint(path, expected_kind=a.kind)["agent"])
    for key in a.modules:
        for (name, x), (_, y) in zip(a.modules[key].state_dict().items(), b.modules[key].state_dict().items(),
                                     strict=True):
            assert torch.equal(x, y), f"{key}.{name} differs after loading"
    obs = np.zeros((5, 1), dtype=np.float32)
    np.testing.assert_array_equal(a.policy(seed=3).act(obs), b.policy(seed=3).act(obs))
    batch = dataset.sample(16, torch.Generator().manual_seed(7))
    torch.manual_seed(11)
    ma = a.update(batch)
    torch.manual_seed(11)
    mb = b.update(batch)
    assert ma == mb


def check_policy(agent, tmp_path) -> None:
    """policy() is the shared Policy; single and batched act; a saved policy reproduces its actions."""
    policy = agent.policy(seed=0)
    assert isinstance(policy, Policy)
    single = policy.act(np.zeros(1, dtype=np.float32))
    assert single.shape == (2,) and single.dtype == np.float32
    batch = policy.act(np.zeros((4, 1), dtype=np.float32))
    assert batch.shape == (4, 2) and np.all(np.abs(batch) <= 1.0 + 1e-5)
    policy.save(tmp_path / "policy.pt")
    loaded = load_policy(tmp_path / "policy.pt")
    policy.reset()
    obs = np.zeros((4, 1), dtype=np.float32)
    np.testing.assert_allclose(loaded.act(obs), policy.act(obs), atol=1e-6)
