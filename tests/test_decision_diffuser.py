"""Decision Diffuser: official defaults, the return condition, the masked inverse-dynamics loss, the tempered DDPM
sampler, inpainting, classifier-free guidance, policy, state round trips."""

import numpy as np
import pytest
import torch

from agents import AGENTS
from agents.decision_diffuser import (
    PRESETS,
    DecisionDiffuser,
    DecisionDiffuserActor,
    DecisionDiffuserConfig,
    TemperedDDPM,
)
from agents.policy import Policy, load_policy
from diffrl.model import DiffusionModel
from diffrl.schedules import DiscreteVP
from diffrl.solvers import DDPM
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


def test_condition_is_the_return_to_go_at_the_window_start_over_returns_scale(nav):
    agent = make_agent(nav, returns_scale=50.0)
    seen = []
    agent.nets.model.denoiser.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))
    windows = agent.sequences(nav)
    idx = torch.tensor([0, 5, 17, len(windows) - 1])
    agent.update(windows[idx])
    # by hand: discount 0.99 to the end of the episode, -100 on a terminal reward
    rewards = nav.rewards - 100.0 * nav.terminals.float()
    expected = []
    for start, end in zip(windows.start[idx].tolist(), windows.episode_end[idx].tolist(), strict=True):
        expected.append(sum(0.99**k * float(rewards[start + k]) for k in range(end - start)) / 50.0)
    assert bool(nav.terminals.any())
    torch.testing.assert_close(seen[0], torch.tensor(expected)[:, None])


def test_inverse_dynamics_loss_leaves_out_padded_steps(nav):
    agent = make_agent(nav)
    windows = agent.sequences(nav)
    last = torch.nonzero(~windows.mask[:, -1])[:4, 0]  # windows running past their episode's end
    batch = windows[torch.cat([torch.tensor([0, 1]), last])]
    assert not bool(batch["mask"].all())
    obs = agent.obs_normalizer.normalize(batch["observations"])
    act = agent.action_normalizer.normalize(batch["actions"])
    errors = []
    with torch.no_grad():
        for b in range(len(obs)):
            for t in range(obs.shape[1] - 1):
                if batch["mask"][b, t + 1]:  # a real next state: a real transition
                    predicted = agent.nets.inverse_dynamics(obs[b, t], obs[b, t + 1])
                    errors.append((predicted - act[b, t]).pow(2).mean())
    metrics = agent.update(batch)
    assert float(metrics["inverse_dynamics_loss"]) == pytest.approx(float(torch.stack(errors).mean()), rel=1e-5)


class ZeroEps(torch.nn.Module):
    def forward(self, x_t, t, cond=None):
        return torch.zeros_like(x_t)


def test_tempered_ddpm_scales_the_step_noise():
    model = DiffusionModel(ZeroEps(), DiscreteVP.linear(10), "eps")
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(solver):
        return solver.sample(model, x_T, steps=10, generator=torch.Generator().manual_seed(1))

    torch.testing.assert_close(run(TemperedDDPM(1.0)), run(DDPM()), rtol=0, atol=0)
    # with eps = 0 the chain is linear in x_T and in the step noise: halving the noise halves its contribution
    noiseless = run(TemperedDDPM(0.0))
    torch.testing.assert_close(run(TemperedDDPM(0.5)) - noiseless, 0.5 * (run(DDPM()) - noiseless))
    # the precomputed plan of unguided sampling draws the same tempered noise
    planned = model.sample((64, 3), solver=TemperedDDPM(0.5), steps=10, x_T=x_T,
                           generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(planned, run(TemperedDDPM(0.5)))


def test_defaults_are_the_official_settings():
    c = DecisionDiffuserConfig()
    assert (c.horizon, c.diffusion_steps, c.prediction, c.clip_x0, c.normalizer) == (100, 200, "eps", 1.0, "limits")
    assert (c.cond_drop_prob, c.guidance_weight, c.target_return, c.discount) == (0.25, 1.2, 0.9, 0.99)
    assert (c.termination_penalty, c.returns_scale, c.ema_start, c.ema_every) == (-100.0, 400.0, 2000, 10)
    assert DecisionDiffuser.default_batch_size == 64 and DecisionDiffuser.presets is PRESETS
    unet = DecisionDiffuserActor(c, 11, 3).model.denoiser.unet
    assert [level[0].block1[0].out_channels for level in unet.down.blocks] == [128, 512, 1024]  # 128 x (1, 4, 8)
    assert unet.mid1.film.in_features == 128  # time (and return) embedding of width dim


def test_update_metrics_and_plan_shapes(nav):
    agent = make_agent(nav)
    metrics = train(agent, nav)[-1]
    assert {"diffusion_loss", "inverse_dynamics_loss"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    plan = agent.plan(nav.observations[:5].numpy(), torch.Generator().manual_seed(0))
    assert plan["states"].shape == (5, 8, 2) and plan["actions"].shape == (5, 7, 2)
    np.testing.assert_allclose(plan["values"], 0.9 * 400.0, rtol=1e-6)  # target_return x returns_scale
    assert agent.actor(n_action_steps=3)(torch.zeros(4, 1, 2)).shape == (4, 3, 2)


@pytest.mark.parametrize("sampler", [{"solver": "dpm-solver++"},  # the default
                                     {"solver": "ddpm", "sampling_steps": None, "temperature": 0.5}])  # official
def test_inpainting_holds_current_state(nav, sampler):
    agent = make_agent(nav)
    train(agent, nav)
    obs = nav.observations[[0, 7, 30]].numpy()
    plan = agent.plan(obs, torch.Generator().manual_seed(1), **sampler)
    np.testing.assert_allclose(plan["states"][:, 0], obs, atol=1e-5)
    assert agent.obs_normalizer.normalize(torch.as_tensor(plan["states"])).abs().max() <= 1.0 + 1e-5  # x0 clip


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
    losses = [m["inverse_dynamics_loss"] for m in train(agent, nav, steps=300, batch_size=32)]
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
    evaluate(policy, "diffrl/PointNav-v0", episodes=2, seed=0, max_episode_steps=3)
    # the executed action is the inverse dynamics between the first two planned states, in raw units
    action = policy.act(nav.observations[3].numpy())
    states = policy.actor.last_plan["states"]
    with torch.no_grad():
        expected = policy.actor.inverse_dynamics(states[0, 0], states[0, 1])
    np.testing.assert_allclose(action, agent.action_normalizer.denormalize(expected).numpy(), rtol=1e-5, atol=1e-6)


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
