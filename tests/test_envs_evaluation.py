"""evaluate(): reproducibility by seed, masking, normalised scores, shape checks; SB3 evaluate_policy adapter."""

from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv

from envs import EvalResult, OfflineDataset, SB3PolicyAdapter, evaluate, load_dataset
from envs.toy import PointNavExpert


class ZeroPolicy:
    def __init__(self, act_dim: int) -> None:
        self.act_dim, self.resets = act_dim, 0

    def reset(self) -> None:
        self.resets += 1

    def act(self, obs: np.ndarray) -> np.ndarray:
        return np.zeros((len(obs), self.act_dim), np.float32)


def test_hopper_zero_policy_reproducible_and_independent_of_num_envs():
    a = evaluate(ZeroPolicy(3), "Hopper-v5", episodes=4, seed=7, num_envs=4)
    b = evaluate(ZeroPolicy(3), "Hopper-v5", episodes=4, seed=7, num_envs=3)  # batches of 3 then 1
    np.testing.assert_array_equal(a.returns, b.returns)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    c = evaluate(ZeroPolicy(3), "Hopper-v5", episodes=4, seed=8)
    assert not np.array_equal(a.returns, c.returns)
    # each episode equals a single-env rollout seeded seed + i
    env = gym.make("Hopper-v5")
    env.reset(seed=7 + 2)
    total, steps, done = 0.0, 0, False
    while not done:
        _, r, term, trunc, _ = env.step(np.zeros(3))
        total, steps, done = total + r, steps + 1, term or trunc
    assert a.returns[2] == pytest.approx(total) and a.lengths[2] == steps
    # normalised with D4RL's hopper reference scores, looked up by env id
    np.testing.assert_allclose(a.normalized, 100 * (a.returns + 20.272305) / (3234.3 + 20.272305))
    assert a.stderr == pytest.approx(a.returns.std(ddof=1) / 2)


def test_max_episode_steps_and_policy_reset_per_batch():
    policy = ZeroPolicy(3)
    res = evaluate(policy, "Hopper-v5", episodes=5, seed=0, num_envs=2, max_episode_steps=10)
    assert res.lengths.max() <= 10 and policy.resets == 3
    single = evaluate(ZeroPolicy(3), gym.make("Hopper-v5"), episodes=2, seed=0, max_episode_steps=10)
    np.testing.assert_array_equal(single.returns, res.returns[:2])
    d = res.to_dict()
    assert d["returns"] == res.returns.tolist() and isinstance(d["normalized_mean"], float)


def test_pointnav_expert_from_dataset_with_progress():
    data = load_dataset("toy:pointnav", n_episodes=4)
    for route in ("up", "down"):
        res = evaluate(PointNavExpert(route), data, episodes=3, seed=0, progress=True)
        assert isinstance(res, EvalResult) and res.normalized is None
        assert (res.lengths < 30).all() and (res.returns > 15).all()
    a = evaluate(PointNavExpert("up", noise=0.3, seed=1), "diffrl/PointNav-v0", episodes=3, seed=5)
    b = evaluate(PointNavExpert("up", noise=0.3, seed=1), "diffrl/PointNav-v0", episodes=3, seed=5)
    np.testing.assert_array_equal(a.returns, b.returns)


def test_shape_mismatch_between_dataset_and_env():
    rng = np.random.default_rng(0)
    wrong = OfflineDataset(rng.standard_normal((10, 5)), rng.standard_normal((10, 3)), np.zeros(10),
                           name="wrong", env_id="Hopper-v5")
    with pytest.raises(ValueError, match=r"dataset 'wrong' has obs_dim=5, act_dim=3 but env 'Hopper-v5'"):
        evaluate(ZeroPolicy(3), wrong, episodes=1)


def test_bad_policy_output_shape():
    with pytest.raises(ValueError, match="policy.act returned actions of shape"):
        evaluate(ZeroPolicy(2), "Hopper-v5", episodes=1)


def test_sb3_evaluate_policy_through_adapter():
    env = gym.make("diffrl/PointNav-v0")
    returns, lengths = evaluate_policy(SB3PolicyAdapter(PointNavExpert("down")), env, n_eval_episodes=3,
                                       return_episode_rewards=True, warn=False)
    assert len(returns) == 3 and min(returns) > 15 and max(lengths) < 30
    mean, _ = evaluate_policy(SB3PolicyAdapter(ZeroPolicy(3)), gym.make("Hopper-v5"), n_eval_episodes=2, warn=False)
    assert np.isfinite(mean)


class CountingEnv(gym.Env):
    """Observation (step in the episode, env index, 0); episodes of ``length`` steps."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def __init__(self, index: int, length: int) -> None:
        self.index, self.length, self.t = index, length, 0

    def _obs(self) -> np.ndarray:
        return np.array([self.t, self.index, 0.0], np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), 1.0, self.t >= self.length, False, {}


def test_sb3_evaluate_policy_with_two_envs_keeps_each_envs_action_queue():
    from agents.diffusion_actor import DiffusionActor
    from agents.policy import Policy

    torch.manual_seed(0)
    actor = DiffusionActor(3, 2, n_obs_steps=2, horizon=6, action_start=1, net="unet1d",
                           net_kwargs={"dims": (8, 16), "time_dim": 8}, steps=2)
    planned = []  # (step in episode, env) of the newest observation of every planned row
    forward = actor.forward

    def spy(obs, generator=None):
        planned.extend((int(t), int(env)) for t, env in obs[:, -1, :2].tolist())
        return forward(obs, generator)

    actor.forward = spy
    identity = SimpleNamespace(mean=torch.zeros(3), std=torch.ones(3))
    policy = Policy(actor, identity, n_obs_steps=2, n_action_steps=3, seed=0)
    venv = DummyVecEnv([lambda: CountingEnv(0, 4), lambda: CountingEnv(1, 7)])
    returns, lengths = evaluate_policy(SB3PolicyAdapter(policy), venv, n_eval_episodes=4,
                                       return_episode_rewards=True, warn=False)
    assert sorted(lengths) == [4, 4, 7, 7]
    # each env plans at the start of its own episodes and every 3 steps after: env 0's new episodes (every 4 steps)
    # never cut env 1's queue short (once env 0 has its 2 episodes, SB3 flags it as starting at every step)
    assert [t for t, env in planned if env == 1] == [0, 3, 6, 0, 3, 6]
    assert [t for t, env in planned if env == 0][:4] == [0, 3, 0, 3]
    assert planned[:2] == [(0, 0), (0, 1)]  # the first call plans both envs at once
