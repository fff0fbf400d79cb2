"""Diffusion-QL: the update, the EMA, the critic targets and action selection pinned against the official code's
rules (Zhendong-Wang/Diffusion-Policies-for-Offline-RL, agents/ql_diffusion.py, agents/diffusion.py,
agents/model.py, main.py), with hand-made critics where values matter."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from dtype_guard import only_float64
from offline_rl_checks import bandit, check_metrics, check_policy, check_state_round_trip, mean_reward, train
from torch import nn

from agents.diffusion_ql import DQLMLP, PRESETS, DiffusionQL, DiffusionQLConfig, actor_model
from agents.offline_rl import choose
from agents.presets import apply_preset
from envs import load_dataset

SMALL = dict(hidden=32, critic_hidden=32, depth=2, critic_depth=2, n_candidates=8, ema_start=0)


def make_agent(dataset=None, **kw):
    return DiffusionQL.from_dataset(dataset if dataset is not None else bandit(), DiffusionQLConfig(**{**SMALL, **kw}))


class LinearQ(nn.Module):
    """A hand-made critic member: Q(s, a) = a . w + s . v + b."""

    def __init__(self, w, v=0.0, b=0.0, obs_dim=1):
        super().__init__()
        w = torch.as_tensor(w, dtype=torch.float32)
        self.register_buffer("w", w)
        self.register_buffer("v", torch.full((obs_dim,), float(v)))
        self.register_buffer("b", torch.tensor(float(b)))

    def forward(self, obs, act):
        return act @ self.w + obs @ self.v + self.b


def set_members(ensemble, *members):
    ensemble.members = nn.ModuleList(members)


# ------------------------------------------------------------------------------------------------ defaults / presets
def test_defaults_are_the_official_ones():
    c = DiffusionQLConfig()
    official = dict(net="mlp", hidden=256, depth=3, time_dim=16, diffusion_steps=5, beta_min=0.1, beta_max=10.0,
                    critic_hidden=256, critic_depth=3, eta=1.0, gamma=0.99, tau=0.005, lr=3e-4, critic_lr=3e-4,
                    lr_schedule="constant", total_steps=None, max_grad_norm=9.0, max_q_backup=False, max_q_samples=10,
                    ema_decay=0.995, ema_start=1000, ema_every=5, ema_before_start="initial", reward_tune="no",
                    obs_normalization="none", action_normalization="none", n_candidates=50, selection="softmax",
                    eval_actor="online")
    assert {k: getattr(c, k) for k in official} == official
    # vp_beta_schedule of agents/helpers.py
    t = np.arange(1, 6)
    betas = 1 - np.exp(-0.1 / 5 - 0.5 * (10.0 - 0.1) * (2 * t - 1) / 25)
    agent = make_agent(hidden=256, depth=3, critic_hidden=256, critic_depth=3)
    np.testing.assert_allclose(agent.actor.schedule.betas.numpy(), betas, rtol=1e-12)
    critic = agent.critic.q.members[0].net
    assert [layer.out_features for layer in critic.layers] == [256] * 3 and critic.act.__name__.startswith("mish")


def test_presets_hold_every_row_of_the_official_table():
    assert len(PRESETS) == 20 and DiffusionQL.presets is PRESETS
    gn = {"hopper-medium": 9.0, "halfcheetah-medium": 9.0, "walker2d-medium": 1.0, "hopper-medium-replay": 4.0,
          "halfcheetah-medium-replay": 2.0, "hopper-medium-expert": 5.0, "antmaze-umaze": 2.0, "kitchen-partial": 10.0,
          "pen-human": 7.0}
    assert {task: PRESETS[task].values["max_grad_norm"] for task in gn} == gn
    assert all(PRESETS[t].values["eta"] == 1.0 for t in PRESETS if t.split("-")[0] in ("hopper", "walker2d",
                                                                                      "halfcheetah"))
    assert PRESETS["antmaze-umaze"].values["max_q_backup"] is False
    assert PRESETS["antmaze-large-play"].values == {"lr": 3e-4, "eta": 4.5, "max_q_backup": True,
                                                    "reward_tune": "cql_antmaze", "max_grad_norm": 10.0}
    assert PRESETS["pen-human"].values["reward_tune"] == "normalize" and PRESETS["pen-human"].values["lr"] == 3e-5
    assert PRESETS["kitchen-partial"].values["eta"] == 0.005
    assert all("Diffusion-Policies-for-Offline-RL" in p.source and "main.py" in p.source for p in PRESETS.values())
    config, line = apply_preset(DiffusionQLConfig(), PRESETS, "/data/hopper-medium-replay-v2.hdf5")
    assert config.max_grad_norm == 4.0 and "hopper-medium-replay" in line
    # the official critic keeps lr 3e-4 whatever the task's (actor) lr
    agent = make_agent(**PRESETS["pen-human"].values)
    assert agent.actor_learner.base_lr == 3e-5 and agent.critic_learner.base_lr == 3e-4
    assert agent.actor_learner.max_grad_norm == agent.critic_learner.max_grad_norm == 7.0
    assert make_agent(max_grad_norm=0).actor_learner.max_grad_norm is None  # gn <= 0: no clipping


def test_learning_rate_schedule_and_its_horizon():
    agent = make_agent()
    assert agent.actor_learner.lr_at(0) == agent.actor_learner.lr_at(10**6) == 3e-4
    config = DiffusionQLConfig(**SMALL, lr_schedule="cosine")  # the config accepts a missing horizon ...
    assert config.total_steps is None
    with pytest.raises(ValueError, match="total_steps"):  # ... the agent does not
        DiffusionQL.from_dataset(bandit(), config)
    agent = DiffusionQL.from_dataset(bandit(), dataclasses.replace(config, total_steps=100))
    assert agent.actor_learner.lr_at(50) == pytest.approx(1.5e-4) and agent.critic_learner.lr_at(100) == 0.0


# ------------------------------------------------------------------------------------------------ actor network
def test_official_actor_network_layout_and_time_features():
    torch.manual_seed(0)
    net = DQLMLP(x_dim=3, cond_dim=4, hidden=256, depth=3, time_dim=16, num_steps=5)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 16), (3 + 16 + 4, 256), (256, 256),
                                                                  (256, 256), (256, 3)]
    x, s = torch.randn(5, 3), torch.randn(5, 4)
    step = torch.arange(5)  # chain index 0..4 = diffrl times 1/5 .. 1
    freqs = torch.exp(torch.arange(8) * -(math.log(10000) / 7))
    emb = torch.cat([(step[:, None] * freqs).sin(), (step[:, None] * freqs).cos()], dim=1)
    mish = nn.functional.mish
    t_feat = linears[1](mish(linears[0](emb)))
    h = torch.cat([x, t_feat, s], dim=1)
    for layer in linears[2:5]:
        h = mish(layer(h))
    expected = linears[5](h)
    torch.testing.assert_close(net(x, (step + 1) / 5.0, s), expected)
    assert isinstance(make_agent().actor.denoiser, DQLMLP)
    assert type(make_agent(net="residual_mlp").actor.denoiser).__name__ == "ResidualMLP"


def test_chain_samples_as_the_official_posterior_sampler():
    """DDPM over the 5-step VP chain = the official p_sample_loop (x0 clipped, posterior variance, no noise at
    the last step, final clamp), given the same noise draws."""
    torch.manual_seed(0)
    model = actor_model(obs_dim=4, act_dim=3, hidden=32, depth=2)
    with torch.no_grad():
        model.denoiser.head.weight.mul_(30)  # push x0 estimates past +-1 so that clipping matters
    s = torch.randn(64, 4)
    torch.manual_seed(1)
    ours = model.sample((64, 3), s, solver="ddpm", steps=5)

    T = 5
    t = np.arange(1, T + 1)
    betas = torch.tensor(1 - np.exp(-0.1 / T - 0.5 * 9.9 * (2 * t - 1) / T**2))
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    var = betas * (1 - ab_prev) / (1 - ab)
    c1, c2 = betas * ab_prev.sqrt() / (1 - ab), (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)
    torch.manual_seed(1)
    x = torch.randn(64, 3)
    clipped = 0
    with torch.no_grad():
        for i in reversed(range(T)):
            eps = model.denoiser(x, torch.full((64,), (i + 1) / T), s).double()
            x0 = (1 / ab[i]).sqrt() * x - (1 / ab[i] - 1).sqrt() * eps
            clipped += int((x0.abs() > 1).sum())
            mean = c1[i] * x0.clamp(-1, 1) + c2[i] * x
            noise = torch.randn(64, 3)
            x = (mean + (i > 0) * (0.5 * var[i].clamp(min=1e-20).log()).exp() * noise).float()
    assert clipped > 0
    torch.testing.assert_close(ours, x.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_differentiable_sampling_reaches_actor_parameters():
    agent = make_agent()
    obs = torch.randn(8, 1)
    assert not agent.sample_actions(obs).requires_grad
    actions = agent.sample_actions(obs, grad=True)
    agent.critic.q(obs, actions).sum().backward()
    for layer in (m for m in agent.actor.denoiser.modules() if isinstance(m, nn.Linear)):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ losses and targets
@pytest.mark.parametrize("eta", [0.0, 1.0, 2.5])
def test_actor_loss_is_bc_minus_eta_q_over_the_other_critics_mean_abs(eta):
    agent = make_agent(eta=eta)
    set_members(agent.critic.q, LinearQ([2.0, -1.0], b=3.0), LinearQ([-0.5, 4.0], b=-7.0))
    obs, actions = torch.randn(16, 1), torch.rand(16, 2) * 2 - 1
    for member in (0, 1):
        torch.manual_seed(5)
        bc = agent.actor.loss(actions, obs)
        new = agent.sample_actions(obs)
        q = agent.critic.q(obs, new)
        expected_q = -q[member].mean() / q[1 - member].abs().mean()
        torch.manual_seed(5)
        loss, info = agent.actor_loss(obs, actions, member=member)
        torch.testing.assert_close(info["bc_loss"], bc)
        torch.testing.assert_close(info["q_loss"], expected_q)
        torch.testing.assert_close(loss, bc + eta * expected_q)
    members = []
    for seed in range(12):  # the official update draws the maximised member at random every step
        by_member = []
        for member in (0, 1):
            torch.manual_seed(seed)
            by_member.append(agent.actor_loss(obs, actions, member=member)[1]["q_loss"])
        torch.manual_seed(seed)
        q_loss = agent.actor_loss(obs, actions)[1]["q_loss"]
        members.append([bool(torch.equal(q_loss, q)) for q in by_member].index(True))
    assert set(members) == {0, 1}


def test_q_term_changes_the_actor_gradient_and_not_the_critic():
    obs, actions = torch.randn(16, 1), torch.rand(16, 2) * 2 - 1

    def actor_grad(eta):
        torch.manual_seed(1)
        agent = make_agent(eta=eta)
        torch.manual_seed(0)
        loss, info = agent.actor_loss(obs, actions)
        loss.backward()
        assert all(p.grad is None for p in agent.critic.parameters())  # the critic is frozen in the actor step
        return agent.actor.denoiser.body[0].weight.grad

    assert (actor_grad(1.0) - actor_grad(0.0)).abs().max() > 1e-6


def test_td_target_uses_the_ema_actor_and_the_target_critics_min():
    agent = make_agent(gamma=0.9)
    with torch.no_grad():
        for p in agent.actor_ema.parameters():
            p.add_(0.3 * torch.randn_like(p))  # EMA and online actors now differ
    set_members(agent.critic.target, LinearQ([1.0, 2.0], b=0.5), LinearQ([-1.0, 0.5], b=0.2))
    set_members(agent.critic.q, LinearQ([5.0, 5.0]), LinearQ([5.0, 5.0]))
    batch = bandit().sample(32, torch.Generator().manual_seed(0))
    b = agent.prepare(batch)
    torch.manual_seed(3)
    a_ema = agent.sample_actions(b["next_obs"], ema=True)
    expected = torch.minimum(a_ema @ torch.tensor([1.0, 2.0]) + 0.5, a_ema @ torch.tensor([-1.0, 0.5]) + 0.2)
    torch.manual_seed(3)
    torch.testing.assert_close(agent.next_values(b["next_obs"]), expected)
    torch.manual_seed(3)
    a_online = agent.sample_actions(b["next_obs"])
    assert not torch.allclose(a_online, a_ema, atol=1e-3)

    agent = make_agent(gamma=0.9)  # the update's TD target (real networks: the Learners need their parameters)
    with torch.no_grad():
        for p in agent.critic.q.parameters():
            p.add_(0.3 * torch.randn_like(p))  # online and target critics now differ
    torch.manual_seed(3)
    next_q = agent.critic.target.min(b["next_obs"], agent.sample_actions(b["next_obs"], ema=True))
    target = b["rewards"] + 0.9 * (1 - b["terminals"]) * next_q
    torch.manual_seed(3)
    online = agent.critic.q.min(b["next_obs"], agent.sample_actions(b["next_obs"], ema=True))
    assert not torch.allclose(online, next_q, atol=1e-4)
    torch.manual_seed(3)
    metrics = agent.update(batch)
    torch.testing.assert_close(metrics["target_q_mean"], target.mean())


def test_max_q_backup_takes_each_critics_max_over_samples_then_the_min():
    agent = make_agent(max_q_backup=True, max_q_samples=10)
    set_members(agent.critic.target, LinearQ([1.0, 0.0]), LinearQ([-1.0, 0.0]))
    next_obs = torch.zeros(6, 1)
    torch.manual_seed(2)
    a = agent.sample_actions(next_obs.repeat_interleave(10, dim=0), ema=True)[:, 0].view(6, 10)
    expected = torch.minimum(a.amax(1), (-a).amax(1))
    torch.manual_seed(2)
    got = agent.next_values(next_obs)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, (-a.abs()).amax(1))  # not the max over samples of the min over critics


# ------------------------------------------------------------------------------------------------ EMA
@pytest.mark.parametrize("before", ["initial", "copy"])
def test_ema_schedule_follows_the_official_one(before):
    agent = make_agent(ema_start=3, ema_every=2, ema_decay=0.5, ema_before_start=before, n_candidates=2)
    initial = [p.clone() for p in agent.actor.parameters()]
    expected = [p.clone() for p in initial]
    data = bandit()
    g = torch.Generator().manual_seed(0)
    for k in range(8):  # official: after update k, EMA step iff k % every == 0 and k >= start
        agent.update(data.sample(16, g))
        online = list(agent.actor.parameters())
        if k >= 3 and k % 2 == 0:
            expected = [0.5 * e + 0.5 * p for e, p in zip(expected, online, strict=True)]
        elif k < 3 and before == "copy":
            expected = [p.clone() for p in online]
        for e, p in zip(expected, agent.actor_ema.parameters(), strict=True):
            torch.testing.assert_close(p, e)
        if k < 3 and before == "initial":
            assert all(torch.equal(p, q) for p, q in zip(agent.actor_ema.parameters(), initial, strict=True))


# ------------------------------------------------------------------------------------------------ acting
def test_selection_draws_from_softmax_of_the_target_critics_min():
    candidates = torch.arange(4.0).view(1, 4, 1).expand(2, 4, 1)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0], [3.0, 3.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    picks = torch.stack([choose(candidates, logits, False, g)[:, 0] for _ in range(4000)])
    freq = torch.stack([(picks == i).float().mean(0) for i in range(4)], dim=1)
    torch.testing.assert_close(freq, torch.softmax(logits, 1), atol=0.03, rtol=0)
    assert choose(candidates, logits, True)[:, 0].tolist() == [2.0, 0.0]

    agent = make_agent(n_candidates=50)
    assert DiffusionQLConfig().n_candidates == 50  # the official sample_action repeats the state 50 times
    actor = agent.build_actor()
    set_members(actor.critic, LinearQ([600.0, 0.0]), LinearQ([800.0, 0.0], b=1.0))
    obs = torch.zeros(3, 1, 1)
    torch.manual_seed(4)
    chosen = actor(obs)[:, 0]
    torch.manual_seed(4)
    cands = agent.sample_actions(torch.zeros(150, 1)).view(3, 50, 2)
    # min(600 a0, 800 a0 + 1) is sharply peaked: the draw is (almost surely) a candidate with the largest a0
    assert ((chosen[:, None] == cands).all(-1).any(1)).all()
    torch.testing.assert_close(chosen[:, 0], cands[..., 0].amax(1), atol=0.01, rtol=0)


def test_build_actor_takes_the_target_critic():
    agent = make_agent()
    train(agent, bandit(), 3)
    actor = agent.build_actor()
    for (_, x), (_, y) in zip(actor.critic.state_dict().items(), agent.critic.target.state_dict().items(),
                              strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("eval_actor", ["online", "ema"])
def test_exported_policy_acts_with_the_chosen_actor_weights(eval_actor):
    agent = make_agent(eval_actor=eval_actor, ema_start=0, ema_decay=0.9)
    train(agent, bandit(), 4)
    source = agent.actor_ema if eval_actor == "ema" else agent.actor
    other = agent.actor if eval_actor == "ema" else agent.actor_ema
    weights = agent.policy(seed=0).actor.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in source.state_dict().items())
    assert not all(torch.equal(weights[k], v) for k, v in other.state_dict().items())


def test_selection_modes_and_policy(tmp_path):
    agent = make_agent()
    check_policy(agent, tmp_path)
    for selection in ("max", "none"):
        assert agent.policy(seed=0, selection=selection).act(torch.zeros(3, 1).numpy()).shape == (3, 2)
    with pytest.raises(ValueError, match="sampling option"):
        agent.policy(guidance_scale=1.0)
    for field, value in (("selection", "best"), ("net", "unet"), ("eval_actor", "target"), ("reward_tune", "x"),
                         ("ema_before_start", "zero"), ("obs_normalization", "minmax")):
        with pytest.raises(ValueError, match=field):
            DiffusionQLConfig(**{field: value})


# ------------------------------------------------------------------------------------------------ data handling
def test_raw_observations_and_actions_and_reward_tuning():
    data = load_dataset("toy:pointnav")
    agent = make_agent(data)
    batch = data.sample(8, torch.Generator().manual_seed(0))
    b = agent.prepare(batch)
    torch.testing.assert_close(b["obs"], batch["observations"])  # the official code feeds raw states and actions
    torch.testing.assert_close(b["actions"], batch["actions"])
    assert not torch.allclose(make_agent(data, obs_normalization="zscore").prepare(batch)["obs"], b["obs"])
    r = batch["rewards"].reshape(-1)
    torch.testing.assert_close(make_agent(data, reward_tune="cql_antmaze").prepare(batch)["rewards"], (r - 0.5) * 4)
    mean, std = data.rewards.double().mean(), data.rewards.double().std()
    torch.testing.assert_close(make_agent(data, reward_tune="normalize", reward_scale=2.0).prepare(batch)["rewards"],
                               ((r - mean) / std * 2).float())
    with pytest.raises(ValueError, match="reward_stats"):
        DiffusionQL(DiffusionQLConfig(reward_tune="normalize"), 2, 2)
    wide = copy.copy(data)
    wide.actions = data.actions * 3
    with pytest.raises(ValueError, match="max_abs"):
        make_agent(wide)
    assert make_agent(wide, action_normalization="max_abs").prepare(batch)["actions"].abs().max() <= 1


def test_update_metrics_and_target_tracking():
    agent = make_agent(tau=0.5)
    target_before = [p.clone() for p in agent.critic.target.parameters()]
    metrics = train(agent, bandit(), 2)
    check_metrics(metrics, {"critic_loss", "actor_loss", "bc_loss", "q_loss", "q_mean", "target_q_mean"})
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for k, v in metrics.items() if k != "lr")
    assert any(not torch.equal(a, b) for a, b in zip(target_before, agent.critic.target.parameters(), strict=True))
    assert agent.actor_learner.num_steps == agent.critic_learner.num_steps == 2


def test_float64_update_and_act_make_no_other_float_dtype():
    data = bandit().to(dtype=torch.float64)
    agent = DiffusionQL.from_dataset(bandit(), DiffusionQLConfig(**{**SMALL, "ema_start": 1, "ema_every": 1,
                                                                    "max_q_backup": True, "max_q_samples": 3,
                                                                    "reward_tune": "normalize"}),
                                     dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    with only_float64():
        for _ in range(3):
            metrics = agent.update(data.sample(16, g))
    assert metrics["actor_loss"].dtype == torch.float64
    for eval_actor in ("online", "ema"):
        agent.config = dataclasses.replace(agent.config, eval_actor=eval_actor)
        policy = agent.policy(seed=0)
        obs = torch.zeros(4, 1, 1, dtype=torch.float64)
        with only_float64():
            actions = policy.actor(obs, torch.Generator().manual_seed(0))
        assert actions.dtype == torch.float64 and actions.shape == (4, 1, 2)
        assert policy.act(np.zeros((4, 1), dtype=np.float32)).shape == (4, 2)


def test_state_dict_round_trip(tmp_path):
    check_state_round_trip(make_agent, bandit(), tmp_path)
    agent = make_agent(load_dataset("toy:pointnav"), reward_tune="normalize")
    other = DiffusionQL(agent.config, agent.obs_dim, agent.act_dim, reward_stats=(0.0, 1.0))
    other.load_state_dict(agent.state_dict())
    assert torch.equal(other.reward_stats, agent.reward_stats)


@pytest.mark.slow
def test_bandit_prefers_high_reward_actions():
    dataset = bandit(4000)
    agent = DiffusionQL.from_dataset(dataset, DiffusionQLConfig(**{**SMALL, "hidden": 64, "critic_hidden": 64,
                                                                   "eta": 5.0}))
    train(agent, dataset, 400, batch_size=256)
    data_mean = dataset.rewards.mean().item()
    assert mean_reward(agent.policy(seed=0, selection="max")) > data_mean + 0.2
