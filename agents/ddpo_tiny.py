"""A tiny randomly initialised StableDiffusionPipeline, built offline: the test bed of DDPO's pipeline path.

16x16 RGB images from 4x8x8 latents: a small cross-attention U-Net, a two-block VAE, a one-layer CLIP text
encoder and a CLIPTokenizer over single letters (no merges), with Stable Diffusion's DDIM scheduler settings
(scaled-linear betas 0.00085 to 0.012, no sample clipping, steps offset 1). Its images are noise-like at the
start, so JPEG rewards have room to move; it runs a DDPO epoch in seconds on one CPU core.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def tiny_tokenizer(folder: str | os.PathLike):
    """A CLIPTokenizer over the 26 lower-case letters (word-final forms included), written to ``folder``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)


def tiny_pipeline(folder: str | os.PathLike, seed: int = 0):
    """The tiny StableDiffusionPipeline (see the module docstring); ``folder`` receives the tokenizer files."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(Path(folder) / "vocab")
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


def save_tiny_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny pipeline with ``save_pretrained`` to ``folder`` (``from_pretrained(folder)`` loads it)."""
    folder = Path(folder)
    tiny_pipeline(folder / "_build", seed).save_pretrained(str(folder))
    for name in ("vocab.json", "merges.txt"):
        (folder / "_build" / "vocab" / name).unlink()
    (folder / "_build" / "vocab").rmdir()
    (folder / "_build").rmdir()
    return folder
