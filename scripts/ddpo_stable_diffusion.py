"""DDPO on Stable Diffusion 1.5 with the paper's settings, sized for one 24 GB GPU; reports peak GPU memory and
images/s. ``--dry-run`` checks the whole path on the CPU in seconds with a small pipeline folder (e.g. the tiny
one of agents.ddpo_tiny)::

    python scripts/ddpo_stable_diffusion.py --model runwayml/stable-diffusion-v1-5 --reward jpeg_compressibility
    python scripts/ddpo_stable_diffusion.py --model /tmp/tiny --dry-run

Black et al. 2023 (ddpo-pytorch config/base.py and the compressibility config): 50 DDIM steps, eta 1, guidance 5,
LoRA rank 4 on the attention projections, AdamW lr 3e-4, clip range 1e-4, advantages clipped at 5, per-prompt
statistics, 256 images per epoch. Memory, for 24 GB: the U-Net, VAE and text encoder keep float32 master weights
(about 4.3 GB in all) and only the LoRA adapters (about 3 MB) have gradients and AdamW state; the forward passes
run under bf16 (or fp16) autocast; chains are sampled ``--sample-batch-size`` (8) at a time, 16 U-Net rows with
classifier-free guidance; log-probabilities are evaluated and back-propagated ``--minibatch-size`` (4) (chain,
step) pairs at a time, 8 rows with guidance, with the U-Net's activations checkpointed, while the gradient of the
whole train batch accumulates over the chunks; the 256 x 51 latents of an epoch (4x64x64 each, float32) take
about 0.2 GB. The run folder is the one of ``diffrl train ddpo``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

#: Common animal names, the kind of prompt set the paper fine-tunes compressibility and aesthetics on.
DEFAULT_PROMPTS = ("cat", "dog", "horse", "cow", "sheep", "rabbit", "fox", "owl", "duck", "frog", "lion", "bear",
                   "deer", "goat", "monkey", "penguin", "turtle", "zebra", "elephant", "squirrel")


def main(argv: list[str] | None = None) -> None:
    from diffrl.api import train_ddpo
    from diffrl.device import resolve_device
    from envs.image_rewards import REWARD_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Stable Diffusion pipeline: a folder or a hub id")
    parser.add_argument("--reward", default="jpeg_compressibility", choices=REWARD_NAMES)
    parser.add_argument("--prompts", help="prompts file (one per line or a .json list; default: 20 animal names)")
    parser.add_argument("--clip-model", help="aesthetic reward: local CLIP ViT-L/14 folder")
    parser.add_argument("--aesthetic-head", help="aesthetic reward: the predictor head's state dict")
    parser.add_argument("--epochs", type=int, default=1, help="DDPO epochs (the paper trains for hundreds)")
    parser.add_argument("--batch-size", type=int, default=256, help="images sampled per epoch")
    parser.add_argument("--sample-batch-size", type=int, default=8, help="chains sampled at once")
    parser.add_argument("--minibatch-size", type=int, default=4, help="(chain, step) pairs per backward pass")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/ddpo-sd", help="run folder")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--dry-run", action="store_true",
                        help="one small epoch (4 images, 2 at a time) on the CPU: checks the path, not the sizing")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.epochs, args.batch_size, args.sample_batch_size, args.device = 1, 4, 2, "cpu"
    out = Path(args.out)
    prompts = Path(args.prompts) if args.prompts else out.parent / f"{out.name}-prompts.txt"
    if not args.prompts:
        prompts.parent.mkdir(parents=True, exist_ok=True)
        prompts.write_text("\n".join(DEFAULT_PROMPTS) + "\n")
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run = train_ddpo(args.model, prompts, args.reward, steps=args.epochs, batch_size=args.batch_size, seed=args.seed,
                     device=str(device), precision=args.precision, eval_images=0 if args.dry_run else 16,
                     log_every=1, checkpoint_every=1, run_dir=out, overwrite=args.overwrite,
                     clip_model=args.clip_model, aesthetic_head=args.aesthetic_head,
                     sample_steps=50, eta=1.0, guidance_scale=5.0, lora_rank=4, lr=3e-4, clip_range=1e-4,
                     sample_batch_size=args.sample_batch_size, minibatch_size=args.minibatch_size,
                     gradient_checkpointing=not args.no_gradient_checkpointing)
    seconds = time.perf_counter() - start
    images = args.epochs * args.batch_size
    peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if cuda else "n/a (not on a GPU)"
    rewards = [h["train/reward_mean"] for h in run.history if "train/reward_mean" in h]
    print(f"epochs {args.epochs}, {images} images in {seconds:.0f} s: {images / seconds:.2f} images/s (sampling and "
          f"training, with loading); peak GPU memory {peak}; batch reward per epoch {rewards}")


if __name__ == "__main__":
    main()
