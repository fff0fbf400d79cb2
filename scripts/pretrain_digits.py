"""Pre-train the starting point for DDPO on scikit-learn's digits (no download), and the digit classifier reward.

Trains a class-conditional DiffusionModel(UNet2D, DiscreteVP) on the 1,797 digits upsampled to 16x16 in [-1, 1]
with condition dropout (for classifier-free guidance), and a small CNN classifier on the same images with
shift/noise augmentation. Both are saved as weights-only checkpoints. About 4 minutes on one CPU thread::

    OMP_NUM_THREADS=1 python scripts/pretrain_digits.py --out results/ddpo/pretrained
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn import functional as F

from agents.digits import (
    DigitClassifier,
    ImageModelConfig,
    load_digit_images,
    save_classifier,
    save_image_model,
)
from diffrl.guidance import ClassifierFree
from diffrl.seeding import seed_everything
from diffrl.solvers import DDIM
from diffrl.training import Learner


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background -1 fills the border)."""
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    size = images.shape[-1]
    out = torch.empty_like(images)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + size, dx:dx + size]
    return out


def train_diffusion(images: torch.Tensor, labels: torch.Tensor, config: ImageModelConfig, steps: int,
                    batch_size: int, lr: float, generator: torch.Generator):
    model = config.build()
    learner = Learner(model.denoiser, lr=lr, max_grad_norm=1.0, lr_schedule="cosine", warmup_steps=min(100, steps // 2),
                      total_steps=steps, ema_decay=0.995)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        loss = model.loss(images[idx], labels[idx], generator=generator)
        info = learner.step(loss)
        if step % 250 == 0 or step == steps - 1:
            print(f"diffusion step {step:5d} loss {loss.item():.4f} grad_norm {info['grad_norm']:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    learner.ema.copy_to(model.denoiser)
    return model.eval()


def train_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int,
                     generator: torch.Generator) -> tuple[DigitClassifier, float]:
    """Train on a random 85% split with augmentation; returns the classifier and its held-out accuracy."""
    perm = torch.randperm(len(images), generator=generator)
    n_train = int(0.85 * len(images))
    train, test = perm[:n_train], perm[n_train:]
    classifier = DigitClassifier()
    learner = Learner(classifier, lr=2e-3, weight_decay=1e-4, lr_schedule="cosine", total_steps=steps)
    for _ in range(steps):
        idx = train[torch.randint(0, n_train, (batch_size,), generator=generator)]
        x = random_shift(images[idx], generator)
        x = (x + 0.2 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)
        learner.step(F.cross_entropy(classifier(x), labels[idx]))
    classifier.eval()
    with torch.no_grad():
        accuracy = (classifier(images[test]).argmax(1) == labels[test]).float().mean().item()
    return classifier, accuracy


@torch.no_grad()
def sample_accuracy(model, classifier: DigitClassifier, num_classes: int, per_class: int, steps: int,
                    guidance_weight: float, generator: torch.Generator) -> float:
    """How often the classifier recognises the class a sample was conditioned on."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = model.sample((len(labels), 1, 16, 16), labels, solver=DDIM(eta=1.0), steps=steps,
                     guidance=ClassifierFree(guidance_weight), generator=generator)
    return (classifier(x.clamp(-1, 1)).argmax(1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/ddpo/pretrained")
    parser.add_argument("--steps", type=int, default=2500, help="diffusion training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--classifier-steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seed_everything(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    images, labels = load_digit_images()

    start = time.perf_counter()
    classifier, accuracy = train_classifier(images, labels, args.classifier_steps, 128, generator)
    save_classifier(out / "classifier.pt", classifier)
    print(f"classifier held-out accuracy {accuracy:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)

    config = ImageModelConfig()
    model = train_diffusion(images, labels, config, args.steps, args.batch_size, args.lr, generator)
    save_image_model(out / "model.pt", model, config)
    sampled = sample_accuracy(model, classifier, config.num_classes, 20, 10, 3.0, generator)
    summary = {"classifier_test_accuracy": accuracy, "sample_accuracy_ddim10_cfg3": sampled,
               "diffusion_steps": args.steps, "seconds": time.perf_counter() - start, "model": asdict(config)}
    (out / "pretrain.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
