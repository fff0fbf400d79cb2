"""Mish on CPU: ``torch.nn.functional.mish`` against ``diffrl.nets.activations.mish``, alone and in a Diffusion-QL
update (its actor and critics are Mish MLPs).

Both are timed in the same process: the activation on a (256, 256) batch forward and forward+backward, then the
median time of a Diffusion-QL update on hopper-medium with each activation in every net of the agent. Prints
times and speed-up ratios and writes them to ``results/bench_activations.txt``.

    OMP_NUM_THREADS=1 python scripts/bench_activations.py
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_us, report  # noqa: E402
from train_offline_rl import make_config  # noqa: E402

from agents import AGENTS  # noqa: E402
from diffrl.nets import activations, embeddings  # noqa: E402
from envs import load_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def activation_times(fn: Callable, repeats: int) -> tuple[float, float]:
    x = torch.randn(256, 256, requires_grad=True)
    with torch.no_grad():
        forward = median_us(lambda: fn(x), repeats)
    grad = torch.ones(256, 256)
    backward = median_us(lambda: fn(x).backward(grad), repeats)
    return forward, backward


@contextmanager
def mish_everywhere(fn: Callable) -> Iterator[None]:
    """Nets built inside the block use ``fn`` for Mish: the MLP/critic activation table and the time embedding."""
    saved = activations.ACTIVATIONS["mish"], embeddings.mish
    activations.ACTIVATIONS["mish"] = embeddings.mish = fn
    try:
        yield
    finally:
        activations.ACTIVATIONS["mish"], embeddings.mish = saved


def update_time(dataset, repeats: int) -> float:
    """Median microseconds of one Diffusion-QL update."""
    _, agent_cls = AGENTS["diffusion_ql"]
    torch.manual_seed(0)
    agent = agent_cls.from_dataset(dataset, make_config("diffusion_ql", steps=repeats))
    batches = itertools.cycle([dataset.sample(256) for _ in range(8)])
    return median_us(lambda: agent.update(next(batches)), repeats, warmup=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--dataset", default="hopper-medium")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_activations.txt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = load_dataset(args.dataset)
    rows = {}
    for label, fn in (("F.mish", F.mish), ("diffrl mish", activations.mish)):
        with mish_everywhere(fn):
            rows[label] = (*activation_times(fn, args.repeats * 10), update_time(dataset, args.repeats))
    lines = [f"{'':14}{'forward us':>12}{'fwd+bwd us':>12}{'DQL update ms':>15}   (256x256 batch, 1 thread)"]
    for label, (fw, fb, up) in rows.items():
        lines.append(f"{label:14}{fw:12.1f}{fb:12.1f}{up / 1e3:15.1f}")
    ref, new = rows["F.mish"], rows["diffrl mish"]
    lines.append(f"{'speed-up':14}{ref[0] / new[0]:11.2f}x{ref[1] / new[1]:11.2f}x{ref[2] / new[2]:14.2f}x")
    report(lines, args.out)


if __name__ == "__main__":
    main()
