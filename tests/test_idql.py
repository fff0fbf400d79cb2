import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from dtype_guard import GuardedActor, only_float64
from offline_rl_checks import bandit, check_metrics, check_policy, check_state_round_trip, mean_reward, train
from torch import nn

from agents.critics import expectile_log_weights, expectile_loss
from agents.idql import IDQL, PRESETS, IDQLActor, IDQLConfig, IDQLSampler, actor_model
from agents.policy import load_policy
from agents.presets import apply_preset
from diffrl.guidance import Guidance
from diffrl.nets import LNResNet
from envs import load_dataset

SMALL = dict(hidden=32, critic_hidden=32, depth=2, time_dim=8, n_candidates=8, lr_schedule="constant")


def make_agent(dataset=None, **kw):
    return IDQL.from_dataset(dataset or bandit(), IDQLConfig(**{**SMALL, **kw}))


def small_actor(**kw):
    return IDQLActor(obs_dim=1, act_dim=2, hidden=8, depth=1, time_dim=4, critic_hidden=8, critic_depth=1, **kw)


# ------------------------------------------------------------------------------------------- defaults, presets
def test_defaults_are_the_official_ones():
    c = IDQLConfig()
    # DDPMIQLLearner.create defaults and launcher/examples/train_ddpm_iql_offline.py (philippe-eecs/IDQL)
    assert (c.actor_net, c.hidden, c.depth, c.time_dim, c.actor_dropout, c.layer_norm) == \
        ("ln_resnet", 256, 3, 128, 0.1, True)
    assert (c.diffusion_steps, c.beta_schedule, c.beta_min, c.beta_max) == (5, "vp", 0.1, 10.0)
    assert (c.actor_lr, c.actor_weight_decay, c.lr_schedule, c.total_steps, c.ema_decay) == \
        (3e-4, 1e-4, "cosine", 3_000_000, 0.999)
    assert (c.n_critics, c.critic_hidden, c.critic_depth, c.value_layer_norm, c.critic_lr, c.value_lr) == \
        (2, 256, 2, True, 3e-4, 3e-4)
    assert (c.expectile, c.gamma, c.tau) == (0.7, 0.99, 0.005)
    assert (c.n_candidates, c.sampler, c.selection) == (64, "idql", "max_q")
    assert (c.reward_normalization, c.reward_return_range, c.obs_normalization, c.action_normalization) == \
        ("returns", 1000.0, "none", "none")
    assert IDQL.default_batch_size == 512 and "512" in IDQLConfig.__doc__


def test_presets_hold_the_official_per_task_settings():
    antmaze = PRESETS["antmaze-large-play"]
    assert antmaze.values == {"expectile": 0.9, "reward_normalization": "none", "reward_shift": -1.0}
    for task in ("kitchen-partial", "pen-human"):
        assert PRESETS[task].values == {"reward_normalization": "none"}
    assert all("philippe-eecs/IDQL" in p.source for p in PRESETS.values())
    config, line = apply_preset(IDQLConfig(), IDQL.presets, "antmaze-large-play-v2")
    assert (config.expectile, config.reward_shift, config.reward_normalization) == (0.9, -1.0, "none")
    assert "antmaze-large-play" in line
    config, line = apply_preset(IDQLConfig(), IDQL.presets, "hopper-medium-replay-v2")  # the defaults' task family
    assert config == IDQLConfig() and "none" in line


def test_config_errors():
    for field, bad in (("selection", "max"), ("sampler", "dpm"), ("actor_net", "unet"), ("beta_schedule", "sq"),
                       ("reward_normalization", "zscore"), ("obs_normalization", "minmax")):
        with pytest.raises(ValueError, match=field):
            IDQLConfig(**{field: bad})
    with pytest.raises(ValueError, match="expectile"):
        IDQLConfig(expectile=1.0)
    with pytest.raises(ValueError, match="actor_dropout"):
        IDQLConfig(actor_dropout=1.0)


