"""Decision Diffuser: shapes, inpainting, classifier-free guidance, inverse dynamics, policy, state round trips."""

import numpy as np
import pytest
import torch

from agents import AGENTS
from agents.decision_diffuser import DecisionDiffuser, DecisionDiffuserActor, DecisionDiffuserConfig
from agents.policy import Policy, load_policy
from envs import evaluate, load_dataset

TINY = {"horizon": 8, "diffusion_steps": 10, "dims": (8, 16), "sampling_steps": 6, "inverse_dynamics_hidden": 32}


@pytest.fixture(scope="module")
def nav():
    return load_dataset("toy:pointnav", n_episodes=20)


def make_agent(dataset, **kw) -> DecisionDiffuser:
    torch.manual_seed(0)
    return DecisionDiffuser.from_dataset(dataset, DecisionDiffuserConfig(**{**TINY, **kw}))


def train(agent, dataset, steps=3, seed=0, batch_size=16):
    gen = torch.Generator().manual_seed(seed)
    sample = agent.batch_sampler(dataset)
    return [agent.update(sample(batch_size, gen)) for _ in range(steps)]


def test_registered():
    assert AGENTS["decision_diffuser"] == (DecisionDiffuserConfig, DecisionDiffuser)


def test_return_condition_spans_unit_interval(nav):
    agent = make_agent(nav)
    returns = agent.return_normalizer.normalize(nav.returns_to_go(agent.config.discount))
    assert returns.min().item() == pytest.approx(0.0, abs=1e-6)
    assert returns.max().item() == pytest.approx(1.0, abs=1e-6)


def test_update_metrics_and_plan_shapes(nav):
    agent = make_agent(nav)
    metrics = train(agent, nav)[-1]
    assert {"diffusion_loss", "inverse_dynamics_loss"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    plan = agent.plan(nav.observations[:5].numpy(), torch.Generator().manual_seed(0))
    assert plan["states"].shape == (5, 8, 2) and plan["actions"].shape == (5, 7, 2)
    expected = agent.return_normalizer.denormalize(torch.tensor(agent.config.target_return)).item()
    np.testing.assert_allclose(plan["values"], expected, rtol=1e-6)
    assert agent.actor(n_action_steps=3)(torch.zeros(4, 1, 2)).shape == (4, 3, 2)


@pytest.mark.parametrize("solver", ["ddpm", "dpm-solver++"])
def test_inpainting_holds_current_state(nav, solver):
    agent = make_agent(nav)
    train(agent, nav)
    obs = nav.observations[[0, 7, 30]].numpy()
    plan = agent.plan(obs, torch.Generator().manual_seed(1), solver=solver)
    np.testing.assert_allclose(plan["states"][:, 0], obs, atol=1e-5)


def test_guidance_weight_changes_plans(nav):
    agent = make_agent(nav)
    train(agent, nav)
    obs = nav.observations[:8].numpy()
    plans = {w: agent.plan(obs, torch.Generator().manual_seed(2), guidance_weight=w)["states"] for w in (1.0, 1.8)}
    again = agent.plan(obs, torch.Generator().manual_seed(2), guidance_weight=1.8)["states"]
    np.testing.assert_array_equal(plans[1.8], again)
    assert np.abs(plans[1.8] - plans[1.0])[:, 1:].mean() > 1e-3


def test_target_return_changes_plans(nav):
    agent = make_agent(nav)
    train(agent, nav)
    obs = nav.observations[:8].numpy()
    low, high = (agent.plan(obs, torch.Generator().manual_seed(2), target_return=r)["states"] for r in (0.0, 1.0))
    assert np.abs(high - low)[:, 1:].mean() > 1e-3


def test_inverse_dynamics_trains(nav):
    agent = make_agent(nav, inverse_dynamics_lr=3e-3)
    losses = [m["inverse_dynamics_loss"] for m in train(agent, nav, steps=150, batch_size=32)]
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:5])
    # against predicting the mean action, on the dataset's transitions (a = (s' - s) / 0.1 off the walls)
    norm = agent.obs_normalizer.normalize
    with torch.no_grad():
        predicted = agent.action_normalizer.denormalize(
            agent.nets.inverse_dynamics(norm(nav.observations), norm(nav.next_observations)))
    error = (predicted - nav.actions).abs().mean()
    baseline = (nav.actions.mean(0) - nav.actions).abs().mean()
    assert error < 0.5 * baseline


def test_policy_acts_in_pointnav(nav):
    agent = make_agent(nav)
    train(agent, nav)
    policy = agent.policy(seed=0)
    assert isinstance(policy, Policy)
    result = evaluate(policy, "diffrl/PointNav-v0", episodes=2, seed=0, max_episode_steps=3)
    assert result.lengths.tolist() == [3, 3]


def test_state_dict_round_trip_and_policy_file(nav, tmp_path):
    agent = make_agent(nav)
    train(agent, nav)
    torch.save(agent.state_dict(), tmp_path / "agent.pt")
    other = make_agent(nav, cond_drop_prob=0.5)
    other.load_state_dict(torch.load(tmp_path / "agent.pt", weights_only=True))
    obs = nav.observations[:4].numpy()
    np.testing.assert_array_equal(agent.plan(obs, torch.Generator().manual_seed(5))["states"],
                                  other.plan(obs, torch.Generator().manual_seed(5))["states"])
    policy = agent.policy(seed=3)
    loaded = load_policy(policy.save(tmp_path / "policy.pt"))
    assert isinstance(loaded.actor, DecisionDiffuserActor)
    np.testing.assert_allclose(policy.act(obs), loaded.act(obs), atol=1e-6)


def test_bad_config():
    with pytest.raises(ValueError, match="cond_drop_prob"):
        DecisionDiffuserConfig(cond_drop_prob=0.0)
    with pytest.raises(ValueError, match="n_action_steps"):
        DecisionDiffuserConfig(horizon=4, n_action_steps=4)
