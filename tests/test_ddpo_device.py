"""DDPO follows its model's device and dtype: a float64 end-to-end cycle under the dtype guard, the agent's own
generator on the model's device, x_T built on the model's device and dtype, and LoRA adapters in the base dtype.
The CUDA tests skip where no GPU is present.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from dtype_guard import only_float64
from test_ddpo import SHAPE, brightness_reward, tiny_agent, tiny_model
from torch import nn

from agents.ddpo import DDPO, DDPOConfig, SampleEvaluator
from agents.lora import add_lora
from diffrl.training import TrainConfig, Trainer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def float64_agent(method: str, **overrides) -> DDPO:
    agent = tiny_agent(method, **overrides).to(dtype=torch.float64)
    assert agent.dtype == torch.float64
    return agent


@pytest.mark.parametrize(("method", "lora_rank"), [("is", 0), ("sf", 0), ("is", 2)])
def test_float64_collect_update_sample_round_trip(method, lora_rank):
    agent = float64_agent(method, lora_rank=lora_rank, lr=1e-3, clip_range=0.2, stat_min_count=100)
    labels = torch.tensor([0, 1, 2])
    with only_float64():
        batch = agent.collect(6, torch.Generator().manual_seed(0))
        metrics = agent.update(batch)
        images = agent.sample(labels, torch.Generator().manual_seed(1))
    for key in ("latents", "log_probs", "images", "rewards", "advantages", "drift"):
        assert batch[key].dtype == torch.float64, key
    assert images.dtype == torch.float64 and images.shape == (3, *SHAPE)
    assert metrics["num_updates"] >= 1
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == torch.float64 and torch.isfinite(value), key
    assert all(p.dtype == torch.float64 for p in agent.learner.params)

    clone = float64_agent(method, lora_rank=lora_rank, lr=1e-3, clip_range=0.2, stat_min_count=100, seed=7)
    clone.load_state_dict(agent.state_dict())
    assert all(p.dtype == torch.float64 for p in clone.model.parameters())
    torch.testing.assert_close(clone.sample(labels, torch.Generator().manual_seed(1)), images, rtol=0, atol=0)
    torch.testing.assert_close(clone.generator.get_state(), agent.generator.get_state())
    with only_float64():  # the restored agent keeps training in float64
        clone.update(clone.collect(4, torch.Generator().manual_seed(2)))


def test_evaluator_runs_in_float64(tmp_path):
    agent = float64_agent("is")
    evaluator = SampleEvaluator(brightness_reward, torch.tensor([0, 1]), run_dir=tmp_path, nrow=2)
    with only_float64():
        images = evaluator.images(agent)
    assert images.dtype == torch.float64
    assert set(evaluator(agent, 0)) == {"reward_mean", "reward_std", "reward_sem"}


def test_x_T_follows_the_model_dtype():
    """Chains and samples start from a prior draw in the dtype of the model the agent was built on."""
    config = DDPOConfig(sample_steps=3, guidance_scale=2.0, minibatch_size=8, drift_samples=2)
    agent = DDPO(config, tiny_model().double(), brightness_reward, SHAPE, num_classes=3)
    assert agent.sample(torch.tensor([0, 1]), torch.Generator().manual_seed(0)).dtype == torch.float64
    batch = agent.collect(3, torch.Generator().manual_seed(0))
    assert batch["latents"][:, 0].dtype == torch.float64
    # The same draw as one made directly in float64 with the same generator.
    generator = torch.Generator().manual_seed(0)
    agent.chain.draw(3, generator)
    expected = agent.model.schedule.prior((3, *SHAPE), generator=generator, dtype=torch.float64)
    torch.testing.assert_close(batch["latents"][:, 0], expected, rtol=0, atol=0)


def test_generator_lives_on_the_model_device_and_to_keeps_its_stream_on_the_same_device():
    agent = tiny_agent()
    assert agent.generator.device == agent.device == torch.device("cpu")
    torch.rand(3, generator=agent.generator)  # advances the stream
    state = agent.generator.get_state()
    agent.to(dtype=torch.float64)  # same device: the stream goes on
    torch.testing.assert_close(agent.generator.get_state(), state)
    restored = tiny_agent().to(dtype=torch.float64)
    restored.load_state_dict(agent.state_dict())
    torch.testing.assert_close(restored.generator.get_state(), state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_lora_adapters_take_the_base_layer_dtype(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).to(dtype)
    x = torch.randn(3, 1, 4, 4, dtype=dtype)
    expected = net(x)
    params = add_lora(net, rank=2)
    assert {p.dtype for p in params} == {dtype} and all(p.requires_grad for p in params)
    out = net(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # zero-initialised up: the base layers' output
    out.float().square().sum().backward()
    assert {p.grad.dtype for p in params if p.grad is not None} == {dtype}


@cuda
def test_cuda_agent_collects_updates_and_samples_on_the_gpu():
    agent = tiny_agent("is", lora_rank=2, lr=1e-3)
    agent.to("cuda")
    device = agent.device
    assert device.type == "cuda" and agent.generator.device == device
    generator = torch.Generator(device).manual_seed(0)
    batch = agent.collect(6, generator)
    for key in ("latents", "log_probs", "cond", "images", "rewards", "advantages", "drift"):
        assert batch[key].device == device, key
    metrics = agent.update(batch)
    assert all(v.device == device for v in metrics.values() if isinstance(v, torch.Tensor))
    assert agent.sample(torch.tensor([0, 1]), torch.Generator(device).manual_seed(1)).device == device
    assert all(p.device == device for p in agent.learner.params)
    evaluator = SampleEvaluator(brightness_reward, torch.tensor([0, 1]))
    assert set(evaluator(agent, 0)) == {"reward_mean", "reward_std", "reward_sem"}
    clone = tiny_agent("is", lora_rank=2, lr=1e-3, seed=3).to("cuda")
    clone.load_state_dict(agent.state_dict())
    torch.testing.assert_close(clone.generator.get_state(), agent.generator.get_state())
    torch.testing.assert_close(clone.sample(torch.tensor([0, 1]), torch.Generator(device).manual_seed(1)),
                               agent.sample(torch.tensor([0, 1]), torch.Generator(device).manual_seed(1)))
    history = Trainer(agent, agent.collect, TrainConfig(steps=2, batch_size=4, log_every=1, progress=False,
                                                        device="cuda")).fit()
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in history if "train/loss" in r)
    on_cpu = tiny_agent("is", lora_rank=2, lr=1e-3)
    clone.load_state_dict(on_cpu.state_dict())  # a CPU generator state cannot go to a CUDA generator: reseeded
    torch.testing.assert_close(clone.generator.get_state(), torch.Generator(device).manual_seed(3).get_state())
    agent.to("cpu")  # back on the CPU: a fresh CPU stream seeded from config.seed
    assert agent.generator.device.type == "cpu"
    torch.testing.assert_close(agent.generator.get_state(), torch.Generator().manual_seed(0).get_state())


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_lora_bfloat16_and_float32(dtype):
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1)).to("cuda", dtype)
    params = add_lora(net, rank=2)
    assert all(p.device == net[0].weight.device and p.dtype == dtype for p in params)
    assert net(torch.randn(1, 2, 5, 5, device="cuda", dtype=dtype)).dtype == dtype


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed")
def test_diffusers_prompt_embeddings_follow_the_unet_dtype():
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from agents.diffusers_adapter import from_diffusers

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=4).double()
    prompts, null = torch.randn(3, 2, 8), torch.zeros(2, 8)  # float32 embeddings for a float64 U-Net
    model = from_diffusers(unet, DDIMScheduler(num_train_timesteps=100), prompt_embeds=prompts, null_embed=null)
    assert model.denoiser.prompt_embeds.dtype == model.denoiser.null_embed.dtype == torch.float64
    x, t = torch.randn(3, *SHAPE, dtype=torch.float64), torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    with torch.no_grad():
        for cond in (torch.tensor([2, 0, 1]), None):
            assert model.denoiser(x, t, cond).dtype == torch.float64
