"""DDPO: step log-probabilities, per-class advantages, PPO clipping, LoRA adapters, updates, diffusers adapter."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from torch.distributions import Normal

from agents.ddpo import (
    DDPO,
    DDPOConfig,
    PerPromptStatTracker,
    SampleEvaluator,
    approx_kl,
    clipped_surrogate,
    image_grid,
)
from agents.ddpo_chains import mean_log_prob
from agents.lora import adapters_disabled, add_lora, lora_parameters
from diffrl.guidance import ClassifierFree
from diffrl.model import DiffusionModel
from diffrl.nets.unet2d import UNet2D
from diffrl.schedules import DiscreteVP
from diffrl.solvers import DDIM

SHAPE = (1, 8, 8)


def tiny_model(num_classes: int = 3, seed: int = 0, clip_x0: float | None = 1.0) -> DiffusionModel:
    torch.manual_seed(seed)
    net = UNet2D(1, 8, (1, 2), num_classes=num_classes, image_size=8, attention_heads=0)
    return DiffusionModel(net, DiscreteVP.cosine(100), "eps", clip_x0=clip_x0).eval()


def brightness_reward(images: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def tiny_agent(method: str = "is", **overrides) -> DDPO:
    kwargs = dict(method=method, sample_steps=3, guidance_scale=2.0, minibatch_size=8, drift_samples=2, lora_rank=0)
    kwargs.update(overrides)
    model = tiny_model()
    return DDPO(DDPOConfig(**kwargs), model, brightness_reward, SHAPE, num_classes=3)


def closed_form_step(model: DiffusionModel, x, x_next, t, s, labels, weight: float, eta: float) -> torch.Tensor:
    """log N(x_next; mean, std^2) of the guided DDIM step written out from the DDIM formulas (x0 clipped to [-1, 1]),
    averaged over the dimensions."""
    sched = model.schedule
    eps_c, eps_u = model.denoiser(x, t, labels), model.denoiser(x, t, None)
    eps = eps_u + weight * (eps_c - eps_u)
    a_t, s_t, a_s, s_s = (v.double().reshape(-1, 1, 1, 1) for v in (sched.alpha(t), sched.sigma(t),
                                                                       sched.alpha(s), sched.sigma(s)))
    x, eps = x.double(), eps.double()
    x0 = ((x - s_t * eps) / a_t).clamp(-1.0, 1.0)
    eps = (x - a_t * x0) / s_t
    std = eta * (s_s / s_t) * (s_t**2 - (a_t / a_s) ** 2 * s_s**2).sqrt()
    mean = a_s * x0 + (s_s**2 - std**2).sqrt() * eps
    return Normal(mean, std.expand_as(mean)).log_prob(x_next.double()).flatten(1).mean(1)


@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_step_log_prob_matches_closed_form_gaussian(weight):
    model = tiny_model()
    solver = DDIM(eta=0.8)
    labels = torch.tensor([0, 1, 2, 1])
    traj = solver.sample_trajectory(model, torch.randn(4, *SHAPE), labels, steps=5,
                                    guidance=ClassifierFree(weight),
                                    generator=torch.Generator().manual_seed(0))
    grid = traj.times
    with torch.no_grad():
        for k in range(4):
            t, s = grid[k].expand(4), grid[k + 1].expand(4)
            expected = closed_form_step(model, traj.latents[k], traj.latents[k + 1], t, s, labels, weight, 0.8)
            dist = solver.step_distribution(model, traj.latents[k], t, s, labels, ClassifierFree(weight))
            got = mean_log_prob(traj.latents[k + 1], dist.mean, dist.std)
            torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(traj.log_probs[:, k] / 64, got)


def test_agent_recomputes_the_sampled_log_probs_under_cfg():
    agent = tiny_agent()
    batch = agent.collect(6, torch.Generator().manual_seed(1))
    recomputed = agent.chain_log_probs(batch["latents"], batch["cond"])
    torch.testing.assert_close(recomputed, batch["log_probs"], rtol=1e-5, atol=1e-4)
    assert batch["latents"].shape == (6, 4, *SHAPE) and batch["log_probs"].shape == (6, 3)  # all 3 steps stochastic
    torch.testing.assert_close(batch["drift"], torch.zeros(2), atol=1e-4, rtol=0)  # policy == start


def test_stat_tracker_normalises_per_class_and_falls_back_to_global():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=3)
    classes = torch.tensor([0, 0, 0, 1, 1])
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0])
    adv = tracker.update(classes, rewards)
    std0 = torch.tensor([1.0, 2.0, 3.0]).std(unbiased=False)
    torch.testing.assert_close(adv[:3], (rewards[:3] - 2.0) / std0)
    glob = (rewards[3:] - rewards.mean()) / rewards.std(unbiased=False)  # class 1 has only 2 < 3 rewards
    torch.testing.assert_close(adv[3:], glob)
    # The next batch of class 1 is normalised by its buffer {10, 20, 30}.
    adv = tracker.update(torch.tensor([1]), torch.tensor([30.0]))
    buffer = torch.tensor([10.0, 20.0, 30.0])
    torch.testing.assert_close(adv, (torch.tensor([30.0]) - 20.0) / buffer.std(unbiased=False))
    restored = PerPromptStatTracker(8, 3)
    restored.load_state_dict(tracker.state_dict())
    assert list(restored.buffers[1]) == [10.0, 20.0, 30.0]


def test_stat_tracker_buffer_keeps_the_latest_rewards_and_takes_prompt_strings():
    tracker = PerPromptStatTracker(buffer_size=2, min_count=1)
    tracker.update(torch.tensor([0, 0, 0]), torch.tensor([1.0, 2.0, 3.0]))
    assert list(tracker.buffers[0]) == [2.0, 3.0]
    adv = tracker.update(["cat", "dog", "cat"], torch.tensor([1.0, 5.0, 3.0]))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + 1e-6))
    restored = PerPromptStatTracker(2, 1)
    restored.load_state_dict(tracker.state_dict())
    assert list(restored.buffers["cat"]) == [1.0, 3.0] and list(restored.buffers[0]) == [2.0, 3.0]


@pytest.mark.parametrize(("adv", "ratio", "has_grad"), [
    (1.0, 1.5, False), (1.0, 0.5, True), (-1.0, 0.5, False), (-1.0, 1.5, True), (1.0, 1.05, True),
])
def test_ppo_clipping_zeroes_gradient_outside_the_range(adv, ratio, has_grad):
    log_prob = torch.tensor([0.0], requires_grad=True)
    old = torch.log(torch.tensor([1.0 / ratio]))
    clipped_surrogate(log_prob, old, torch.tensor([adv]), clip_range=0.1).sum().backward()
    assert (log_prob.grad.abs().item() > 0) == has_grad
    if has_grad:
        torch.testing.assert_close(log_prob.grad, torch.tensor([-adv * ratio]))


def test_lora_starts_as_identity_and_only_adapters_train():
    model = tiny_model()
    x, t, c = torch.randn(3, *SHAPE), torch.rand(3), torch.tensor([0, 1, 2])
    before = model.denoiser(x, t, c)
    params = add_lora(model.denoiser, rank=2)
    names = {n for n, _ in model.denoiser.named_parameters() if "lora_" in n}
    assert any("film" in n for n in names) and any("block1.0" in n for n in names)  # linear and conv layers
    torch.testing.assert_close(model.denoiser(x, t, c), before)
    model.denoiser(x, t, c).square().mean().backward()
    adapters = set(map(id, params))
    assert adapters == set(map(id, lora_parameters(model.denoiser)))
    for name, p in model.denoiser.named_parameters():
        if id(p) in adapters:
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
        moved = model.denoiser(x, t, c)
        with adapters_disabled(model.denoiser):
            torch.testing.assert_close(model.denoiser(x, t, c), before)  # the base model, no copy
    assert not torch.allclose(moved, before) and all(p.requires_grad for p in params)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model.denoiser, rank=2)
    with pytest.raises(ValueError, match="do not name layers"):
        add_lora(tiny_model().denoiser, rank=2, targets=["no_such_layer"])


def test_advantages_are_clipped_in_the_loss():
    agent = tiny_agent("sf", adv_clip_max=0.5, minibatch_size=100)
    batch = agent.collect(4, torch.Generator().manual_seed(2))
    batch["advantages"] = torch.tensor([3.0, -2.0, 0.25, 0.0])
    i, k = torch.arange(4).repeat_interleave(3), torch.arange(3).repeat(4)
    got = agent.gradients(batch, i, k)
    lp = agent.chain.log_prob(batch["latents"][i, k], batch["latents"][i, k + 1], k, batch["cond"][i])
    clipped = torch.tensor([0.5, -0.5, 0.25, 0.0])[i]
    expected = torch.autograd.grad(-(clipped * lp).mean(), agent.learner.params, allow_unused=True)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e)


@pytest.mark.parametrize("method", ["sf", "is"])
def test_gradient_accumulated_over_chunks_equals_the_full_batch_gradient(method):
    agent = tiny_agent(method, clip_range=0.2, stat_min_count=100, minibatch_size=1000).to(dtype=torch.float64)
    batch = agent.collect(5, torch.Generator().manual_seed(3))
    i, k = torch.arange(5).repeat_interleave(3), torch.arange(3).repeat(5)
    full = agent.gradients(batch, i, k)
    agent.config.minibatch_size = 4  # 15 pairs in chunks of 4, 4, 4, 3
    chunked = agent.gradients(batch, i, k)
    assert any(g.abs().sum() > 0 for g in full)
    for a, b in zip(full, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_one_optimiser_step_per_train_batch_over_all_steps():
    agent = tiny_agent("is", inner_epochs=2, train_batch_size=2, minibatch_size=5)
    metrics = agent.update(agent.collect(6, torch.Generator().manual_seed(4)))
    assert metrics["num_updates"] == 2 * 3  # two inner epochs of three train batches; 6 pairs each in 2 chunks
    assert agent.learner.num_steps == 6
    sf = tiny_agent("sf", minibatch_size=2)
    assert sf.update(sf.collect(6, torch.Generator().manual_seed(4)))["num_updates"] == 1


def test_approx_kl_matches_its_closed_form_on_a_one_step_gaussian():
    """Step log-probs averaged over D dims: with log-ratio m = mean_d(log p - log p_old) on x ~ p_old,
    E[0.5 m^2] = 0.5 (E[m]^2 + Var m), E[m] = -delta^2 / (2 sigma^2), Var m = delta^2 / (D sigma^2)."""
    g = torch.Generator().manual_seed(0)
    n, d, sigma, delta = 200_000, 16, 0.5, 0.1
    x = sigma * torch.randn(n, d, generator=g, dtype=torch.float64)
    std = torch.full((n, d), sigma, dtype=torch.float64)
    old = mean_log_prob(x, torch.zeros_like(x), std)
    new = mean_log_prob(x, torch.full_like(x, delta), std)
    mean_m, var_m = -delta**2 / (2 * sigma**2), delta**2 / (d * sigma**2)
    torch.testing.assert_close(approx_kl(new, old).item(), 0.5 * (mean_m**2 + var_m), rtol=0.02, atol=0)


class ConstantEps(nn.Module):
    """An eps-prediction "network" that outputs a learnable constant: one Gaussian step with a known mean."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(value))

    def forward(self, x, t, cond=None):
        return self.value.expand_as(x)


