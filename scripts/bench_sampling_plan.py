"""Unguided sampling through the precomputed plan (``DiffusionModel.sample``) against ``solver.sample``.

Both paths run in the same process on the Diffusion-QL actor (3x256 Mish MLP, 5 DDPM steps, hopper-medium sizes),
alternating in rounds so that machine noise hits both alike: the sampling chain with gradients (batch 256,
forward and backward, as in Diffusion-QL's actor loss), action selection without gradients (50 candidates for one
state), and a whole Diffusion-QL update. Prints median times and speed-ups and writes them to
``results/bench_sampling_plan.txt``.

    OMP_NUM_THREADS=1 python scripts/bench_sampling_plan.py
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_us, report  # noqa: E402
from train_offline_rl import make_config  # noqa: E402

from agents import AGENTS  # noqa: E402
from diffrl.model import DiffusionModel  # noqa: E402
from diffrl.solvers import DDPM  # noqa: E402
from envs import load_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def without_plan() -> Iterator[None]:
    """Inside the block every unguided ``DiffusionModel.sample`` call runs ``solver.sample``."""
    saved = DiffusionModel.sampling_plan
    DiffusionModel.sampling_plan = lambda self, solver, steps: None
    try:
        yield
    finally:
        DiffusionModel.sampling_plan = saved


def cases(dataset) -> dict[str, Callable[[], object]]:
    """Name -> one timed call, all on the same freshly built Diffusion-QL agent."""
    _, agent_cls = AGENTS["diffusion_ql"]
    torch.manual_seed(0)
    agent = agent_cls.from_dataset(dataset, make_config("diffusion_ql", steps=1000))
    batches = itertools.cycle([dataset.sample(256) for _ in range(8)])
    obs = agent.prepare(next(batches))["obs"]
    one_state = obs[:1].expand(50, -1)

    def chain_with_grad() -> None:
        agent.actor.sample((256, agent.act_dim), obs, solver=DDPM(), steps=5, grad=True).sum().backward()

    def selection() -> None:
        with torch.no_grad():
            agent.actor.sample((50, agent.act_dim), one_state, solver=DDPM(), steps=5)

    return {"chain fwd+bwd (256)": chain_with_grad, "selection (50 cand.)": selection,
            "DQL update": lambda: agent.update(next(batches))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per case, path and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dataset", default="hopper-medium")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_sampling_plan.txt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    timed = cases(load_dataset(args.dataset))
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, fn in timed.items():
            with without_plan():
                times.setdefault((name, "solver"), []).append(median_us(fn, args.repeats, warmup=3))
            times.setdefault((name, "plan"), []).append(median_us(fn, args.repeats, warmup=3))
    lines = [f"{'':22}{'solver.sample us':>18}{'plan us':>12}{'speed-up':>10}   (1 thread, median of rounds)"]
    for name in timed:
        slow, fast = (float(np.median(times[(name, path)])) for path in ("solver", "plan"))
        lines.append(f"{name:22}{slow:18.0f}{fast:12.0f}{slow / fast:9.2f}x")
    report(lines, args.out)


if __name__ == "__main__":
    main()
