import pytest
import torch
from offline_rl_checks import bandit, check_metrics, check_policy, check_state_round_trip, mean_reward, train

from agents.diffusion_ql import DiffusionQL, DiffusionQLConfig

SMALL = dict(hidden=32, critic_hidden=32, depth=2, critic_depth=2, n_candidates=8, lr_schedule="constant",
             ema_start=0)


def make_agent(**kw):
    return DiffusionQL.from_dataset(bandit(), DiffusionQLConfig(**{**SMALL, **kw}))


def test_differentiable_sampling_reaches_actor_parameters():
    agent = make_agent()
    obs = torch.randn(8, 1)
    assert not agent.sample_actions(obs).requires_grad
    actions = agent.sample_actions(obs, grad=True)
    agent.critic.q(obs, actions).sum().backward()
    net = agent.actor.denoiser
    for layer in (net.stem, net.head, *net.layers):  # every layer of the chain's network gets a gradient
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_q_term_changes_the_actor_gradient():
    obs, actions = torch.randn(16, 1), torch.rand(16, 2) * 2 - 1

    def actor_grad(eta):
        agent = make_agent(eta=eta)
        torch.manual_seed(0)
        loss, info = agent.actor_loss(obs, actions)
        loss.backward()
        assert all(p.grad is None for p in agent.critic.parameters())  # the critic is frozen in the actor step
        return agent.actor.denoiser.stem.weight.grad, info

    torch.manual_seed(1)
    g0, _ = actor_grad(0.0)
    torch.manual_seed(1)
    g1, info = actor_grad(1.0)
    assert info["q_loss"] < 0 or info["q_loss"] > 0
    assert (g1 - g0).abs().max() > 1e-6


def test_update_metrics_and_target_tracking():
    agent = make_agent(tau=0.5)
    target_before = [p.clone() for p in agent.critic.target.parameters()]
    metrics = train(agent, bandit(), 2)
    check_metrics(metrics, {"critic_loss", "actor_loss", "bc_loss", "q_loss", "q_mean"})
    assert any(not torch.equal(a, b) for a, b in zip(target_before, agent.critic.target.parameters(), strict=True))
    assert agent.actor_learner.num_steps == agent.critic_learner.num_steps == 2


def test_selection_modes_and_policy(tmp_path):
    agent = make_agent()
    check_policy(agent, tmp_path)
    for selection in ("max", "none"):
        assert agent.policy(seed=0, selection=selection).act(torch.zeros(3, 1).numpy()).shape == (3, 2)
    with pytest.raises(ValueError, match="sampling option"):
        agent.policy(guidance_scale=1.0)
    with pytest.raises(ValueError, match="selection"):
        DiffusionQLConfig(selection="best")


def test_state_dict_round_trip(tmp_path):
    check_state_round_trip(make_agent, bandit(), tmp_path)


@pytest.mark.slow
def test_bandit_prefers_high_reward_actions():
    dataset = bandit(4000)
    agent = DiffusionQL.from_dataset(dataset, DiffusionQLConfig(**{**SMALL, "hidden": 64, "critic_hidden": 64,
                                                                   "eta": 5.0}))
    train(agent, dataset, 400, batch_size=256)
    data_mean = dataset.rewards.mean().item()
    assert mean_reward(agent.policy(seed=0, selection="max")) > data_mean + 0.2
