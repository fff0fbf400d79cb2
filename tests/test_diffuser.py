"""Diffuser: official defaults and presets, value guidance as the official sampler applies it, value targets,
normalisers, EMA, inpainting, receding-horizon policy, state round trips."""

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

from agents import AGENTS
from agents.diffuser import PRESETS, Diffuser, DiffuserActor, DiffuserConfig
from agents.planning import inpainted_denoising_loss, state_inpainting
from agents.policy import Policy, load_policy
from agents.presets import apply_preset
from diffrl.model import DiffusionModel
from envs import evaluate, load_dataset
from envs.datasets import Normalizer, OfflineDataset

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
    evaluate(policy, "diffrl/PointNav-v0", episodes=2, seed=0, max_episode_steps=4)
    assert len(calls) == 4  # two envs in one batch: one plan per step
    queued = agent.policy(seed=0, n_action_steps=2)
    calls.clear()
    queued.actor.register_forward_hook(lambda *args: calls.append(1))
    actions = [queued.act(np.zeros(2, np.float32)) for _ in range(4)]
    assert len(calls) == 2
    # the executed actions are the plan's first two, in raw units
    planned = agent.action_normalizer.denormalize(queued.actor.last_plan["actions"][0, :2]).numpy()
    np.testing.assert_allclose(np.stack(actions[2:]), planned, rtol=1e-5, atol=1e-6)


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


def official_posterior(schedule):
    """(variance, weight of x_t in the mean) of the DDPM posterior at chain steps n = 1..T (jannerm/diffuser)."""
    abar = torch.cumprod(1 - schedule.betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    return schedule.betas * (1 - abar_prev) / (1 - abar), (1 - abar_prev) * (1 - schedule.betas).sqrt() / (1 - abar)


class LinearValue(torch.nn.Module):
    """A known return model with a constant gradient: <w, x>."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, x, t, cond=None):
        return (self.w * x).sum((1, 2))


class ZeroX0(torch.nn.Module):
    """A denoiser that predicts x0 = 0 and records every x_t it is given."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x_t, t, cond=None):
        self.inputs.append(x_t.clone())
        return torch.zeros_like(x_t)


def test_guided_sampling_shifts_x_t_before_each_model_call():
    """Official n_step_guided_p_sample with a linear value V = <w, x>: before the model call at chain step n, x_t
    moves by n_guide_steps * scale * var_n * w with the current state put back; nothing at the last t_stopgrad
    steps. With x0 = 0 and the same draws, the guided and unguided inputs differ by d_n = c_n d_{n+1} + shift_n,
    c_n the posterior mean's weight of x_t."""
    config = DiffuserConfig(**{**TINY, "n_candidates": 1, "t_stopgrad": 3, "n_guide_steps": 2})  # DDPM, all T = 10
    w = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(0))
    obs = torch.tensor([[0.3, -0.2], [0.1, 0.5]])
    inputs = {}
    for scale in (0.0, 0.7):
        actor = DiffuserActor(dataclasses.replace(config, guide_scale=scale), 2, 2)
        actor.value, actor.model.denoiser = LinearValue(w), ZeroX0()
        actor.plan(obs, torch.Generator().manual_seed(1))
        inputs[scale] = actor.model.denoiser.inputs
        assert len(inputs[scale]) == 10
        for x in inputs[scale]:
            torch.testing.assert_close(x[:, 0, :2], obs)  # the current state is held at every call
    var, weight = official_posterior(actor.model.schedule)
    free = torch.ones(1, 8, 4)
    free[:, 0, :2] = 0
    expected = torch.zeros(2, 8, 4)
    for k, n in enumerate(range(10, 0, -1)):
        if k:
            expected = weight[n].float() * expected  # the DDPM step from chain step n + 1 to n
        if n > config.t_stopgrad:
            expected = expected + free * 2 * 0.7 * var[n - 1].float() * w
        torch.testing.assert_close(inputs[0.7][k] - inputs[0.0][k], expected, rtol=1e-4, atol=1e-6)


def test_plan_is_the_candidate_with_the_highest_value(monkeypatch):
    actor = DiffuserActor(DiffuserConfig(**{**TINY, "n_candidates": 3}), 2, 2)
    actor.value = HeightValue()
    candidates = torch.randn(2 * 3, 8, 4, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(actor, "sample_candidates", lambda obs, generator=None, goal=None: candidates)
    plan = actor.plan(torch.zeros(2, 2))
    heights = candidates[..., 1].mean(1).view(2, 3)
    best = candidates.view(2, 3, 8, 4)[torch.arange(2), heights.argmax(1)]
    torch.testing.assert_close(plan["states"], best[..., :2])
    torch.testing.assert_close(plan["actions"], best[..., 2:])
    torch.testing.assert_close(plan["values"], heights.max(1).values)


def test_value_targets_are_raw_discounted_penalised_returns(nav):
    # one episode ending in a terminal after three steps, then one cut by a timeout
    data = OfflineDataset(torch.zeros(5, 1), torch.zeros(5, 1), torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0]),
                          terminals=torch.tensor([0, 0, 1, 0, 0]), timeouts=torch.tensor([0, 0, 0, 0, 1]))
    agent = Diffuser.from_dataset(data, DiffuserConfig(horizon=2, dims=(8, 16)))
    g = 0.997  # the official planner's value discount, -100 at terminals
    expected = [1 + g * 2 + g**2 * (3 - 100), 2 + g * (3 - 100), 3 - 100, 5 + g * 7, 7]
    torch.testing.assert_close(agent.sequences(data).returns_to_go[:, 0], torch.tensor(expected))
    # the return model regresses them unnormalised: with a zero output the loss is the mean squared target
    agent = make_agent(nav)
    head = agent.nets.value.head[-1]
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    batch = agent.batch_sampler(nav)(16, torch.Generator().manual_seed(0))
    metrics = agent.update(batch)
    assert float(metrics["value_loss"]) == pytest.approx(float(batch["returns_to_go"][:, 0].pow(2).mean()), rel=1e-5)


