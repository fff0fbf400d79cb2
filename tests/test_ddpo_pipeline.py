"""DDPO on a diffusers text-to-image pipeline: a tiny randomly initialised StableDiffusionPipeline built offline
(agents.ddpo_tiny: small cross-attention U-Net, tiny VAE, tiny CLIP text encoder, a single-letter CLIP tokenizer)."""

from __future__ import annotations

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
from agents.ddpo_tiny import tiny_pipeline  # noqa: E402

PROMPTS = ("a cat", "a dog", "an owl")


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


def sf_gradients(agent: DDPO, batch: dict, precision: str = "fp32") -> tuple[list[torch.Tensor], torch.Tensor]:
    """DDPO's accumulated gradient over every (chain, step) pair of ``batch`` and the mean loss, under
    ``precision``'s autocast as the Trainer runs the update."""
    from diffrl.device import autocast

    n, steps = batch["log_probs"].shape
    i, k = torch.arange(n).repeat_interleave(steps), torch.arange(steps).repeat(n)
    stats = {"loss": [], "approx_kl": [], "clipfrac": []}
    with autocast("cpu", precision):
        grads = agent.gradients(batch, i, k, stats)
    return grads, torch.stack(stats["loss"]).mean()


def test_bf16_autocast_runs_the_pipeline_path_close_to_fp32(tmp_path):
    """bf16 on the CPU: sampling, log-probabilities and gradients stay finite and near fp32. Tolerances (measured
    values in brackets): the mean of every DDIM step within an RMS of 0.2 of the step's std (0.11 at most, at the
    0.04-std step t=251), the recomputed log-probs within 0.05 per dimension (0.01), the loss within 0.01 (5e-4),
    the gradient's cosine to the fp32 one above 0.85 (0.91) and its relative error below 0.6 (0.47): that low-noise
    step dominates the gradient, and the U-Net's bf16 outputs (8 bits of mantissa) move its mean by about a tenth of
    its std. The DDIM step itself is computed in float32."""
    from diffrl.device import autocast

    agent, _ = pipeline_agent(tmp_path, method="sf", minibatch_size=6)
    random.seed(7)
    batch = agent.collect(4, torch.Generator().manual_seed(7))
    batch["advantages"] = torch.tensor([1.5, 1.0, 0.5, 2.0])
    exact, exact_loss = sf_gradients(agent, batch)
    agent.set_precision("bf16")
    low, low_loss = sf_gradients(agent, batch, "bf16")
    assert all(torch.isfinite(g).all() for g in low) and torch.isfinite(low_loss)
    exact, low = (torch.cat([g.flatten() for g in grads]) for grads in (exact, low))
    assert exact.norm() > 0 and (low - exact).norm() / exact.norm() < 0.6
    assert torch.nn.functional.cosine_similarity(low, exact, dim=0) > 0.85
    assert abs(low_loss - exact_loss) < 0.01
    with torch.no_grad():
        for j in range(4):
            k = torch.full((4,), j)
            mean, std = agent.chain.step(batch["latents"][:, j], k, batch["cond"])
            with autocast("cpu", "bf16"):
                low_mean, _ = agent.chain.step(batch["latents"][:, j], k, batch["cond"])
            rms = ((low_mean - mean) / std).pow(2).mean().sqrt()
            assert low_mean.dtype == torch.float32 and rms < 0.2
    log_probs = agent.chain_log_probs(batch["latents"], batch["cond"])
    assert log_probs.dtype == torch.float32 and (log_probs - batch["log_probs"]).abs().max() < 0.05
    random.seed(8)
    sampled = agent.collect(2, torch.Generator().manual_seed(8))  # sampling under the agent's bf16 autocast
    assert all(torch.isfinite(sampled[key]).all() for key in ("latents", "log_probs", "rewards"))


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    plain, _ = pipeline_agent(tmp_path, method="sf", minibatch_size=6)
    checkpointed, pipe = pipeline_agent(tmp_path, method="sf", minibatch_size=6, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    calls = []
    for module in pipe.unet.modules():
        if getattr(module, "gradient_checkpointing", False):
            inner = module._gradient_checkpointing_func
            module._gradient_checkpointing_func = lambda *a, _f=inner, **kw: calls.append(1) or _f(*a, **kw)
    random.seed(9)
    batch = plain.collect(3, torch.Generator().manual_seed(9))
    batch["advantages"] = torch.tensor([1.0, -0.5, 0.25])
    expected, _ = sf_gradients(plain, batch)
    got, _ = sf_gradients(checkpointed, batch)
    assert calls  # the U-Net's blocks ran through activation checkpointing
    assert any(g.abs().sum() > 0 for g in expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