def test_kl_to_start_matches_the_closed_form_gaussian_kl_on_a_one_step_chain():
    model = DiffusionModel(ConstantEps(0.0), DiscreteVP.cosine(100), "eps", clip_x0=None)
    config = DDPOConfig(sample_steps=1, drift_samples=20_000, lora_rank=0, minibatch_size=20_000, stat_min_count=1)
    agent = DDPO(config, model, brightness_reward, SHAPE)
    shift = 0.3
    with torch.no_grad():
        agent.model.denoiser.value.fill_(shift)  # the policy's eps moves by `shift`; the reference stays at 0
    batch = agent.collect(20_000, torch.Generator().manual_seed(0))
    sched, (t, s) = model.schedule, agent.chain._grid(batch["latents"])
    a_t, s_t, a_s, s_s = (v.double() for v in (sched.alpha(t), sched.sigma(t), sched.alpha(s), sched.sigma(s)))
    std = (s_s / s_t) * (s_t**2 - (a_t / a_s) ** 2 * s_s**2).sqrt()
    mean_shift = ((s_s**2 - std**2).sqrt() - a_s * s_t / a_t) * shift  # d mean / d eps times the eps shift
    kl_per_dim = mean_shift**2 / (2 * std**2)
    torch.testing.assert_close(batch["drift"].double().mean(), kl_per_dim, rtol=0.05, atol=0)
    assert abs(batch["drift"].double().mean() - kl_per_dim) < 4 * batch["drift"].double().std() / 20_000**0.5


