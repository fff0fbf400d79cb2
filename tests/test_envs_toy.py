"""Toy tasks: bandit rewards peak where documented; PointNav env, scripted expert and dataset."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from envs import load_dataset
from envs.toy import BANDITS, PointNavEnv, PointNavExpert, bandit_reward_fn, dataset_routes, episode_route


@pytest.mark.parametrize("name", sorted(BANDITS))
def test_bandit_reward_peaks_at_documented_in_support_action(name):
    data = load_dataset(f"toy:bandit-{name}", n=4000, seed=0)
    assert (data.obs_dim, data.act_dim, data.n_episodes, len(data)) == (1, 2, 4000, 4000)
    assert bool(data.terminals.all()) and bool((data.observations == 0).all())
    reward = bandit_reward_fn(f"bandit-{name}")
    best = np.array(BANDITS[name].best_action)
    assert reward(best) == pytest.approx(1.0)
    assert float(data.rewards.max()) <= 1.0 and float(data.rewards.max()) > 0.95  # behaviour covers the peak
    assert float(data.rewards.mean()) < 0.3  # most behaviour actions are far from it
    np.testing.assert_allclose(reward(data.actions.numpy()), data.rewards.numpy(), rtol=1e-6)
    assert torch.allclose(reward(data.actions), data.rewards)
    assert reward(best + np.array([0.3, 0.0])) == pytest.approx(np.exp(-0.5))


def test_pointnav_passes_check_env_and_reports_info():
    check_env(gym.make("diffrl/PointNav-v0").unwrapped, skip_render_check=True)
    env = PointNavEnv()
    env.reset(seed=0)
    env._pos = np.array([-0.35, 0.0])
    _, reward, terminated, _, info = env.step(np.array([1.0, 0.0]))  # would enter the obstacle
    assert info["hit_obstacle"] and not info["reached_goal"] and not terminated and reward < 0
    env._pos = np.array([0.65, 0.0])
    _, reward, terminated, _, info = env.step(np.array([1.0, 0.0]))
    assert terminated and info["reached_goal"] and reward > 5


@pytest.mark.parametrize("route", ["up", "down"])
def test_scripted_expert_reaches_goal_on_both_routes(route):
    env = gym.make("diffrl/PointNav-v0")
    expert = PointNavExpert(route, noise=0.2, seed=0)
    for ep in range(5):
        obs, _ = env.reset(seed=ep)
        path, hits, done = [obs], 0, False
        while not done:
            obs, _, terminated, truncated, info = env.step(expert.act(obs)[0])
            path.append(obs)
            hits += info["hit_obstacle"]
            done = terminated or truncated
        assert info["reached_goal"] and hits == 0
        assert episode_route(np.array(path)) == route


def test_pointnav_dataset_has_both_routes_and_is_deterministic():
    data = load_dataset("toy:pointnav", n_episodes=20, seed=3)
    routes = dataset_routes(data)
    assert routes.count("up") == 10 and routes.count("down") == 10
    assert int(data.terminals.sum()) == 20 and data.env_id == "diffrl/PointNav-v0"
    again = load_dataset("toy:pointnav", n_episodes=20, seed=3)
    assert torch.equal(data.actions, again.actions)
