"""DDPO on a diffusers text-to-image pipeline: a tiny randomly initialised StableDiffusionPipeline built offline
(small cross-attention U-Net, tiny VAE, tiny CLIP text encoder, a CLIP tokenizer from a vocabulary written here)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from agents.ddpo import DDPO, DDPOConfig, SampleEvaluator  # noqa: E402
from agents.ddpo_chains import PipelineChain  # noqa: E402

PROMPTS = ("a cat", "a dog", "an owl")


def write_tokenizer(folder: Path):
    """A CLIPTokenizer over single letters (no merges): enough to tell the test prompts apart."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)


def tiny_pipeline(folder: Path, seed: int = 0):
    """A StableDiffusionPipeline with 16x16 images from 8x8x4 latents, SD's DDIM scheduler settings."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = write_tokenizer(folder / "vocab")
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
                                cross_attention_dim=16, attention_head_dim=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16, layers_per_block=1)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def prompt_fn():
    prompt = random.choice(PROMPTS)
    return prompt, {"animal": prompt.split()[-1]}


def mean_brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))


def pipeline_agent(folder: Path, **overrides) -> tuple[DDPO, object]:
    settings = dict(sample_steps=4, guidance_scale=3.0, minibatch_size=16, drift_samples=4, stat_min_count=1,
                    lr=1e-2)
    settings.update(overrides)
    pipe = tiny_pipeline(folder)
    return DDPO.from_pipeline(pipe, DDPOConfig(**settings), prompt_fn, mean_brightness), pipe


def closed_form_log_prob(pipe, x, x_next, timestep: int, stride: int, text, null, scale: float) -> torch.Tensor:
    """log N(x_next; mean, std^2) of SD's DDIM step (eta 1) written out from its alphas_cumprod, mean over dims."""
    ac = pipe.scheduler.alphas_cumprod.double()
    a_t, a_prev = ac[timestep], ac[max(timestep - stride, 0)]
    t = torch.full((len(x),), timestep)
    with torch.no_grad():
        cond = pipe.unet(x, t, encoder_hidden_states=text).sample
        uncond = pipe.unet(x, t, encoder_hidden_states=null.expand_as(text)).sample
    eps = (uncond + scale * (cond - uncond)).double()
    x0 = (x.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # not clipped
    std = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    return Normal(mean, std).log_prob(x_next.double()).flatten(1).mean(1)


def test_pipeline_log_probs_equal_the_closed_form_ddim_step(tmp_path):
    agent, pipe = pipeline_agent(tmp_path)
    chain = agent.chain
    assert isinstance(chain, PipelineChain) and chain.timesteps.tolist() == [751, 501, 251, 1]
    random.seed(0)
    batch = agent.collect(3, torch.Generator().manual_seed(0))
    assert batch["latents"].shape == (3, 5, 4, 8, 8) and batch["log_probs"].shape == (3, 4)
    assert batch["images"].shape == (3, 3, 16, 16) and 0 <= batch["images"].min() <= batch["images"].max() <= 1
    null = chain.encode([""])
    for j, timestep in enumerate(chain.timesteps.tolist()):
        expected = closed_form_log_prob(pipe, batch["latents"][:, j], batch["latents"][:, j + 1], timestep, 250,
                                        batch["cond"], null, 3.0)
        torch.testing.assert_close(batch["log_probs"][:, j].double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(agent.chain_log_probs(batch["latents"], batch["cond"]), batch["log_probs"],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch["drift"], torch.zeros(3), atol=1e-5, rtol=0)  # the policy is the start
    assert batch["latents"].abs().max() > 1  # latents are not clamped


def test_one_epoch_changes_the_lora_weights_only(tmp_path):
    agent, pipe = pipeline_agent(tmp_path, train_batch_size=2)
    seen = []

    def reward(images, prompts, metadata):
        seen.append((images.shape, list(prompts), list(metadata)))
        return images.mean(dim=(1, 2, 3))

    agent.reward_fn = reward
    before = {name: p.detach().clone() for part in (pipe.unet, pipe.vae, pipe.text_encoder)
              for name, p in part.named_parameters(prefix=type(part).__name__)}
    random.seed(1)
    metrics = agent.update(agent.collect(4, torch.Generator().manual_seed(1)))
    assert metrics["num_updates"] == 2 and torch.isfinite(metrics["loss"])
    (shape, prompts, metadata), = seen
    assert shape == (4, 3, 16, 16) and set(prompts) <= set(PROMPTS)
    assert [m["animal"] for m in metadata] == [p.split()[-1] for p in prompts]
    after = {name: p.detach() for part in (pipe.unet, pipe.vae, pipe.text_encoder)
             for name, p in part.named_parameters(prefix=type(part).__name__)}
    changed = {name for name in after if not torch.equal(before[name], after[name])}
    lora = {name for name in after if "lora_" in name}
    assert lora and all(any(f".{t}.lora_" in n for t in ("to_q", "to_k", "to_v", "to_out.0")) for n in lora)
    assert changed and changed <= lora  # U-Net base weights, VAE and text encoder untouched
    random.seed(2)
    assert agent.collect(2, torch.Generator().manual_seed(2))["drift"].abs().max() > 0


def test_saved_lora_reloads_into_a_fresh_pipeline(tmp_path):
    agent, pipe = pipeline_agent(tmp_path, lr=5e-2)
    random.seed(3)
    agent.update(agent.collect(4, torch.Generator().manual_seed(3)))
    folder = agent.save_lora(tmp_path / "lora")
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    fresh = tiny_pipeline(tmp_path)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([501, 251])
    text = agent.chain.encode(["a cat", "an owl"])
    with torch.no_grad():
        base = fresh.unet(x, t, encoder_hidden_states=text).sample
        trained = pipe.unet(x, t, encoder_hidden_states=text).sample
        with agent.chain.reference():  # the reference: the same U-Net with its adapters off
            torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=text).sample, base, rtol=0, atol=0)
        fresh.load_lora_weights(str(folder))
        reloaded = fresh.unet(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-6)
    assert (trained - base).abs().max() > 1e-4


