import pytest
import torch
from offline_rl_checks import bandit, check_metrics, check_policy, check_state_round_trip, mean_reward, train

from agents.critics import expectile_log_weights
from agents.idql import IDQL, IDQLActor, IDQLConfig

SMALL = dict(hidden=32, critic_hidden=32, depth=2, critic_depth=2, n_candidates=8, lr_schedule="constant")


def make_agent(**kw):
    return IDQL.from_dataset(bandit(), IDQLConfig(**{**SMALL, **kw}))


def test_update_metrics_and_learners():
    agent = make_agent()
    check_metrics(train(agent, bandit(), 2), {"value_loss", "critic_loss", "bc_loss", "q_mean"})
    assert agent.value_learner.num_steps == agent.critic_learner.num_steps == agent.actor_learner.num_steps == 2


def test_selection_weights_follow_the_critics():
    actor = IDQLActor(obs_dim=1, act_dim=2, hidden=8, depth=1, critic_hidden=8, critic_depth=1, n_candidates=4)
    obs, actions = torch.zeros(4, 1), torch.randn(4, 2)
    advantage = actor.critic.min(obs, actions) - actor.value(obs)
    torch.testing.assert_close(actor.log_weights(obs, actions), expectile_log_weights(advantage, 0.7))
    actor.weighting, actor.temperature = "softmax", 2.0
    torch.testing.assert_close(actor.log_weights(obs, actions), 2.0 * advantage)


def test_greedy_selection_returns_the_best_candidate():
    actor = IDQLActor(obs_dim=1, act_dim=2, hidden=8, depth=1, critic_hidden=8, critic_depth=1, n_candidates=16,
                      weighting="softmax", greedy=True).eval()
    obs = torch.zeros(3, 1, 1)
    chosen = actor(obs, torch.Generator().manual_seed(0))[:, 0]
    candidates = actor.model.sample((48, 2), torch.zeros(48, 1), solver="ddpm", steps=actor.steps,
                                    generator=torch.Generator().manual_seed(0)).view(3, 16, 2)
    scores = actor.log_weights(torch.zeros(3, 16, 1), candidates)
    torch.testing.assert_close(chosen, candidates[torch.arange(3), scores.argmax(1)])


def test_policy_and_config_errors(tmp_path):
    check_policy(make_agent(), tmp_path)
    with pytest.raises(ValueError, match="weighting"):
        IDQLConfig(weighting="max")
    with pytest.raises(ValueError, match="expectile"):
        IDQLConfig(expectile=1.0)


def test_state_dict_round_trip(tmp_path):
    check_state_round_trip(make_agent, bandit(), tmp_path)


@pytest.mark.slow
def test_bandit_resampling_prefers_high_reward_actions():
    dataset = bandit(4000)
    torch.manual_seed(0)
    agent = IDQL.from_dataset(dataset, IDQLConfig(**{**SMALL, "hidden": 64, "critic_hidden": 64, "actor_lr": 1e-3}))
    train(agent, dataset, 400, batch_size=256)
    behaviour = mean_reward(agent.policy(seed=0, n_candidates=1))
    assert mean_reward(agent.policy(seed=0, weighting="softmax", temperature=20.0)) > behaviour + 0.2


@pytest.mark.parametrize("kind", ["idql", "qgpo", "diffusion_ql"])
def test_one_command_training_writes_checkpoints_and_policy(kind, tmp_path, capsys):
    from agents.policy import load_policy
    from diffrl.cli import main

    run_dir = tmp_path / kind
    main(["train", kind, "--dataset", "toy:bandit-8gaussians", "--steps", "4", "--log-every", "2",
          "--eval-episodes", "0", "--run-dir", str(run_dir), "hidden=16", "critic_hidden=16", "depth=2"])
    assert (run_dir / "checkpoints" / "latest.pt").is_file() and any((run_dir / "tb").iterdir())
    assert load_policy(run_dir / "policy.pt").act(torch.zeros(1).numpy()).shape == (2,)
