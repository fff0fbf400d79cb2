"""DDPO: step log-probabilities, per-class advantages, PPO clipping, LoRA adapters, updates, diffusers adapter."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from torch.distributions import Normal

from agents.ddpo import DDPO, DDPOConfig, PerClassStatTracker, SampleEvaluator, clipped_surrogate, image_grid
from agents.lora import LoRA, add_lora, lora_parameters
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
    kwargs = dict(method=method, sample_steps=4, guidance_weight=2.0, minibatch_size=8, drift_samples=2)
    kwargs.update(overrides)
    model = tiny_model()
    return DDPO(DDPOConfig(**kwargs), model, brightness_reward, SHAPE, num_classes=3)


def closed_form_step(model: DiffusionModel, x, x_next, t, s, labels, weight: float, eta: float) -> torch.Tensor:
    """log N(x_next; mean, std^2) of the guided DDIM step written out from the DDIM formulas (x0 clipped to [-1, 1])."""
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
    return Normal(mean, std.expand_as(mean)).log_prob(x_next.double()).flatten(1).sum(1)


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
            torch.testing.assert_close(traj.log_probs[:, k].double(), expected, rtol=1e-4, atol=1e-2)


def test_agent_recomputes_the_sampled_log_probs_under_cfg():
    agent = tiny_agent()
    batch = agent.collect(6, torch.Generator().manual_seed(1))
    with torch.no_grad():
        recomputed = agent._log_probs(agent.model, batch["latents"], batch["labels"])
    torch.testing.assert_close(recomputed, batch["log_probs"], rtol=1e-5, atol=1e-2)
    assert batch["latents"].shape == (6, 4, *SHAPE) and batch["log_probs"].shape == (6, 3)
    torch.testing.assert_close(batch["drift"], torch.zeros(2), atol=1e-2, rtol=0)  # policy == start


def test_stat_tracker_normalises_per_class_and_falls_back_to_global():
    tracker = PerClassStatTracker(buffer_size=8, min_count=3)
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
    restored = PerClassStatTracker(8, 3)
    restored.load_state_dict(tracker.state_dict())
    assert list(restored.buffers[1]) == [10.0, 20.0, 30.0]


def test_stat_tracker_buffer_keeps_the_latest_rewards():
    tracker = PerClassStatTracker(buffer_size=2, min_count=1)
    tracker.update(torch.tensor([0, 0, 0]), torch.tensor([1.0, 2.0, 3.0]))
    assert list(tracker.buffers[0]) == [2.0, 3.0]


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
    base_params = {n: p.detach().clone() for n, p in model.denoiser.named_parameters()}
    names = add_lora(model.denoiser, rank=2)
    assert any("film" in n for n in names) and any("block1.0" in n for n in names)  # linear and conv layers
    torch.testing.assert_close(model.denoiser(x, t, c), before)
    model.denoiser(x, t, c).square().mean().backward()
    adapters = set(map(id, lora_parameters(model.denoiser)))
    for name, p in model.denoiser.named_parameters():
        if id(p) in adapters:
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, name
    ups = [m.up.weight for m in model.denoiser.modules() if isinstance(m, LoRA)]
    assert all(w.grad is not None for w in ups) and any(w.grad.abs().sum() > 0 for w in ups)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model.denoiser)
    with pytest.raises(TypeError):
        LoRA(nn.GroupNorm(1, 4))
    assert set(base_params) <= {n.replace("base.", "") for n, _ in model.denoiser.named_parameters()}


def _advantage_weighted_change(agent: DDPO, batch) -> float:
    with torch.no_grad():
        new = agent._log_probs(agent.model, batch["latents"], batch["labels"]).sum(1)
    old = batch["log_probs"].sum(1)
    return float((batch["advantages"] * (new - old)).sum())


@pytest.mark.parametrize("method", ["sf", "is"])
def test_update_raises_log_prob_of_high_advantage_chains(method):
    agent = tiny_agent(method, lr=1e-5, clip_range=0.2, stat_min_count=100)
    batch = agent.collect(8, torch.Generator().manual_seed(2))
    metrics = agent.update(batch)
    assert metrics["num_updates"] == (1 if method == "sf" else 2)  # 8 chains x 2 trained steps / minibatch 8
    assert _advantage_weighted_change(agent, batch) > 0
    with torch.no_grad():
        new = agent._log_probs(agent.model, batch["latents"], batch["labels"]).sum(1)
    change = new - batch["log_probs"].sum(1)
    best, worst = batch["advantages"].argmax(), batch["advantages"].argmin()
    assert change[best] > change[worst]


def test_lora_agent_trains_adapters_only_and_round_trips():
    agent = tiny_agent("is", lora_rank=2, lr=1e-3)
    frozen = {n: p.detach().clone() for n, p in agent.model.denoiser.named_parameters() if not p.requires_grad}
    agent.update(agent.collect(4, torch.Generator().manual_seed(3)))
    for name, p in agent.model.denoiser.named_parameters():
        if name in frozen:
            torch.testing.assert_close(p, frozen[name])
    batch = agent.collect(4, torch.Generator().manual_seed(4))
    assert batch["drift"].abs().max() > 0  # moved away from the starting model
    clone = tiny_agent("is", lora_rank=2, lr=1e-3, seed=5)
    clone.load_state_dict(agent.state_dict())
    g = torch.Generator().manual_seed(6)
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(clone.sample(labels, torch.Generator().manual_seed(6)), agent.sample(labels, g))


@pytest.mark.parametrize(("train_last_step", "fraction", "expected"), [(False, 1.0, {0, 1}), (True, 1.0, {0, 1, 2}),
                                                                       (True, 0.34, None)])
def test_trained_steps(train_last_step, fraction, expected):
    agent = tiny_agent(train_last_step=train_last_step, timestep_fraction=fraction)
    i, k = agent._pairs(5, 3)
    if expected is None:  # one random step per chain
        assert i.tolist() == [0, 1, 2, 3, 4] and k.max() <= 2
    else:
        assert set(k.tolist()) == expected and len(i) == 5 * len(expected)
        assert all((k[i == n].sort().values == torch.tensor(sorted(expected))).all() for n in range(5))


def test_config_validation_and_evaluator(tmp_path):
    with pytest.raises(ValueError, match="eta"):
        DDPOConfig(eta=0.0)
    with pytest.raises(ValueError, match="on-policy"):
        DDPOConfig(method="sf", inner_epochs=2)
    with pytest.raises(ValueError, match="method"):
        DDPOConfig(method="ppo")
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
    config = DDPOConfig(sample_steps=4, guidance_weight=2.0, minibatch_size=8, lora_rank=2, lr=1e-3, drift_samples=2)
    agent = DDPO(config, model, brightness_reward, SHAPE, num_classes=3)
    batch = agent.collect(4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(agent._log_probs(agent.model, batch["latents"], batch["labels"]),
                                   batch["log_probs"], rtol=1e-5, atol=1e-2)
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
