"""QGPO pieces: losses and targets, the official sampler, network sizes, presets, policy and config checks.

The two training phases, the support actions and exact resume are in tests/test_qgpo_phases.py.
"""

import math

import numpy as np
import pytest
import torch
from offline_rl_checks import bandit, check_policy, check_state_round_trip, mean_reward, train

from agents.presets import apply_preset
from agents.qgpo import (
    QGPO,
    EnergyNetwork,
    QGPOConfig,
    SinglestepDPMSolver2,
    contrastive_energy_loss,
    draw_samples,
    in_support_q_target,
    in_support_value,
    iql_locomotion_scale,
    perturb_support,
    singlestep_orders,
)
from diffrl.analytic import ExactDenoiser, GaussianMixture
from diffrl.model import DiffusionModel
from diffrl.schedules import VPSDE
from envs.datasets import OfflineDataset

SMALL = dict(hidden=8, time_dim=8, critic_hidden=16, critic_depth=2, energy_hidden=16, energy_depth=2, n_support=4,
             support_steps=3, sample_steps=3, reward_transform="none", behavior_batch_size=64)


def make_agent(**kw):
    return QGPO.from_dataset(bandit(), QGPOConfig(**{**SMALL, **kw}))


# ------------------------------------------------------------------------------------------------- losses
def test_contrastive_energy_loss_values_and_optimum():
    q = torch.tensor([[0.0, 1.0, 2.0]])
    # uniform energies: cross-entropy of any target against uniform is log K
    assert contrastive_energy_loss(torch.zeros(1, 3), q, beta=3.0).item() == pytest.approx(math.log(3))
    # the optimum is f = beta Q + const: the gradient vanishes there
    f = (3.0 * q + 5.0).requires_grad_(True)
    contrastive_energy_loss(f, q, beta=3.0).backward()
    assert f.grad.abs().max() < 1e-6
    g = torch.zeros(1, 3, requires_grad=True)
    contrastive_energy_loss(g, q, beta=3.0).backward()
    assert g.grad.abs().max() > 0.1