def test_merged_pipeline_reloads_exactly(tmp_path):
    from diffusers import StableDiffusionPipeline

    agent, pipe = pipeline_agent(tmp_path, lr=5e-2)
    random.seed(4)
    agent.update(agent.collect(4, torch.Generator().manual_seed(4)))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([751, 1])
    text = agent.chain.encode(["a dog", "a cat"])
    with torch.no_grad():
        trained = pipe.unet(x, t, encoder_hidden_states=text).sample
    from agents.lora import merged_copy

    with torch.no_grad():
        merged = merged_copy(pipe.unet)(x, t, encoder_hidden_states=text).sample
    agent.save_merged(tmp_path / "merged")
    reloaded = StableDiffusionPipeline.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in name for name, _ in reloaded.unet.named_parameters())
    with torch.no_grad():
        out = reloaded.unet(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(out, merged, rtol=0, atol=0)  # the saved weights are the merged ones, exactly
    torch.testing.assert_close(out, trained, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the agent's U-Net still carries its (unmerged) adapters
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=text).sample, trained, rtol=0, atol=0)


def test_full_unet_training_keeps_a_frozen_reference_and_round_trips(tmp_path):
    agent, pipe = pipeline_agent(tmp_path, lora_rank=0, lr=1e-3, method="sf")
    assert agent.chain.frozen is not None and not any(p.requires_grad for p in agent.chain.frozen.parameters())
    random.seed(5)
    agent.update(agent.collect(2, torch.Generator().manual_seed(5)))
    random.seed(6)
    batch = agent.collect(2, torch.Generator().manual_seed(6))
    assert batch["drift"].abs().max() > 0
    clone, _ = pipeline_agent(tmp_path, lora_rank=0, lr=1e-3, method="sf")
    clone.load_state_dict(agent.state_dict())
    torch.testing.assert_close(clone.sample(["a cat"], torch.Generator().manual_seed(0)),
                               agent.sample(["a cat"], torch.Generator().manual_seed(0)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="save_merged"):
        agent.save_lora(tmp_path / "nope")


def test_pipeline_evaluator_writes_a_captioned_grid(tmp_path):
    agent, _ = pipeline_agent(tmp_path)
    evaluator = SampleEvaluator(None, list(PROMPTS), run_dir=tmp_path / "run", nrow=3)
    result = evaluator(agent, 0)
    assert set(result) == {"reward_mean", "reward_std", "reward_sem"} and evaluator(agent, 0) == result
    from PIL import Image

    grid = Image.open(tmp_path / "run" / "grids" / "samples_000000.png")
    assert grid.size[0] == 3 * 64 + 4 and grid.size[1] > 64 + 12  # three 16x16 tiles at 4x, caption strips
    assert any((tmp_path / "run" / "tb_images").iterdir())


def test_pipeline_without_a_part_is_refused(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    pipe.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        DDPO.from_pipeline(pipe, DDPOConfig(sample_steps=2), prompt_fn, mean_brightness)
