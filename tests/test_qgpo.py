import math

import numpy as np
import pytest
import torch
from offline_rl_checks import bandit, check_metrics, check_policy, check_state_round_trip, mean_reward, train

from agents.qgpo import QGPO, QGPOConfig, contrastive_energy_loss
from diffrl.solvers import DPMSolverPP

SMALL = dict(hidden=32, critic_hidden=32, energy_hidden=32, depth=2, critic_depth=2, energy_depth=2, n_support=4,
             support_steps=3, sample_steps=5)


def make_agent(**kw):
    return QGPO.from_dataset(bandit(), QGPOConfig(**{**SMALL, **kw}))


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


def test_guidance_scale_zero_is_the_behaviour_sampler():
    agent = make_agent()
    train(agent, bandit(), 3)
    obs = torch.randn(6, 1)

    def guided(scale):
        actor = agent.build_actor(guidance_scale=scale)
        actor.behavior.clip_x0 = None  # an untrained model saturates the clip; compare raw samples
        return actor(obs.unsqueeze(1), torch.Generator().manual_seed(5))[:, 0]

    agent.behavior.clip_x0 = None
    g = torch.Generator().manual_seed(5)
    x_T = agent.behavior.schedule.prior((6, 2), generator=g)
    plain = DPMSolverPP().sample(agent.behavior, x_T, obs, steps=SMALL["sample_steps"], generator=g)
    torch.testing.assert_close(guided(0.0), plain, rtol=0, atol=0)
    assert (guided(5.0) - plain).abs().max() > 1e-4


def test_warmup_then_critic_and_energy_updates():
    agent = make_agent(behavior_warmup_steps=2)
    dataset = bandit()
    g = torch.Generator().manual_seed(0)
    assert set(agent.update(dataset.sample(8, g))) == {"behavior_loss"}
    agent.update(dataset.sample(8, g))
    check_metrics(agent.update(dataset.sample(8, g)), {"behavior_loss", "critic_loss", "energy_loss", "q_mean"})
    assert agent.critic_learner.num_steps == agent.energy_learner.num_steps == 1
    assert agent.support_actions(torch.zeros(5, 1)).shape == (5, 4, 2)


def test_policy_and_config_errors(tmp_path):
    check_policy(make_agent(), tmp_path)
    with pytest.raises(ValueError, match="n_support"):
        QGPOConfig(n_support=1)
    with pytest.raises(ValueError, match="guidance_scale"):
        QGPOConfig(guidance_scale=-1.0)


def test_state_dict_round_trip(tmp_path):
    check_state_round_trip(make_agent, bandit(), tmp_path)


@pytest.mark.slow
def test_bandit_guidance_raises_reward_and_stays_on_support():
    dataset = bandit(4000)
    torch.manual_seed(0)
    agent = QGPO.from_dataset(dataset, QGPOConfig(**{**SMALL, "hidden": 64, "critic_hidden": 64, "energy_hidden": 64,
                                                     "n_support": 8, "beta": 20.0, "behavior_lr": 1e-3,
                                                     "behavior_warmup_steps": 300}))
    train(agent, dataset, 500, batch_size=256)
    behaviour, guided = agent.policy(seed=0, guidance_scale=0.0), agent.policy(seed=0, guidance_scale=1.0)
    assert mean_reward(guided) > max(mean_reward(behaviour), dataset.rewards.mean().item()) + 0.1

    def support_distance(policy):
        actions = torch.as_tensor(policy.act(np.zeros((300, 1), dtype=np.float32)))
        return torch.cdist(actions, dataset.actions).min(1).values.median().item()

    assert support_distance(guided) < support_distance(behaviour) + 0.05  # guidance keeps samples on the data


def test_torchscript_export_refuses_the_guided_actor_clearly(tmp_path):
    with pytest.raises(ValueError, match="Policy.save"):
        make_agent().policy(seed=0).export_torchscript(tmp_path / "qgpo.ts")
