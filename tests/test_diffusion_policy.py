"""DiffusionPolicy: the official noise schedule, EMA warmup, windows, chunk execution, backbones (U-Net widths, the
causal transformer), config checks and a short training run."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from agents import AGENTS
from agents.diffusion_policy import DiffusionPolicy, DiffusionPolicyConfig
from diffrl.nets.transformer import CausalTransformer1D
from diffrl.schedules import DiscreteVP
from diffrl.training import Learner
from envs.datasets import OfflineDataset

SMALL = dict(horizon=8, n_obs_steps=2, n_action_steps=4, dims=(8, 16), time_dim=8, d_model=16, n_layers=1, heads=2,
             total_steps=100, warmup_steps=5)


def dataset(lengths=(5, 7, 3)):
    """Episodes whose observation and action at step k of episode e both equal 100 e + k."""
    values = np.concatenate([100 * e + np.arange(n) for e, n in enumerate(lengths)]).astype(np.float32)
    ends = np.zeros(len(values), bool)
    ends[np.cumsum(lengths) - 1] = True
    return OfflineDataset(np.stack([values, -values], 1), values[:, None], np.zeros(len(values), np.float32),
                          terminals=ends)


def test_registered():
    assert AGENTS["diffusion_policy"] == (DiffusionPolicyConfig, DiffusionPolicy)


def squaredcos_cap_v2(n: int) -> np.ndarray:
    """diffusers' ``betas_for_alpha_bar`` with the squared-cosine alpha_bar (the official noise schedule)."""
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])


@pytest.mark.parametrize("num_train_steps", [100, 37])
def test_ddpm_squared_cosine_schedule_with_num_train_steps(num_train_steps):
    config = DiffusionPolicyConfig(**SMALL, num_train_steps=num_train_steps)
    actor = DiffusionPolicy(config, 2, 1).actor
    schedule = actor.model.schedule
    assert isinstance(schedule, DiscreteVP) and schedule.num_steps == num_train_steps
    np.testing.assert_allclose(schedule.betas.numpy(), squaredcos_cap_v2(num_train_steps), rtol=1e-6, atol=1e-12)
    assert (actor.solver.name, actor.steps, actor.model.prediction.name) == ("ddim", 10, "eps")


def official_decay(step: int, power: float = 0.75, max_value: float = 0.9999) -> float:
    """``EMAModel.get_decay`` of diffusion_policy (update_after_step 0, inv_gamma 1, min_value 0)."""
    step = max(0, step - 1)
    return 0.0 if step <= 0 else max(0.0, min(1 - (1 + step) ** -power, max_value))


def test_ema_decay_warms_up_as_the_official_ema():
    agent = DiffusionPolicy(DiffusionPolicyConfig(**SMALL), 2, 1)
    ema = agent.learner.ema
    for n in [*range(50), 1000, 10**5, 10**7]:
        assert ema.decay_at(n) == pytest.approx(official_decay(n), abs=1e-15)
    assert ema.decay_at(10**7) == 0.9999


def test_ema_average_follows_the_decay_sequence():
    torch.manual_seed(0)
    layer = nn.Linear(3, 1)
    learner = Learner(layer, lr=0.1, ema_decay=0.9999, ema_power=0.75)
    expected = [p.detach().clone() for p in layer.parameters()]
    for n in range(6):
        learner.step(layer(torch.randn(4, 3)).pow(2).mean())
        d = official_decay(n)
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, layer.parameters(), strict=True)]
        for e, p in zip(expected, learner.ema_module.parameters(), strict=True):
            torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-7)
    plain = Learner(nn.Linear(3, 1), ema_decay=0.995)  # without ema_power: the constant decay as before
    assert [plain.ema.decay_at(n) for n in (0, 1, 50)] == [0.995] * 3


