"""Batch-1 latency of ``Policy.act`` against the bare network it runs.

A DiffusionBC actor (3x256 residual MLP) sampled with ``--steps`` solver steps is timed through the whole
controller path (numpy in, checks, normalisation, sampler, denormalisation, numpy out) and compared with ``--steps``
bare forwards of its denoiser on prepared tensors. Prints median and p99 of both and their ratio (target <= 1.5).

    OMP_NUM_THREADS=1 python scripts/bench_policy_latency.py --solver ddpm --steps 5
    OMP_NUM_THREADS=1 python scripts/bench_policy_latency.py --policies runs/bc/policy.pt runs/bc-progressive1/policy.pt

With ``--policies`` the saved policies (e.g. a teacher and its distilled students) are timed side by side instead:
median and p99 of ``act`` on one observation, with each policy's sampler and network calls.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from agents.diffusion_actor import DiffusionActor
from agents.policy import Policy, load_policy


def timings(fn: Callable[[], object], repeats: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - start
    return out * 1e6


def compare(paths: list[str], repeats: int, warmup: int) -> None:
    """``act`` latency of saved policies, measured in interleaved rounds."""
    policies = [load_policy(path, seed=0) for path in paths]
    obs = [np.zeros(p.obs_dim, dtype=np.float32) for p in policies]
    rounds = 5
    times: list[list[np.ndarray]] = [[] for _ in policies]
    for _ in range(rounds):
        for i, policy in enumerate(policies):
            times[i].append(timings(lambda p=policy, o=obs[i]: p.act(o), repeats // rounds, warmup))
    print(f"{'policy':50s} {'sampler':12s} {'calls':>5s} {'median us':>10s} {'p99 us':>8s}")
    for path, policy, parts in zip(paths, policies, times, strict=True):
        v = np.concatenate(parts)
        solver = type(policy.actor.solver).__name__
        print(f"{path[-50:]:50s} {solver:12s} {policy.actor.steps:5d} {np.median(v):10.1f} {np.percentile(v, 99):8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--obs-dim", type=int, default=11)
    parser.add_argument("--act-dim", type=int, default=3)
    parser.add_argument("--solver", default="ddpm")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--policies", nargs="+", help="policy files to compare (teacher and distilled students)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.policies:
        compare(args.policies, args.repeats, args.warmup)
        return

    actor = DiffusionActor(args.obs_dim, args.act_dim, net_kwargs={"hidden": 256, "depth": 3}, solver=args.solver,
                           steps=args.steps)
    policy = Policy(actor, seed=0)
    net = actor.model.denoiser
    obs = np.random.default_rng(0).normal(size=args.obs_dim).astype(np.float32)
    x, t, cond = torch.randn(1, args.act_dim), torch.full((1,), 0.5), torch.randn(1, args.obs_dim)

    def bare() -> None:
        with torch.inference_mode():
            for _ in range(args.steps):
                net(x, t, cond)

    # interleave the two measurements so that load from other processes hits both alike
    rounds = 5
    act_t, bare_t = [], []
    for _ in range(rounds):
        act_t.append(timings(lambda: policy.act(obs), args.repeats // rounds, args.warmup))
        bare_t.append(timings(bare, args.repeats // rounds, args.warmup))
    act_us, bare_us = np.concatenate(act_t), np.concatenate(bare_t)
    print(f"3x256 MLP policy, {args.solver} with {args.steps} steps, batch 1, {len(act_us)} calls each (us)")
    print(f"{'':28s} {'median':>8s} {'p99':>8s} {'mean':>8s}")
    for name, v in (("Policy.act", act_us), (f"{args.steps} bare forwards", bare_us)):
        print(f"{name:28s} {np.median(v):8.1f} {np.percentile(v, 99):8.1f} {v.mean():8.1f}")
    print(f"ratio (median act / median {args.steps} forwards): {np.median(act_us) / np.median(bare_us):.2f}")
    print(f"ratio (p99): {np.percentile(act_us, 99) / np.percentile(bare_us, 99):.2f}")


if __name__ == "__main__":
    main()
