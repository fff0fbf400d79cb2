"""QGPO's two training phases: the switch and the frozen behaviour model, the support actions computed once,
the Q-learning window, the energy inputs, the trained policy, float64 and exact resume across the switch."""

import copy

import numpy as np
import pytest
import torch
from dtype_guard import GuardedActor, GuardedAgent
from offline_rl_checks import bandit

from agents.policy import load_policy
from agents.qgpo import QGPO, QGPOConfig, draw_samples
from diffrl.checkpoint import load_checkpoint, save_checkpoint
from diffrl.guidance import GradientGuidance
from diffrl.training import TrainConfig, Trainer
from envs import load_dataset

SMALL = dict(hidden=8, time_dim=8, critic_hidden=16, critic_depth=2, energy_hidden=16, energy_depth=2, n_support=4,
             support_steps=3, sample_steps=3, reward_transform="none", behavior_batch_size=64, support_chunk=64)


@pytest.fixture(scope="module")
def pointnav():
    return load_dataset("toy:pointnav").subset(n_episodes=12)  # states differ: s and s' supports differ


def make(dataset, **kw):
    torch.manual_seed(0)
    agent = QGPO.from_dataset(dataset, QGPOConfig(**{**SMALL, **kw}))
    return agent, agent.batch_sampler(dataset)


def run(agent, sampler, steps: int, generator: torch.Generator, batch_size: int = 16) -> list[dict]:
    return [agent.update(sampler(batch_size, generator)) for _ in range(steps)]


def params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_switch_at_the_configured_step_freezes_the_behaviour_model(pointnav):
    agent, sampler = make(pointnav, total_steps=10, behavior_steps=3)
    g = torch.Generator().manual_seed(0)
    start = params(agent.behavior)
    sizes = []
    for _ in range(3):
        batch = sampler(16, g)
        sizes.append(len(batch["indices"]))
        assert set(agent.update(batch)) == {"behavior_loss"}
    assert sizes == [64] * 3  # behaviour phase: behavior_batch_size samples per step, not the Trainer's 16
    assert not same(start, params(agent.behavior)) and not agent.in_behavior_phase
    frozen, energy_before = params(agent.behavior), params(agent.energy)
    batch = sampler(16, g)
    assert len(batch["indices"]) == 16 and "rewards" in batch
    assert "energy_loss" in agent.update(batch)
    run(agent, sampler, 5, g)
    assert same(frozen, params(agent.behavior)) and not same(energy_before, params(agent.energy))
    assert agent.behavior_learner.num_steps == 3 and agent.energy_learner.num_steps == 6
    assert not any(p.requires_grad for p in agent.behavior.parameters())


def test_default_switch_keeps_the_official_fraction(pointnav):
    agent, sampler = make(pointnav, total_steps=16)  # 600k / 1.6M of the run: 6 of 16 updates
    assert (agent.behavior_steps, agent.q_steps) == (6, 5)
    run(agent, sampler, 7, torch.Generator().manual_seed(0))
    assert agent.behavior_learner.num_steps == 6 and agent.energy_learner.num_steps == 1