# ------------------------------------------------------------------------------------------- action selection
class Column(nn.Module):
    """A stand-in Q network: Q(s, a) = a[..., k]."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, obs, act):
        return act[..., self.k]


class Constant(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, obs):
        return torch.full(obs.shape[:-1], self.value, dtype=obs.dtype)


# Q1 = a[..., 0], Q2 = a[..., 1], V = 1: min Q = [3, 1.5, 0.99, -2], advantages [2, 0.5, -0.01, -3].
# The best min Q is candidate 0; Q1 alone would pick 2, Q2 alone and the mean of both 1, and the expectile weights
# |tau - 1(A < 0)| / |A| put most of the mass on 2 (the advantage closest to zero).
CANDIDATES = torch.tensor([[[3.0, 3.2], [1.5, 9.0], [6.0, 0.99], [-2.0, 4.0]]])


def hand_made_actor(**kw):
    actor = small_actor(n_candidates=4, **kw).eval()
    actor.critic.members = nn.ModuleList([Column(0), Column(1)])
    actor.value = Constant(1.0)
    actor.sample_candidates = lambda obs, generator=None: (torch.zeros(obs.shape[0], 4, 1), CANDIDATES.clone())
    return actor


def test_default_selection_is_the_argmax_of_the_min_q():
    actor = hand_made_actor()
    obs = torch.zeros(1, 1, 1)
    torch.testing.assert_close(actor(obs)[0, 0], CANDIDATES[0, 0])
    advantage = actor.critic.min(torch.zeros(1, 4, 1), CANDIDATES) - 1.0
    torch.testing.assert_close(advantage, torch.tensor([[2.0, 0.5, -0.01, -3.0]]))
    # the paper's expectile weights, still available by name, favour the near-zero advantage
    weights = torch.softmax(expectile_log_weights(advantage, 0.7), dim=1)
    assert weights[0, 2] > 0.9
    torch.testing.assert_close(hand_made_actor(selection="expectile", greedy=True)(obs)[0, 0], CANDIDATES[0, 2])


def test_selection_scores_follow_the_critics():
    actor = small_actor(n_candidates=4)
    obs, actions = torch.zeros(4, 1), torch.randn(4, 2)
    q = actor.critic.min(obs, actions)
    torch.testing.assert_close(actor.scores(obs, actions), q)
    actor.selection = "expectile"
    torch.testing.assert_close(actor.scores(obs, actions), expectile_log_weights(q - actor.value(obs), 0.7))
    actor.selection, actor.temperature = "softmax", 2.0
    torch.testing.assert_close(actor.scores(obs, actions), 2.0 * (q - actor.value(obs)))


def test_sampled_candidates_and_the_chosen_one():
    actor = small_actor(n_candidates=16).eval()
    obs = torch.zeros(3, 1, 1)
    chosen = actor(obs, torch.Generator().manual_seed(0))[:, 0]
    states, candidates = actor.sample_candidates(torch.zeros(3, 1), torch.Generator().manual_seed(0))
    assert candidates.shape == (3, 16, 2) and candidates.abs().max() <= 1.0
    best = actor.critic.min(states, candidates).argmax(1)
    torch.testing.assert_close(chosen, candidates[torch.arange(3), best])


def test_official_sampler_steps_with_beta_noise_and_clips_every_step():
    model = actor_model(1, 2, "ln_resnet", hidden=8, depth=1, time_dim=4).eval()
    betas = model.schedule.betas
    alpha_bar = torch.cumprod(1 - betas, 0)
    x, cond = torch.randn(6, 2) * 3, torch.zeros(6, 1)
    t, s = torch.full((6,), 0.8), torch.full((6,), 0.6)  # chain step n = 4 -> 3 (index 3)
    with torch.no_grad():
        eps = model(x, t, cond)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        out = IDQLSampler().step(model, x, t, s, cond, Guidance(), torch.Generator().manual_seed(1), {})
    beta, a = betas[3].float(), 1 - betas[3].float()
    expected = ((x - beta / (1 - alpha_bar[3].float()).sqrt() * eps) / a.sqrt() + beta.sqrt() * z).clamp(-1, 1)
    torch.testing.assert_close(out, expected)
    assert (out.abs() == 1).any()  # the clip acted


# ------------------------------------------------------------------------------------------- rewards
def test_rewards_are_scaled_by_1000_over_the_return_range():
    dataset = bandit()
    agent = make_agent(dataset)
    returns = dataset.episode_returns()
    scale = 1000.0 / (returns.max() - returns.min())
    assert agent.config.reward_scale == pytest.approx(scale) and agent.state_dict()["reward_scale"] == \
        pytest.approx(scale)
    batch = dataset.sample(16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(agent.prepare(batch)["rewards"], batch["rewards"] * scale)
    with pytest.raises(ValueError, match="from_dataset"):
        IDQL(IDQLConfig(**SMALL), 1, 2)
    fixed = IDQL(IDQLConfig(**SMALL, reward_normalization="none", reward_scale=2.0), 1, 2)
    assert fixed.config.reward_scale == 2.0


def test_antmaze_preset_subtracts_one_from_the_rewards():
    dataset = bandit()
    config, _ = apply_preset(IDQLConfig(**SMALL), IDQL.presets, "antmaze-umaze-v2")
    agent = IDQL.from_dataset(dataset, config)
    batch = dataset.sample(16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(agent.prepare(batch)["rewards"], batch["rewards"] - 1.0)
    assert agent.config.reward_scale == 1.0 and agent.config.expectile == 0.9


# ------------------------------------------------------------------------------------------- actor network
def test_ln_resnet_has_the_official_layout():
    obs_dim, act_dim = 5, 3
    net = LNResNet(act_dim, obs_dim)
    assert len(net.blocks) == 3 and net.time_features.kernel.shape == (64, 1)
    block = net.blocks[0]
    assert (block.fc1.in_features, block.fc1.out_features) == (256, 1024) and block.dropout.p == 0.1
    assert block.norm.eps == 1e-6
    # parameter count of jaxrl5's DDPM(FourierFeatures(128), MLP(256, 256), MLPResNet(3 blocks, 256, dropout 0.1))
    time = 64 + (128 * 256 + 256) + (256 * 256 + 256)
    stem = (act_dim + obs_dim + 256) * 256 + 256
    blocks = 3 * (2 * 256 + 256 * 1024 + 1024 + 1024 * 256 + 256)
    head = 256 * act_dim + act_dim
    ours = sum(p.numel() for name, p in net.named_parameters() if not name.startswith("null_cond"))
    assert ours == time + stem + blocks + head
    assert torch.all(net.stem.bias == 0) and net.stem.weight.abs().max() <= math.sqrt(6 / (264 + 256))
    assert block.fc1.weight.std().item() == pytest.approx(1 / 16, rel=0.05)  # LeCun normal: 1 / sqrt(fan_in)


def test_ln_resnet_dropout_only_in_training():
    net = LNResNet(2, 3, hidden=16, blocks=2, time_dim=8)
    x, t, cond = torch.randn(4, 2), torch.rand(4), torch.randn(4, 3)
    assert not torch.equal(net(x, t, cond), net(x, t, cond))
    net.eval()
    torch.testing.assert_close(net(x, t, cond), net(x, t, cond))
    assert net(x, t, None).shape == (4, 2)


def test_actor_network_sees_the_chain_index():
    model = actor_model(1, 2, "ln_resnet", hidden=8, depth=1, time_dim=4, diffusion_steps=5)
    seen = []
    model.denoiser.time_features.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model.loss(torch.zeros(256, 2), torch.zeros(256, 1))
    torch.testing.assert_close(torch.unique(seen[0]), torch.arange(5.0))


def test_default_actor_is_the_ln_resnet_and_the_policy_acts_with_ema_weights(tmp_path):
    dataset = bandit()
    agent = make_agent(dataset, ema_decay=0.5)
    assert isinstance(agent.actor.denoiser, LNResNet)
    train(agent, dataset, 3)
    policy = agent.policy(seed=0)
    ema = agent.actor_learner.ema_module.state_dict()
    for name, value in policy.actor.model.state_dict().items():
        torch.testing.assert_close(value, ema[name])
    assert any(not torch.equal(v, agent.actor.state_dict()[k]) for k, v in ema.items())
    for name, value in policy.actor.critic.state_dict().items():
        torch.testing.assert_close(value, agent.critic.target.state_dict()[name])
    loaded = load_policy(policy.save(tmp_path / "policy.pt"))
    assert isinstance(loaded.actor.model.denoiser, LNResNet) and not loaded.actor.model.training
    for name, value in loaded.actor.state_dict().items():
        torch.testing.assert_close(value, policy.actor.state_dict()[name])
    obs = np.zeros((3, 1), dtype=np.float32)
    policy.reset(seed=4)
    loaded.reset(seed=4)
    np.testing.assert_array_equal(loaded.act(obs), policy.act(obs))


# ------------------------------------------------------------------------------------------- update
def test_update_metrics_and_learners():
    agent = make_agent()
    check_metrics(train(agent, bandit(), 2), {"value_loss", "critic_loss", "bc_loss", "q_mean", "v_mean"})
    assert agent.value_learner.num_steps == agent.critic_learner.num_steps == agent.actor_learner.num_steps == 2
    assert agent.actor_learner.optimizer.param_groups[0]["weight_decay"] == 1e-4


def test_update_wiring_follows_the_official_order():
    """V: expectile regression on the target critics' min Q; Q: r + gamma (1 - done) V(s') with V after its step;
    then the Polyak target update."""
    dataset = load_dataset("toy:pointnav").to(dtype=torch.float64)  # bandit transitions are all terminal
    agent = IDQL.from_dataset(dataset, IDQLConfig(**SMALL, value_lr=0.05, reward_normalization="none"),
                             dtype=torch.float64)
    train(agent, dataset, 2)
    with torch.no_grad():  # pull the online critics away from their targets
        for p in agent.critic.q.parameters():
            p.add_(0.3 * torch.randn_like(p))
    before = copy.deepcopy(agent)
    batch = dataset.sample(64, torch.Generator().manual_seed(3))
    metrics = agent.update(batch)

    b = before.prepare(batch)
    obs, actions, c = b["obs"], b["actions"], agent.config
    with torch.no_grad():
        v_old = before.value(obs)
        expected_v = expectile_loss(before.critic.target.min(obs, actions) - v_old, c.expectile)
        online_v = expectile_loss(before.critic.q.min(obs, actions) - v_old, c.expectile)
        q_old = before.critic.q(obs, actions)
        discount = c.gamma * (1 - b["terminals"])
        expected_q = (q_old - (b["rewards"] + discount * agent.value(b["next_obs"]))).pow(2).mean()
        stale_q = (q_old - (b["rewards"] + discount * before.value(b["next_obs"]))).pow(2).mean()
    torch.testing.assert_close(metrics["value_loss"], expected_v)
    torch.testing.assert_close(metrics["critic_loss"], expected_q)
    assert not torch.allclose(online_v, expected_v) and not torch.allclose(stale_q, expected_q)
    for new, old, online in zip(agent.critic.target.parameters(), before.critic.target.parameters(),
                                agent.critic.q.parameters(), strict=True):
        torch.testing.assert_close(new, (1 - c.tau) * old + c.tau * online)


def test_float64_update_and_policy_act():
    dataset = bandit()
    agent = IDQL.from_dataset(dataset, IDQLConfig(**SMALL), dtype=torch.float64)
    batch = dataset.to(dtype=torch.float64).sample(32, torch.Generator().manual_seed(0))
    with only_float64():
        for _ in range(2):
            metrics = agent.update(batch)
    assert all(v.dtype == torch.float64 for v in metrics.values() if isinstance(v, torch.Tensor))
    policy = agent.policy(seed=0)

    for selection in ("max_q", "expectile", "softmax"):
        policy.actor = GuardedActor(agent.build_actor(selection=selection).double())
        assert policy.act(np.zeros((3, 1))).shape == (3, 2)


def test_policy_and_state_round_trip(tmp_path):
    check_policy(make_agent(), tmp_path)
    check_state_round_trip(make_agent, bandit(), tmp_path)
    agent = make_agent()
    other = make_agent(reward_normalization="none")
    other.load_state_dict(agent.state_dict())
    assert other.config.reward_scale == agent.config.reward_scale


@pytest.mark.slow
def test_bandit_selection_prefers_high_reward_actions():
    dataset = bandit(4000)
    torch.manual_seed(0)
    # a one-step bandit, not a locomotion task: rewards as they are (x1000 would leave the critics far from their
    # targets after 400 updates)
    config = IDQLConfig(**SMALL, reward_normalization="none")
    config = dataclasses.replace(config, hidden=64, critic_hidden=64, actor_lr=1e-3)
    agent = IDQL.from_dataset(dataset, config)
    train(agent, dataset, 400, batch_size=256)
    behaviour = mean_reward(agent.policy(seed=0, n_candidates=1))
    assert mean_reward(agent.policy(seed=0)) > behaviour + 0.2
    assert mean_reward(agent.policy(seed=0, selection="softmax", temperature=20.0)) > behaviour + 0.2


@pytest.mark.parametrize("kind", ["idql", "qgpo", "diffusion_ql"])
def test_one_command_training_writes_checkpoints_and_policy(kind, tmp_path, capsys):
    from agents import AGENTS
    from diffrl.cli import main

    run_dir = tmp_path / kind
    fields = {f.name for f in dataclasses.fields(AGENTS[kind][0])}
    small = [f"{k}={v}" for k, v in (("hidden", 16), ("critic_hidden", 16), ("depth", 2)) if k in fields]
    main(["train", kind, "--dataset", "toy:bandit-8gaussians", "--steps", "4", "--log-every", "2",
          "--eval-episodes", "0", "--run-dir", str(run_dir), *small])
    assert (run_dir / "checkpoints" / "latest.pt").is_file() and any((run_dir / "tb").iterdir())
    assert load_policy(run_dir / "policy.pt").act(torch.zeros(1).numpy()).shape == (2,)


def test_config_dataclass_round_trip():
    config = IDQLConfig(**SMALL)
    assert IDQLConfig(**dataclasses.asdict(config)) == config