@pytest.mark.parametrize("method", ["sf", "is"])
def test_update_raises_log_prob_of_high_advantage_chains(method):
    agent = tiny_agent(method, lr=1e-5, clip_range=0.2, stat_min_count=100)
    batch = agent.collect(8, torch.Generator().manual_seed(2))
    metrics = agent.update(batch)
    assert metrics["num_updates"] == 1  # the whole batch in one step
    new = agent.chain_log_probs(batch["latents"], batch["cond"]).sum(1)
    change = new - batch["log_probs"].sum(1)
    assert float((batch["advantages"] * change).sum()) > 0
    best, worst = batch["advantages"].argmax(), batch["advantages"].argmin()
    assert change[best] > change[worst]


def test_lora_agent_trains_adapters_only_and_round_trips():
    agent = tiny_agent("is", lora_rank=2, lr=1e-3)
    frozen = {n: p.detach().clone() for n, p in agent.chain.named_parameters() if not p.requires_grad}
    agent.update(agent.collect(4, torch.Generator().manual_seed(3)))
    for name, p in agent.chain.named_parameters():
        if name in frozen:
            torch.testing.assert_close(p, frozen[name])
    batch = agent.collect(4, torch.Generator().manual_seed(4))
    assert batch["drift"].abs().max() > 0  # moved away from the starting model
    assert set(agent.trainable_state()) == {n for n, _ in agent.chain.named_parameters() if "lora_" in n}
    clone = tiny_agent("is", lora_rank=2, lr=1e-3, seed=5)
    clone.load_state_dict(agent.state_dict())
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(clone.sample(labels, torch.Generator().manual_seed(6)),
                               agent.sample(labels, torch.Generator().manual_seed(6)))
    with pytest.raises(ValueError, match="other parameters"):
        tiny_agent("is", lora_rank=0).load_state_dict(agent.state_dict())