def test_support_actions_computed_once_with_k_per_state_for_s_and_next_s(pointnav, monkeypatch):
    agent, sampler = make(pointnav, total_steps=12, behavior_steps=2)
    calls = []
    original = agent.sample_support

    def counting(obs, generator=None):
        calls.append(obs.shape[0])
        return original(obs, generator)

    monkeypatch.setattr(agent, "sample_support", counting)
    g = torch.Generator().manual_seed(0)
    run(agent, sampler, 2, g)
    assert calls == [] and agent.support is None
    run(agent, sampler, 6, g)
    n, k = len(pointnav), SMALL["n_support"]
    assert sum(calls) == 2 * n  # every state once for s and once for s', in chunks, at the switch only
    assert len(calls) == 2 * -(-n // SMALL["support_chunk"])
    for key in ("obs", "next_obs"):
        assert agent.support[key].shape == (n, k, pointnav.act_dim)
        assert agent.support[key].device == pointnav.observations.device
    assert not torch.equal(agent.support["obs"], agent.support["next_obs"])
    # they are behaviour samples of each state: redrawn from the seed, the set is the same
    g2 = torch.Generator().manual_seed(agent.support_seed)
    first = original(pointnav.observations[: SMALL["support_chunk"]], g2)
    torch.testing.assert_close(agent.support["obs"][: SMALL["support_chunk"]], first, rtol=0, atol=0)


def test_critic_and_energy_use_the_support_of_the_batch_states(pointnav, monkeypatch):
    import agents.qgpo as qgpo

    agent, sampler = make(pointnav, total_steps=10, behavior_steps=1)
    g = torch.Generator().manual_seed(0)
    run(agent, sampler, 2, g)  # past the switch
    seen = {}
    target_fn, energy_loss = qgpo.in_support_q_target, agent.energy_loss

    def spy_target(rewards, terminals, q_next, q_alpha, gamma):
        seen["q_next"], seen["alpha"], seen["gamma"] = q_next, q_alpha, gamma
        return target_fn(rewards, terminals, q_next, q_alpha, gamma)

    def spy_energy(obs, support, q_support):
        seen["support"], seen["q_support"] = support, q_support
        return energy_loss(obs, support, q_support)

    monkeypatch.setattr(qgpo, "in_support_q_target", spy_target)
    monkeypatch.setattr(agent, "energy_loss", spy_energy)
    batch = sampler(16, g)
    target_critic = copy.deepcopy(agent.critic)
    agent.update(batch)
    idx = batch["indices"]
    obs, next_obs = batch["observations"], batch["next_observations"]
    next_k = next_obs.unsqueeze(1).expand(-1, 4, -1)
    # the Q target: the (pre-update) target critic at s' on the support actions of s'
    torch.testing.assert_close(seen["q_next"], target_critic.target_min(next_k, agent.support["next_obs"][idx]))
    assert (seen["alpha"], seen["gamma"]) == (1.0, 0.99)
    # CEP: the support of s, labelled by the (post-update) target critic
    torch.testing.assert_close(seen["support"], agent.support["obs"][idx])
    obs_k = obs.unsqueeze(1).expand(-1, 4, -1)
    torch.testing.assert_close(seen["q_support"], agent.critic.target_min(obs_k, agent.support["obs"][idx]))


def test_energy_inputs_share_one_time_per_state(pointnav):
    agent, sampler = make(pointnav, total_steps=10, behavior_steps=1)
    g = torch.Generator().manual_seed(0)
    run(agent, sampler, 1, g)
    seen = []
    hook = agent.energy.register_forward_hook(lambda m, args, out: seen.append(args))
    batch = sampler(16, g)
    agent.update(batch)
    hook.remove()
    x_t, t, obs = seen[0]
    assert x_t.shape == (16, 4, 2) and t.shape == (16, 4) and obs.shape == (16, 4, pointnav.obs_dim)
    assert torch.equal(t, t[:, :1].expand(-1, 4))  # one t per state, shared by its K support actions
    assert t[:, 0].unique().numel() == 16  # and drawn per state
    assert torch.all((t >= 1e-3) & (t <= 1.0))
    torch.testing.assert_close(obs, batch["observations"].unsqueeze(1).expand(-1, 4, -1))
    # x_t = alpha_t a + sigma_t eps around the support of s: the implied noise is standard normal-ish, finite
    sched, sup = agent.behavior.schedule, agent.support["obs"][batch["indices"]]
    eps = (x_t - sched.alpha(t)[..., None] * sup) / sched.sigma(t)[..., None]
    assert eps.abs().max() < 6 and 0.5 < eps.std() < 1.5


def test_q_trains_only_in_the_first_half_of_the_critic_phase(pointnav):
    agent, sampler = make(pointnav, total_steps=10, behavior_steps=2)  # critic phase 8 updates, Q during 4
    g = torch.Generator().manual_seed(0)
    metrics = run(agent, sampler, 6, g)
    assert all("critic_loss" in m for m in metrics[2:6])
    critic, target = params(agent.critic.q), params(agent.critic.target)
    metrics = run(agent, sampler, 4, g)
    assert all("critic_loss" not in m and "energy_loss" in m for m in metrics)
    assert same(critic, params(agent.critic.q)) and same(target, params(agent.critic.target))
    assert agent.critic_learner.num_steps == 4 and agent.energy_learner.num_steps == 8


def test_trained_policy_and_its_saved_copy_act_with_the_trained_weights(pointnav, tmp_path):
    agent, sampler = make(pointnav, total_steps=8, behavior_steps=3, guidance_scale=2.0)
    run(agent, sampler, 8, torch.Generator().manual_seed(0))
    obs = pointnav.observations[:5]
    guidance = GradientGuidance(agent.energy, 2.0)
    expected = draw_samples(agent.behavior, agent.obs_normalizer.normalize(obs), 2, SMALL["sample_steps"], guidance,
                            torch.Generator().manual_seed(3)).clamp(-1, 1)
    expected = agent.action_normalizer.denormalize(expected)
    policy = agent.policy(seed=3)
    np.testing.assert_allclose(policy.act(obs.numpy()), expected.numpy(), rtol=1e-5, atol=1e-6)
    loaded = load_policy(policy.save(tmp_path / "policy.pt"), seed=3)
    policy.reset()
    np.testing.assert_array_equal(loaded.act(obs.numpy()), policy.act(obs.numpy()))
    fresh, _ = make(pointnav, total_steps=8, behavior_steps=3, guidance_scale=2.0)
    assert np.abs(fresh.policy(seed=3).act(obs.numpy()) - loaded.act(obs.numpy())).max() > 1e-3


def test_float64_phases_and_policy_under_the_dtype_guard(pointnav):
    data = pointnav.to(dtype=torch.float64)
    torch.manual_seed(0)
    agent = QGPO.from_dataset(pointnav, QGPOConfig(**{**SMALL, "reward_transform": "iql_locomotion",
                                                      "normalize_obs": True, "total_steps": 6, "behavior_steps": 2}),
                              dtype=torch.float64)
    sampler = agent.batch_sampler(data)
    history = Trainer(GuardedAgent(agent), sampler, TrainConfig(steps=6, batch_size=8, log_every=1, progress=False,
                                                            device="cpu")).fit()
    assert {"train/behavior_loss", "train/critic_loss", "train/energy_loss"} <= {k for r in history for k in r}
    assert all(np.isfinite(v) for r in history for v in r.values())
    assert agent.support["obs"].dtype == torch.float64 and agent.energy_learner.num_steps == 4
    policy = agent.policy(seed=0)
    policy.actor = GuardedActor(policy.actor)
    actions = policy.act(pointnav.observations[:4].numpy())
    assert actions.shape == (4, 2) and np.isfinite(actions).all()


def _resume(dataset, tmp_path, save_at: int, steps: int):
    """Train ``steps`` updates straight, and from a checkpoint at ``save_at`` in a fresh agent; both (agents)."""
    kw = dict(total_steps=steps, behavior_steps=3)
    a, sa = make(dataset, **kw)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(5)
    run(a, sa, save_at, g)
    path = save_checkpoint(tmp_path / "agent.pt", {"agent": a.state_dict()}, a.kind)
    g_state, rng = g.get_state(), torch.get_rng_state()
    ma = run(a, sa, steps - save_at, g)
    b, sb = make(dataset, **kw)
    b.load_state_dict(load_checkpoint(path, expected_kind=b.kind)["agent"])
    g.set_state(g_state)
    torch.set_rng_state(rng)
    mb = run(b, sb, steps - save_at, g)
    assert ma == mb
    for key in a.modules:
        assert same(params(a.modules[key]), params(b.modules[key])), key
    return a, b


def test_resume_before_the_switch_continues_exactly_across_it(pointnav, tmp_path):
    a, b = _resume(pointnav, tmp_path, save_at=2, steps=7)
    assert a.support_seed == b.support_seed is not None
    assert torch.equal(a.support["obs"], b.support["obs"])


def test_resume_after_the_switch_recomputes_the_same_support(pointnav, tmp_path):
    a, b = _resume(pointnav, tmp_path, save_at=5, steps=8)
    for key in ("obs", "next_obs"):  # not saved: recomputed from the saved seed and the frozen behaviour model
        assert torch.equal(a.support[key], b.support[key])
    assert not any(p.requires_grad for p in b.behavior.parameters())


def test_plain_batches_fall_back_to_per_batch_support_with_a_warning():
    data = bandit(200)
    agent = QGPO.from_dataset(data, QGPOConfig(**{**SMALL, "total_steps": 4, "behavior_steps": 1}))
    g = torch.Generator().manual_seed(0)
    agent.update(data.sample(8, g))
    with pytest.warns(UserWarning, match="indices"):
        metrics = agent.update(data.sample(8, g))
    assert {"critic_loss", "energy_loss"} <= set(metrics) and agent.support == {}


def test_trainer_checkpoint_resume_across_the_switch_matches_the_straight_run(pointnav, tmp_path):
    """The CLI's order: agent, then its batch sampler, then the Trainer loads the checkpoint into the agent."""
    def trainer(agent, sampler, steps, run_dir=None):
        return Trainer(agent, sampler, TrainConfig(steps=steps, batch_size=16, seed=3, log_every=1, progress=False,
                                                   device="cpu", checkpoint_every=5 if run_dir else 0,
                                                   run_dir=run_dir))

    straight, sampler = make(pointnav, total_steps=9, behavior_steps=3)
    trainer(straight, sampler, 9).fit()
    first, sampler = make(pointnav, total_steps=9, behavior_steps=3)
    trainer(first, sampler, 5, str(tmp_path / "run")).fit()  # checkpoint at step 5, past the switch
    resumed, sampler = make(pointnav, total_steps=9, behavior_steps=3)
    trainer(resumed, sampler, 9, str(tmp_path / "run")).fit(resume=True)
    for key in straight.modules:
        assert same(params(straight.modules[key]), params(resumed.modules[key])), key
    assert torch.equal(straight.support["next_obs"], resumed.support["next_obs"])