def test_in_support_soft_value_and_q_target_by_hand():
    q_next = torch.tensor([[0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    e = math.e
    # softmax(1 * [0, 1]) = [1, e] / (1 + e): V = e / (1 + e); equal values: V = the value
    torch.testing.assert_close(in_support_value(q_next, 1.0), torch.tensor([e / (1 + e), 2.0], dtype=torch.float64))
    # temperature 0: the mean over the K actions; large: the max
    torch.testing.assert_close(in_support_value(q_next, 0.0), torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert in_support_value(q_next, 200.0)[0].item() == pytest.approx(1.0)
    rewards = torch.tensor([1.0, 2.0], dtype=torch.float64)
    terminals = torch.tensor([0.0, 1.0], dtype=torch.float64)
    target = in_support_q_target(rewards, terminals, q_next, q_alpha=1.0, gamma=0.99)
    torch.testing.assert_close(target, torch.tensor([1.0 + 0.99 * e / (1 + e), 2.0], dtype=torch.float64))


def test_perturbed_support_is_alpha_a_plus_sigma_eps_with_one_time_per_state():
    schedule = VPSDE(0.1, 20.0)
    support = torch.arange(2 * 3 * 2, dtype=torch.float64).view(2, 3, 2) / 10
    noise = torch.full_like(support, 0.5)
    t = torch.tensor([0.2, 0.9], dtype=torch.float64)
    x_t, t_k = perturb_support(schedule, support, t, noise)
    assert t_k.shape == (2, 3) and torch.equal(t_k, t[:, None].expand(2, 3))
    log_alpha = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1  # the official marginal_prob_std
    alpha, sigma = log_alpha.exp()[:, None, None], (1 - (2 * log_alpha).exp()).sqrt()[:, None, None]
    torch.testing.assert_close(x_t, alpha * support + sigma * noise)


def test_iql_reward_scale_uses_complete_episodes():
    # episodes (terminal / timeout ends): returns 3, 10, and a trailing unfinished one of 100 that is left out
    rewards = np.array([1.0, 2.0, 5.0, 5.0, 100.0])
    data = OfflineDataset(np.zeros((5, 1)), np.zeros((5, 1)), rewards, terminals=[0, 1, 0, 0, 0],
                          timeouts=[0, 0, 0, 1, 0])
    assert iql_locomotion_scale(data) == pytest.approx(1000.0 / 7.0)
    agent = QGPO.from_dataset(data, QGPOConfig(**{**SMALL, "reward_transform": "iql_locomotion"}))
    assert agent.reward_affine == (pytest.approx(1000.0 / 7.0), 0.0)
    antmaze = QGPO.from_dataset(data, QGPOConfig(**{**SMALL, "reward_transform": "iql_antmaze"}))
    assert antmaze.reward_affine == (1.0, -1.0)


# ------------------------------------------------------------------------------------------------- sampler
def test_official_solver_orders_calls_and_accuracy():
    assert singlestep_orders(15) == [2] * 7 + [1] and sum(singlestep_orders(15)) == 15
    assert singlestep_orders(4) == [2, 1, 1] and singlestep_orders(1) == [1]
    schedule = VPSDE(0.1, 20.0)
    mu, std = torch.tensor([[0.5, -1.0]], dtype=torch.float64), torch.tensor([[0.7, 1.3]], dtype=torch.float64)
    exact = ExactDenoiser(GaussianMixture(mu, std), schedule)
    model = DiffusionModel(exact, schedule, prediction="eps")
    x_T = torch.randn(512, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ends = torch.tensor([1.0, schedule.t_min], dtype=torch.float64)
    a, s = schedule.alpha(ends), schedule.sigma(ends)
    # the probability-flow ODE of Gaussian data keeps z = (x_t - a mu) / sqrt(a^2 std^2 + s^2) fixed
    z = (x_T - a[0] * mu) / (a[0] ** 2 * std**2 + s[0] ** 2).sqrt()
    expected = a[1] * mu + (a[1] ** 2 * std**2 + s[1] ** 2).sqrt() * z
    errors = {}
    for calls in (15, 61):
        exact.calls = 0
        out = SinglestepDPMSolver2().sample(model, x_T, None, steps=calls)
        assert exact.calls == calls  # network calls, as the official --diffusion_steps
        errors[calls] = (out - expected).abs().mean().item()
    # uniform-t steps converge at about second order: 4x the calls, ~10x smaller error (0.042 -> 0.0040)
    assert errors[15] < 0.06 and errors[61] < errors[15] / 6


def test_guidance_scale_zero_is_the_behaviour_sampler():
    agent = make_agent()
    train(agent, bandit(), 3)
    obs = torch.randn(6, 1)

    def guided(scale):
        actor = agent.build_actor(guidance_scale=scale)
        actor.action_clip = None  # compare raw samples
        return actor(obs.unsqueeze(1), torch.Generator().manual_seed(5))[:, 0]

    plain = draw_samples(agent.behavior, obs, 2, SMALL["sample_steps"], generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(guided(0.0), plain, rtol=0, atol=0)
    assert (guided(5.0) - plain).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------- sizes and presets
def test_default_networks_have_the_official_sizes():
    """Parameter counts of the official ScoreNet, GuidanceQt and TwinQ (diffusion_SDE/model.py) for hopper
    (obs 11, act 3), counted by instantiating them: 1,627,939, 210,721 and 271,362 trainable parameters."""
    agent = QGPO(QGPOConfig(), 11, 3)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert (count(agent.behavior), count(agent.energy), count(agent.critic)) == (1_627_939, 210_721, 271_362)
    assert isinstance(agent.energy, EnergyNetwork) and len(agent.energy.net.layers) == 4
    assert agent.default_batch_size == 256 and agent.config.behavior_batch_size == 4096
    assert QGPOConfig().phase_steps() == (600_000, 500_000)  # no budget given: the official 600k + 1M (Q: 500k)
    assert QGPOConfig(total_steps=16_000).phase_steps() == (6_000, 5_000)  # the official split of a short run


def test_presets_cover_the_paper_tasks_with_their_sources():
    presets = QGPO.presets
    assert {"hopper-medium-replay", "halfcheetah-medium", "walker2d-medium-expert", "antmaze-medium-play",
            "antmaze-large-diverse"} <= set(presets)
    assert presets["antmaze-medium-play"].values == {"n_support": 32, "reward_transform": "iql_antmaze"}
    assert presets["hopper-medium-replay"].values == {"n_support": 16, "reward_transform": "iql_locomotion"}
    assert all("train_critic.py" in p.source and "dataset.py" in p.source for p in presets.values())
    config, line = apply_preset(QGPOConfig(), presets, "antmaze-medium-play-v2")
    assert config.n_support == 32 and config.reward_transform == "iql_antmaze" and "train_critic.py" in line


# ------------------------------------------------------------------------------------------------- policy, config
def test_policy_and_config_errors(tmp_path):
    check_policy(make_agent(), tmp_path)
    with pytest.raises(ValueError, match="n_support"):
        QGPOConfig(n_support=1)
    with pytest.raises(ValueError, match="guidance_scale"):
        QGPOConfig(guidance_scale=-1.0)
    with pytest.raises(ValueError, match="reward_transform"):
        QGPOConfig(reward_transform="cql")
    with pytest.raises(ValueError, match="fraction"):
        QGPOConfig(behavior_fraction=1.5)


def test_state_dict_round_trip_in_the_behaviour_phase(tmp_path):
    check_state_round_trip(make_agent, bandit(), tmp_path)


def test_torchscript_export_refuses_the_guided_actor_clearly(tmp_path):
    with pytest.raises(ValueError, match="Policy.save"):
        make_agent().policy(seed=0).export_torchscript(tmp_path / "qgpo.ts")


@pytest.mark.slow
def test_bandit_guidance_raises_reward_and_stays_on_support():
    dataset = bandit(4000)
    torch.manual_seed(0)
    agent = QGPO.from_dataset(dataset, QGPOConfig(**{**SMALL, "hidden": 32, "time_dim": 16, "critic_hidden": 64,
                                                     "energy_hidden": 64, "n_support": 8, "beta": 20.0,
                                                     "behavior_lr": 1e-3, "behavior_batch_size": 256,
                                                     "support_steps": 5, "total_steps": 500,
                                                     "behavior_steps": 300}))
    sampler = agent.batch_sampler(dataset)
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        agent.update(sampler(256, g))
    behaviour, guided = agent.policy(seed=0, guidance_scale=0.0), agent.policy(seed=0, guidance_scale=1.0)
    assert mean_reward(guided) > max(mean_reward(behaviour), dataset.rewards.mean().item()) + 0.1

    def support_distance(policy):
        actions = torch.as_tensor(policy.act(np.zeros((300, 1), dtype=np.float32)))
        return torch.cdist(actions, dataset.actions).min(1).values.median().item()

    assert support_distance(guided) < support_distance(behaviour) + 0.05  # guidance keeps samples on the data