def windows(agent, data):
    """Every training window of ``agent`` as a tuple of within-episode steps, with its episode."""
    seq = data.sequences(agent.config.horizon, pad_before=agent.config.n_obs_steps - 1,
                         pad_after=agent.config.n_action_steps - 1)
    obs = seq[torch.arange(len(seq))]["observations"][..., 0]
    return [(int(o[0]) // 100, tuple(int(v) % 100 for v in o)) for o in obs]


def test_windows_pad_as_the_official_sampler():
    # horizon 4, pad_before = n_obs_steps - 1 = 2, pad_after = n_action_steps - 1 = 1 (create_indices of
    # diffusion_policy/common/sampler.py: starts from -pad_before to length - horizon + pad_after)
    data = dataset((5, 3))
    agent = DiffusionPolicy.from_dataset(data, DiffusionPolicyConfig(**{**SMALL, "horizon": 4, "n_obs_steps": 3,
                                                                        "n_action_steps": 2}))
    assert windows(agent, data) == [
        (0, (0, 0, 0, 1)), (0, (0, 0, 1, 2)), (0, (0, 1, 2, 3)), (0, (1, 2, 3, 4)), (0, (2, 3, 4, 4)),
        (1, (0, 0, 0, 1)), (1, (0, 0, 1, 2)), (1, (0, 1, 2, 2))]
    batch = agent.batch_sampler(data)(2000, torch.Generator().manual_seed(0))
    assert torch.equal(batch["actions"][..., 0], batch["observations"][..., 0])
    drawn = {tuple(int(v) for v in row) for row in batch["observations"][..., 0]}
    assert drawn == {(0, 0, 0, 1), (0, 0, 1, 2), (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 4), (100, 100, 100, 101),
                     (100, 100, 101, 102), (100, 101, 102, 102)}
    seq = data.sequences(4, pad_before=2, pad_after=1)
    assert seq[torch.arange(len(seq))]["mask"].int().tolist() == [  # False on the repeated (padded) steps
        [0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0]]


def test_execution_starts_at_chunk_index_n_obs_steps_minus_one():
    agent = DiffusionPolicy(DiffusionPolicyConfig(**SMALL), 1, 1)  # identity normalisers
    policy = agent.policy(seed=0)
    histories = []

    def chunk(obs, generator=None):  # a hand-made plan: action k of the chunk is 10 * plan + k
        histories.append(obs[:, :, 0].tolist())
        return (10 * len(histories) + torch.arange(8.0)).expand(obs.shape[0], 8)[..., None]

    policy.actor.sample_chunk = chunk
    actions = [float(policy.act(np.array([float(step)]))[0]) for step in range(9)]
    assert actions == [11, 12, 13, 14, 21, 22, 23, 24, 31]  # n_action_steps = 4 actions from index 1 on
    assert histories == [[[0.0, 0.0]], [[3.0, 4.0]], [[7.0, 8.0]]]  # first observation repeated after reset
    policy.reset()
    assert float(policy.act(np.array([5.0]))[0]) == 41 and histories[-1] == [[5.0, 5.0]]


def test_paper_unet_widths_by_default():
    config = DiffusionPolicyConfig(total_steps=10**6)
    assert (config.dims, config.kernel_size, config.time_dim) == ((256, 512, 1024), 5, 256)
    net = DiffusionPolicy(config, 2, 2).actor.model.denoiser
    convs = [m for m in net.modules() if isinstance(m, nn.Conv1d) and m.kernel_size == (5,)]
    assert {m.out_channels for m in convs} == {256, 512, 1024}
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 8 for m in norms)
    learner = DiffusionPolicy(DiffusionPolicyConfig(**SMALL), 2, 2).learner
    group = learner.optimizer.param_groups[0]
    assert (group["betas"], group["weight_decay"], learner.warmup_steps) == ((0.95, 0.999), 1e-6, 5)


def test_transformer_settings_of_the_paper():
    config = DiffusionPolicyConfig(net="transformer")
    assert (config.d_model, config.n_layers, config.heads, config.causal_attn) == (256, 8, 4, True)
    assert (config.betas, config.weight_decay, config.warmup_steps) == ((0.9, 0.95), 1e-3, 1000)
    agent = DiffusionPolicy(DiffusionPolicyConfig(**SMALL, net="transformer"), 3, 2)
    net = agent.actor.model.denoiser
    assert isinstance(net, CausalTransformer1D) and net.n_obs_steps == 2 and len(net.decoder.layers) == 1
    assert agent.learner.optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def transformer(causal: bool = True) -> CausalTransformer1D:
    torch.manual_seed(0)
    net = CausalTransformer1D(2, 8, cond_dim=6, n_obs_steps=3, d_model=16, depth=2, heads=2, causal_attn=causal)
    for p in net.parameters():  # larger weights than the official init, so that every dependence shows
        nn.init.normal_(p, std=0.3)
    return net.eval()


def test_transformer_shapes_and_causal_attention():
    net = transformer()
    x, t, cond = torch.randn(4, 8, 2), torch.rand(4), torch.randn(4, 6)
    out = net(x, t, cond)
    assert out.shape == (4, 8, 2) and net(x[:, :5], t, cond).shape == (4, 5, 2)
    for i in range(7):
        later = x.clone()
        later[:, i + 1:] += torch.randn(4, 7 - i, 2)
        changed = (net(later, t, cond) - out).abs().amax(dim=(0, 2))
        assert (changed[: i + 1] < 1e-5).all() and changed[i + 1:].min() > 1e-4
    for j in range(3):  # observation j is visible to action tokens j, j + 1, ...
        moved = cond.view(4, 3, 2).clone()
        moved[:, j] += 1.0
        changed = (net(x, t, moved.view(4, 6)) - out).abs().amax(dim=(0, 2))
        assert (changed[:j] < 1e-5).all() and changed[j:].min() > 1e-4
    free = transformer(causal=False)
    later = x.clone()
    later[:, -1] += 1.0
    assert (free(later, t, cond) - free(x, t, cond))[:, 0].abs().max() > 1e-4


@pytest.mark.parametrize("net", ["unet1d", "transformer", "dit1d", "mlp"])
def test_backbones_train_and_sample(net):
    data = dataset()
    agent = DiffusionPolicy.from_dataset(data, DiffusionPolicyConfig(**SMALL, net=net, hidden=32, depth=2))
    sampler = agent.batch_sampler(data)
    metrics = agent.update(sampler(16, torch.Generator().manual_seed(0)))
    assert np.isfinite(float(metrics["loss"]))
    assert agent.policy(seed=0, solver="dpm-solver++", steps=5).act(np.zeros((2, 2))).shape == (2, 1)


def test_state_dict_round_trip():
    data = dataset()
    config = DiffusionPolicyConfig(**SMALL)
    agent = DiffusionPolicy.from_dataset(data, config)
    sampler = agent.batch_sampler(data)
    for _ in range(3):
        agent.update(sampler(16))
    clone = DiffusionPolicy(config, 2, 1)
    clone.load_state_dict(agent.state_dict())
    obs = np.array([[3.0, -3.0]])
    assert np.array_equal(agent.policy(seed=4).act(obs), clone.policy(seed=4).act(obs))


@pytest.mark.parametrize("kw, match", [(dict(net="cnn"), "net must be"), (dict(n_obs_steps=9), "n_obs_steps"),
                                       (dict(n_action_steps=8), "n_action_steps"),
                                       (dict(cameras=("image", "image")), "distinct"),
                                       (dict(cameras=("image",), net="mlp"), "sequence backbone"),
                                       (dict(cameras=("image",), crop_shape=(100, 84)), "larger")])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        DiffusionPolicyConfig(**{**SMALL, **kw})


def test_short_training_lowers_the_loss():
    torch.manual_seed(0)
    data = dataset((30, 30))
    agent = DiffusionPolicy.from_dataset(data, DiffusionPolicyConfig(**{**SMALL, "total_steps": 150}, lr=3e-3))
    sampler = agent.batch_sampler(data)
    generator = torch.Generator().manual_seed(0)
    losses = [agent.update(sampler(32, generator))["loss"] for _ in range(150)]
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20])
