"""DDPO benchmark on the pre-trained digits model (run scripts/pretrain_digits.py first).

1. JPEG compressibility: DDPO-IS and DDPO-SF from the same start with the same sampling budget; reward curves
   against the number of sampled images on one plot, before/after grids, before/after rewards on a fixed-seed
   evaluation set (mean, standard error, improvement in standard errors).
2. Classifier confidence: DDPO-IS on unprompted samples (the model's null class, no guidance), rewarded with the
   classifier's log-probability of one chosen digit class: the model learns to draw that digit.

Writes results/ddpo/bench.json, reward_curves.png, grids (PNG) and TensorBoard logs under results/ddpo/runs::

    OMP_NUM_THREADS=1 python scripts/bench_ddpo.py
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from agents.ddpo import DDPO, DDPOConfig, SampleEvaluator, save_image_grid
from agents.digits import load_classifier, load_image_model
from diffrl.training import TrainConfig, Trainer
from envs.image_rewards import ClassifierReward, jpeg_compressibility

VALUE_RANGE = (-1.0, 1.0)


def run(name: str, config: DDPOConfig, reward_fn, eval_labels: torch.Tensor, args) -> tuple[dict, dict]:
    """Fine-tune a fresh copy of the pre-trained model; returns (curve and before/after evaluations, images)."""
    model, model_config = load_image_model(Path(args.pretrained) / "model.pt")
    agent = DDPO(config, model, reward_fn, model_config.image_shape, model_config.num_classes)
    run_dir = Path(args.out) / "runs" / name
    evaluator = SampleEvaluator(reward_fn, eval_labels, seed=args.seed + 1000, run_dir=run_dir, tag=name)
    before = evaluator(agent, 0)
    images = {"before": evaluator.images(agent)}
    save_image_grid(Path(args.out) / f"{name}_before.png", images["before"], nrow=10)
    train = TrainConfig(steps=args.epochs, batch_size=args.batch_size, seed=args.seed, log_every=1,
                        eval_every=args.epochs, progress=False, run_dir=str(run_dir))
    start = time.perf_counter()
    history = Trainer(agent, agent.collect, train, evaluate=evaluator).fit()
    seconds = time.perf_counter() - start
    after = next(h for h in reversed(history) if "eval/reward_mean" in h)
    after = {k.removeprefix("eval/"): v for k, v in after.items() if k.startswith("eval/")}
    images["after"] = evaluator.images(agent)
    save_image_grid(Path(args.out) / f"{name}_after.png", images["after"], nrow=10)
    curve = [{"images": h["step"] * args.batch_size, "reward_mean": h["train/reward_mean"],
              "reward_sem": h["train/reward_std"] / math.sqrt(args.batch_size),
              "kl_to_start": h.get("train/kl_to_start", float("nan")), "clipfrac": h["train/clipfrac"]}
             for h in history if "train/reward_mean" in h]
    gain = (after["reward_mean"] - before["reward_mean"]) / math.hypot(before["reward_sem"], after["reward_sem"])
    print(f"{name}: eval reward {before['reward_mean']:.4f} +- {before['reward_sem']:.4f} -> "
          f"{after['reward_mean']:.4f} +- {after['reward_sem']:.4f} ({gain:.1f} SE) in {seconds:.0f} s", flush=True)
    result = {"config": asdict(config), "before": before, "after": after, "improvement_in_se": gain,
              "seconds": seconds, "curve": curve}
    return result, images


def images_to_reach(curve: list[dict], target: float) -> int | None:
    """Sampled images after which the (3-epoch moving average) batch reward first reaches ``target``."""
    values = [c["reward_mean"] for c in curve]
    for i in range(len(values)):
        window = values[max(0, i - 2):i + 1]
        if sum(window) / len(window) >= target:
            return curve[i]["images"]
    return None


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("jpeg compressibility (-kB)", ["compress_is", "compress_sf"]),
              (f"unprompted, classifier log p(digit {results['target_class']})", ["classifier_is"])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (title, names) in zip(axes, panels, strict=True):
        for name in names:
            curve = results[name]["curve"]
            x = [c["images"] for c in curve]
            y = torch.tensor([c["reward_mean"] for c in curve])
            sem = torch.tensor([c["reward_sem"] for c in curve])
            ax.plot(x, y, label=name.split("_")[-1].upper().replace("IS", "DDPO-IS").replace("SF", "DDPO-SF"))
            ax.fill_between(x, y - sem, y + sem, alpha=0.25)
        ax.set_xlabel("sampled images")
        ax.set_ylabel("batch reward (mean +- s.e.)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="results/ddpo/pretrained")
    parser.add_argument("--out", default="results/ddpo")
    parser.add_argument("--epochs", type=int, default=50, help="DDPO epochs (sample + train rounds) per run")
    parser.add_argument("--batch-size", type=int, default=32, help="images sampled per epoch")
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--lora-rank", type=int, default=0, help="0: fine-tune the whole U-Net")
    parser.add_argument("--clip-range", type=float, default=0.2)
    parser.add_argument("--inner-epochs", type=int, default=2)
    parser.add_argument("--train-batch-size", type=int, default=4, help="chains per optimiser step (DDPO-IS)")
    parser.add_argument("--minibatch-size", type=int, default=32)
    parser.add_argument("--target-class", type=int, default=-1,
                        help="digit the classifier rewards; -1: the one the start model draws least unprompted")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    classifier = load_classifier(Path(args.pretrained) / "classifier.pt")
    base = DDPOConfig(method="is", sample_steps=args.sample_steps, guidance_scale=args.guidance, lr=args.lr,
                      lora_rank=args.lora_rank, clip_range=args.clip_range, inner_epochs=args.inner_epochs,
                      train_batch_size=args.train_batch_size, minibatch_size=args.minibatch_size,
                      stat_buffer_size=32, stat_min_count=8, seed=args.seed)
    compress = functools.partial(jpeg_compressibility, value_range=VALUE_RANGE)
    all_classes = torch.arange(10).repeat(10)  # 100 evaluation images, 10 per class

    unprompted = replace(base, null_prompt=True)
    target = args.target_class
    if target < 0:
        model, _ = load_image_model(Path(args.pretrained) / "model.pt")
        probe = DDPO(replace(unprompted, drift_samples=0), model, compress, (1, 16, 16), 10)
        with torch.no_grad():
            drawn = classifier(probe.sample(all_classes, torch.Generator().manual_seed(args.seed + 2000))).argmax(1)
        target = int(torch.bincount(drawn, minlength=10).argmin())
    confidence = ClassifierReward(classifier, target_class=target, log_prob=True, value_range=VALUE_RANGE)

    results: dict = {"target_class": target, "args": vars(args)}
    results["compress_is"], _ = run("compress_is", base, compress, all_classes, args)
    sf = replace(base, method="sf", inner_epochs=1, train_batch_size=None)  # on-policy: one step per batch
    results["compress_sf"], _ = run("compress_sf", sf, compress, all_classes, args)
    results["classifier_is"], images = run("classifier_is", unprompted, confidence, all_classes, args)
    with torch.no_grad():
        results["classifier_is"]["target_fraction"] = {
            k: (classifier(v).argmax(1) == target).float().mean().item() for k, v in images.items()}
    sf_final = sum(c["reward_mean"] for c in results["compress_sf"]["curve"][-3:]) / 3
    results["images_to_reach_sf_final"] = {m: images_to_reach(results[f"compress_{m}"]["curve"], sf_final)
                                           for m in ("is", "sf")}
    plot(results, out / "reward_curves.png")
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    summary = {k: {"before": v["before"]["reward_mean"], "after": v["after"]["reward_mean"],
                   "improvement_in_se": v["improvement_in_se"], "seconds": v["seconds"]}
               for k, v in results.items() if isinstance(v, dict) and "curve" in v}
    print(json.dumps({"target_class": target, **summary,
                      "images_to_reach_sf_final": results["images_to_reach_sf_final"]}, indent=1))


if __name__ == "__main__":
    main()