def test_limits_normalizer_maps_each_feature_range_to_unit_interval(nav):
    data = torch.tensor([[0.0, 10.0], [2.0, 30.0], [1.0, 20.0]])
    torch.testing.assert_close(Normalizer.limits(data).normalize(data),
                               torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]))
    agent = make_agent(nav, normalizer="limits")
    for norm, field in ((agent.obs_normalizer, nav.observations), (agent.action_normalizer, nav.actions)):
        normalised = norm.normalize(field)
        torch.testing.assert_close(normalised.min(0).values, -torch.ones(2))
        torch.testing.assert_close(normalised.max(0).values, torch.ones(2))
    with pytest.raises(ValueError, match="normalizer"):
        DiffuserConfig(normalizer="cdf")


def test_ema_copies_the_weights_until_ema_start_then_averages_every_ema_every(nav):
    agent = make_agent(nav, ema_start=2, ema_every=2, train_value=False, guide_scale=0.0)
    learner = agent.learner

    def params(module):
        return [p.detach().clone() for p in module.parameters()]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    ema, weights = [], []
    for _ in range(4):
        train(agent, nav, steps=1)
        ema.append(params(learner.ema_module))
        weights.append(params(learner.module))
    assert same(ema[0], weights[0]) and same(ema[1], weights[1])  # updates 1, 2: a copy
    assert same(ema[2], ema[1]) and not same(ema[2], weights[2])  # update 3: no EMA step (3 % 2 != 0)
    assert not same(ema[3], ema[2]) and not same(ema[3], weights[3])  # update 4: averaged


def test_defaults_are_the_official_locomotion_settings():
    c = DiffuserConfig()
    assert (c.horizon, c.diffusion_steps, c.prediction, c.action_weight) == (32, 20, "x0", 10.0)
    assert (c.discount, c.termination_penalty, c.ema_decay, c.ema_start, c.ema_every) == (0.997, -100.0, 0.995, 2000,
                                                                                          10)
    assert (c.n_candidates, c.guide_scale, c.n_guide_steps, c.t_stopgrad, c.solver) == (64, 0.1, 2, 2, "ddpm")
    assert Diffuser.default_batch_size == 64
    agent = Diffuser(c, 11, 3)
    unet = agent.nets.model.denoiser.unet
    assert [level[0].block1[0].out_channels for level in unet.down.blocks] == [32, 64, 128, 256]  # 32 x (1, 2, 4, 8)
    expected_weights = torch.ones(1, 32, 14)
    expected_weights[0, 0, 11:] = 10.0  # the first action only
    torch.testing.assert_close(agent._loss_weights, expected_weights)


def test_presets_are_the_official_per_task_rows():
    assert Diffuser.presets is PRESETS
    rows = {task: PRESETS[task].values for task in PRESETS}
    assert [(rows[f"maze2d-{m}"]["horizon"], rows[f"maze2d-{m}"]["diffusion_steps"]) for m in
            ("umaze", "medium", "large")] == [(128, 64), (256, 256), (384, 256)]
    assert rows["maze2d-medium"]["dims"] == (32, 128, 256) and rows["maze2d-medium"]["normalizer"] == "limits"
    assert (rows["hopper-medium-expert"]["guide_scale"], rows["hopper-medium-expert"]["t_stopgrad"]) == (1e-4, 4)
    assert (rows["halfcheetah-medium"]["horizon"], rows["halfcheetah-medium"]["guide_scale"]) == (4, 0.001)
    assert rows["walker2d-medium-replay"]["discount"] == 0.997
    for task in PRESETS:
        config, line = apply_preset(DiffuserConfig(), PRESETS, f"{task}-v2")
        assert "jannerm/diffuser" in line and all(getattr(config, k) == v for k, v in rows[task].items())


@pytest.mark.skipif(importlib.util.find_spec("gymnasium_robotics") is None,
                    reason="gymnasium-robotics is not installed")
def test_maze2d_preset_plans_from_the_observation_to_the_evaluation_goal(tmp_path):
    from envs import maze

    for name in maze.MAZES:  # the preset's goal is the evaluation task's
        np.testing.assert_allclose(PRESETS[name].values["goal"], maze.eval_goal_state(name))
    path = maze.collect_maze("maze2d-umaze", 800, seed=2, out_dir=tmp_path, formats=("hdf5",))["hdf5"]
    dataset = load_dataset(path)
    config, line = apply_preset(DiffuserConfig(), PRESETS, path)
    assert "maze2d-umaze" in line and config.goal_conditioned and not config.train_value
    config = dataclasses.replace(config, horizon=16, diffusion_steps=8, dims=(8, 16))
    torch.manual_seed(0)
    agent = Diffuser.from_dataset(dataset, config)
    train(agent, dataset, steps=3)
    obs = dataset.observations[[5, 300]].numpy()
    states = agent.plan(obs, torch.Generator().manual_seed(0))["states"]
    assert states.shape == (2, 16, 4)
    np.testing.assert_allclose(states[:, 0], obs, atol=1e-5)
    np.testing.assert_allclose(states[:, -1], np.tile(maze.eval_goal_state("maze2d-umaze"), (2, 1)), atol=1e-5)
    follower = maze.PlanFollower(lambda o: agent.plan(o, torch.Generator().manual_seed(0))["states"])
    result = evaluate(follower, "maze2d-umaze", episodes=2, seed=0, max_episode_steps=20)
    assert result.lengths.tolist() == [20, 20] and result.normalized_mean is not None
