"""Diffuser: shapes, inpainting, value guidance, receding-horizon policy, state round trips."""

import numpy as np
import pytest
import torch

from agents import AGENTS
from agents.diffuser import Diffuser, DiffuserActor, DiffuserConfig
from agents.planning import inpainted_denoising_loss, state_inpainting
from agents.policy import Policy, load_policy
from diffrl.model import DiffusionModel
from envs import evaluate, load_dataset

TINY = {"horizon": 8, "diffusion_steps": 10, "dims": (8, 16), "n_candidates": 3, "sampling_steps": 10}


@pytest.fixture(scope="module")
def nav():
    return load_dataset("toy:pointnav", n_episodes=20)


def make_agent(dataset, **kw) -> Diffuser:
    torch.manual_seed(0)
    return Diffuser.from_dataset(dataset, DiffuserConfig(**{**TINY, **kw}))


def train(agent, dataset, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = agent.batch_sampler(dataset)
    return [{k: float(v) for k, v in agent.update(sample(16, gen)).items()} for _ in range(steps)]


def test_registered():
    assert AGENTS["diffuser"] == (DiffuserConfig, Diffuser)


def test_update_metrics_and_plan_shapes(nav):
    agent = make_agent(nav)
    metrics = train(agent, nav)[-1]
    assert {"diffusion_loss", "value_loss", "diffusion_grad_norm", "value_grad_norm"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    plan = agent.plan(nav.observations[:5].numpy(), torch.Generator().manual_seed(0))
    assert plan["states"].shape == (5, 8, 2) and plan["actions"].shape == (5, 8, 2)
    assert plan["values"].shape == (5,)
    actor = agent.actor(n_action_steps=2)
    actions = actor(torch.zeros(4, 1, 2))
    assert actions.shape == (4, 2, 2)
    assert actor.last_plan["states"].shape == (4, 8, 2)


@pytest.mark.parametrize("solver", ["ddpm", "dpm-solver++"])
def test_inpainting_holds_current_state_and_goal(nav, solver):
    agent = make_agent(nav, goal_conditioned=True, train_value=False, guide_scale=0.0)
    train(agent, nav)
    obs = nav.observations[[0, 7, 30]].numpy()
    goal = np.array([0.8, 0.0], dtype=np.float32)
    plan = agent.plan(obs, torch.Generator().manual_seed(1), solver=solver, goal=tuple(goal))
    np.testing.assert_allclose(plan["states"][:, 0], obs, atol=1e-5)
    np.testing.assert_allclose(plan["states"][:, -1], np.broadcast_to(goal, (3, 2)), atol=1e-5)
    assert plan["values"] is None


def test_goal_conditioned_plan_needs_goal(nav):
    agent = make_agent(nav, goal_conditioned=True, train_value=False, guide_scale=0.0)
    with pytest.raises(ValueError, match="goal"):
        agent.plan(nav.observations[:1].numpy())


class HeightValue(torch.nn.Module):
    """A known return model: the mean normalised height (second state feature) of the plan."""

    def forward(self, x, t, cond=None):
        return x[..., 1].mean(1)


def test_value_guidance_raises_predicted_value(nav):
    # eps prediction: the sample follows the guided x_t even where the barely trained x0 estimate ignores x_t
    agent = make_agent(nav, n_candidates=1, termination_penalty=0.0, prediction="eps")
    train(agent, nav, steps=5)
    obs = agent.obs_normalizer.normalize(nav.observations[:32])
    values = {}
    for scale, guide_steps in ((0.0, 1), (0.5, 1), (0.5, 2)):
        actor = agent.actor(guide_scale=scale, n_guide_steps=guide_steps)
        actor.value = HeightValue()
        values[scale, guide_steps] = actor.plan(obs, torch.Generator().manual_seed(3))["values"]
    assert (values[0.5, 1] - values[0.0, 1]).mean() > 0.2
    assert (values[0.5, 1] > values[0.0, 1]).float().mean() > 0.9
    assert (values[0.5, 2] - values[0.5, 1]).mean() > 0.1  # a second guide step per denoising step pushes further


def test_candidates_are_ranked_by_value(nav):
    agent = make_agent(nav, guide_scale=0.0, termination_penalty=0.0)
    train(agent, nav)
    obs = nav.observations[:16].numpy()
    best = agent.plan(obs, torch.Generator().manual_seed(4), n_candidates=8)["values"]
    single = agent.plan(obs, torch.Generator().manual_seed(4), n_candidates=1)["values"]
    assert best.mean() > single.mean()


class HeldOffset(torch.nn.Module):
    """A fake denoiser that outputs ``offset`` on the held entries and 0 elsewhere."""

    def __init__(self, mask, offset):
        super().__init__()
        self.mask, self.offset = mask, offset

    def forward(self, x_t, t, cond=None):
        return torch.where(self.mask, self.offset, torch.zeros_like(x_t))


def test_loss_ignores_held_entries(nav):
    schedule = make_agent(nav).nets.model.schedule
    x0 = torch.randn(4, 8, 4)
    held = state_inpainting(x0, x0[:, 0, :2])
    losses = [inpainted_denoising_loss(DiffusionModel(HeldOffset(held.mask, offset), schedule, "x0"), x0, held,
                                       generator=torch.Generator().manual_seed(0)) for offset in (0.0, 100.0)]
    assert torch.allclose(losses[0], losses[1])
    assert torch.allclose(losses[0], x0[~held.mask].pow(2).mean())


def test_receding_horizon_policy_acts_in_pointnav(nav):
    agent = make_agent(nav, goal_conditioned=True, train_value=False, guide_scale=0.0, n_candidates=1,
                       goal=(0.8, 0.0))
    train(agent, nav)
    policy = agent.policy(seed=0)
    assert isinstance(policy, Policy)
    calls = []
    policy.actor.register_forward_hook(lambda *args: calls.append(1))
    result = evaluate(policy, "diffrl/PointNav-v0", episodes=2, seed=0, max_episode_steps=4)
    assert result.lengths.tolist() == [4, 4]
    assert len(calls) == 4  # two envs in one batch: one plan per step
    queued = agent.policy(seed=0, n_action_steps=2)
    calls.clear()
    queued.actor.register_forward_hook(lambda *args: calls.append(1))
    action = [queued.act(np.zeros(2, np.float32)) for _ in range(4)]
    assert len(calls) == 2 and action[0].shape == (2,)


def test_state_dict_round_trip_gives_identical_plans(nav, tmp_path):
    agent = make_agent(nav)
    train(agent, nav)
    state = agent.state_dict()
    torch.save(state, tmp_path / "agent.pt")
    other = make_agent(nav)
    other.load_state_dict(torch.load(tmp_path / "agent.pt", weights_only=True))
    obs = nav.observations[:4].numpy()
    a = agent.plan(obs, torch.Generator().manual_seed(5))
    b = other.plan(obs, torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(a["states"], b["states"])
    np.testing.assert_array_equal(a["values"], b["values"])
    metrics = []
    for a in (agent, other):
        torch.manual_seed(9)
        metrics.append(train(a, nav, steps=2, seed=9)[-1])
    assert metrics[0] == pytest.approx(metrics[1], rel=1e-5)


def test_policy_file_round_trip(nav, tmp_path):
    agent = make_agent(nav, goal=(0.8, 0.0), goal_conditioned=True)
    train(agent, nav)
    policy = agent.policy(seed=3)
    path = policy.save(tmp_path / "policy.pt")
    loaded = load_policy(path)
    assert isinstance(loaded.actor, DiffuserActor)
    obs = nav.observations[:2].numpy()
    np.testing.assert_allclose(policy.act(obs), loaded.act(obs), atol=1e-6)


def test_bad_planning_override(nav):
    agent = make_agent(nav)
    with pytest.raises(ValueError, match="cannot override"):
        agent.policy(horizon=4)
    with pytest.raises(ValueError, match="needs the return model"):
        DiffuserConfig(train_value=False)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_export_of_unguided_plans_and_refusal_of_guided_ones(nav, tmp_path):
    agent = make_agent(nav, goal=(0.8, 0.0), goal_conditioned=True, train_value=False, guide_scale=0.0)
    train(agent, nav)
    module = torch.jit.load(str(agent.policy(seed=0).export_torchscript(tmp_path / "plan.ts")))
    actions = module(nav.observations[:2, None])
    assert actions.shape == (2, 1, nav.act_dim) and torch.isfinite(actions).all()
    with pytest.raises(ValueError, match="Policy.save"):
        make_agent(nav).policy(seed=0).export_torchscript(tmp_path / "guided.ts")