@pytest.mark.parametrize(("fraction", "expected"), [(1.0, 3), (0.67, 2), (0.2, 1)])
def test_timestep_fraction_trains_a_random_subset_of_each_chains_steps(fraction, expected):
    agent = tiny_agent(timestep_fraction=fraction, train_batch_size=1)
    assert agent.trained_steps(3) == expected
    seen, gradients = [], agent.gradients
    agent.gradients = lambda batch, i, k, stats=None: (seen.append((i, k)), gradients(batch, i, k, stats))[1]
    agent.update(agent.collect(4, torch.Generator().manual_seed(0)))
    assert len(seen) == 4
    for i, k in seen:
        assert len(i) == expected and len(set(i.tolist())) == 1 and len(set(k.tolist())) == expected


def test_config_validation_and_evaluator(tmp_path):
    with pytest.raises(ValueError, match="eta"):
        DDPOConfig(eta=0.0)
    with pytest.raises(ValueError, match="on-policy"):
        DDPOConfig(method="sf", inner_epochs=2)
    with pytest.raises(ValueError, match="on-policy"):
        DDPOConfig(method="sf", train_batch_size=4)
    with pytest.raises(ValueError, match="method"):
        DDPOConfig(method="ppo")
    with pytest.raises(ValueError, match="train_batch_size"):
        DDPOConfig(train_batch_size=0)
    agent = tiny_agent()
    evaluator = SampleEvaluator(brightness_reward, torch.tensor([0, 1, 2, 0]), run_dir=tmp_path, nrow=2)
    result = evaluator(agent, 0)
    assert set(result) == {"reward_mean", "reward_std", "reward_sem"}
    assert (tmp_path / "grids" / "samples_000000.png").is_file()
    assert evaluator(agent, 0) == result  # fixed seed
    grid = image_grid(torch.zeros(3, 1, 8, 8), nrow=2, scale=2)
    assert grid.shape == (2 * 17 + 1, 2 * 17 + 1) and grid[1, 1] == 128


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed")
def test_diffusers_unet_through_the_adapter():
    from diffusers import DDIMScheduler, UNet2DModel

    from agents.diffusers_adapter import from_diffusers

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=4)  # 3 classes + the null class
    scheduler = DDIMScheduler(num_train_timesteps=100)
    model = from_diffusers(unet, scheduler, null_class=3).eval()
    k = torch.tensor([0, 37, 99])
    t = (k + 1).double() / 100
    torch.testing.assert_close(model.schedule.alpha(t) ** 2, scheduler.alphas_cumprod[k].double(), rtol=1e-5, atol=0)
    x, c = torch.randn(3, *SHAPE), torch.tensor([0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(model.denoiser(x, t.float(), c), unet(x, k, class_labels=c).sample)
        null = unet(x, k, class_labels=torch.full((3,), 3)).sample
        torch.testing.assert_close(model.denoiser(x, t.float(), None), null)
    config = DDPOConfig(sample_steps=3, guidance_scale=2.0, minibatch_size=8, lora_rank=2, lr=1e-3, drift_samples=2)
    agent = DDPO(config, model, brightness_reward, SHAPE, num_classes=3)
    batch = agent.collect(4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(agent.chain_log_probs(batch["latents"], batch["cond"]), batch["log_probs"],
                               rtol=1e-5, atol=1e-4)
    metrics = agent.update(batch)
    assert metrics["num_updates"] == 1 and all(torch.isfinite(torch.as_tensor(v)) for v in metrics.values())


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed")
def test_diffusers_cross_attention_unet_uses_prompt_embeddings():
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from agents.diffusers_adapter import from_diffusers

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=4)
    scheduler = DDIMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    prompts, null = torch.randn(3, 2, 8), torch.zeros(2, 8)
    model = from_diffusers(unet, scheduler, prompt_embeds=prompts, null_embed=null).eval()
    assert model.prediction.name == "v"
    x, k, c = torch.randn(3, *SHAPE), torch.tensor([0, 50, 99]), torch.tensor([2, 0, 1])
    t = (k + 1).float() / 100
    with torch.no_grad():
        torch.testing.assert_close(model.denoiser(x, t, c), unet(x, k, encoder_hidden_states=prompts[c]).sample)
        torch.testing.assert_close(model.denoiser(x, t, None),
                                   unet(x, k, encoder_hidden_states=null.expand(3, 2, 8)).sample)
    with pytest.raises(ValueError, match="prompt_embeds"):
        from_diffusers(unet, scheduler)
