"""evaluate(): reproducibility by seed, masking, normalised scores, shape checks; SB3 evaluate_policy adapter."""

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.evaluation import evaluate_policy

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
