"""Batch-1 latency of ``Policy.act`` against the bare network it runs.

A DiffusionBC actor (3x256 residual MLP) sampled with ``--steps`` solver steps is timed through the whole
controller path (numpy in, checks, normalisation, sampler, denormalisation, numpy out) and compared with ``--steps``
bare forwards of its denoiser on prepared tensors. Prints median and p99 of both and their ratio (target <= 1.5).

    OMP_NUM_THREADS=1 python scripts/bench_policy_latency.py --solver ddpm --steps 5
    OMP_NUM_THREADS=1 python scripts/bench_policy_latency.py --policies runs/bc/policy.pt runs/bc-progressive1/policy.pt

With ``--policies`` the saved policies (e.g. a teacher and its distilled students) are timed side by side instead:
median and p99 of ``act`` on one observation, with each policy's sampler and network calls.

With ``--image`` the policy is an image Diffusion Policy as the PushT image config builds it (one 96x96 camera
cropped to 84x84 plus a 2-d state, ResNet-18 encoder with GroupNorm and spatial softmax, U-Net (256, 512, 1024),
2 observations, horizon 16, DDIM 10): an ``act()`` that plans (after ``reset()``, from a dict of a uint8 image and
the state) is timed against its network calls, one encoder pass over the two observations and ``--steps`` U-Net
calls on the encoded features (target <= 1.5).

    OMP_NUM_THREADS=1 python scripts/bench_policy_latency.py --image --steps 10 --repeats 200 --warmup 10
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from agents.diffusion_actor import DiffusionActor
from agents.diffusion_policy import DiffusionPolicy, DiffusionPolicyConfig
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


def report(title: str, act_us: np.ndarray, bare_us: np.ndarray, bare_name: str) -> None:
    print(title)
    print(f"{'':28s} {'median':>8s} {'p99':>8s} {'mean':>8s}")
    for name, v in (("Policy.act", act_us), (bare_name, bare_us)):
        print(f"{name:28s} {np.median(v):8.1f} {np.percentile(v, 99):8.1f} {v.mean():8.1f}")
    print(f"ratio (median act / median {bare_name}): {np.median(act_us) / np.median(bare_us):.2f}")
    print(f"ratio (p99): {np.percentile(act_us, 99) / np.percentile(bare_us, 99):.2f}")


def interleaved(act: Callable[[], object], bare: Callable[[], object], repeats: int, warmup: int,
                rounds: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Both timed in alternating rounds, so that load from other processes hits them alike."""
    act_t, bare_t = [], []
    for _ in range(rounds):
        act_t.append(timings(act, repeats // rounds, warmup))
        bare_t.append(timings(bare, repeats // rounds, warmup))
    return np.concatenate(act_t), np.concatenate(bare_t)


def image_policy(steps: int, repeats: int, warmup: int) -> None:
    """A planning ``act()`` of the image Diffusion Policy against one encoder pass and ``steps`` U-Net calls."""
    config = DiffusionPolicyConfig(cameras=("image",), steps=steps, lr_schedule="constant")  # no training
    policy = DiffusionPolicy(config, obs_dim=2, act_dim=2).policy(seed=0)
    rng = np.random.default_rng(0)
    obs = {"image": rng.integers(0, 256, size=(3, 96, 96), dtype=np.uint8), "state": rng.normal(size=2)}
    denoiser = policy.actor.model.denoiser
    history = torch.rand(1, config.n_obs_steps * policy.obs_dim)
    x, t = torch.randn(1, config.horizon, 2), torch.full((1,), 0.5)

    def act() -> None:
        policy.reset()
        policy.act(obs)

    def bare() -> None:
        with torch.inference_mode():
            features = denoiser.encode(history)
            for _ in range(steps):
                denoiser.backbone(x, t, features)

    act_us, bare_us = interleaved(act, bare, repeats, warmup)
    report(f"image Diffusion Policy (96x96 camera, ResNet-18, U-Net 256-512-1024), ddim with {steps} steps, batch 1, "
           f"{len(act_us)} planning calls each (us)", act_us, bare_us, f"encoder + {steps} U-Net")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--obs-dim", type=int, default=11)
    parser.add_argument("--act-dim", type=int, default=3)
    parser.add_argument("--solver", default="ddpm")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--image", action="store_true", help="time the image Diffusion Policy instead")
    parser.add_argument("--policies", nargs="+", help="policy files to compare (teacher and distilled students)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.policies:
        compare(args.policies, args.repeats, args.warmup)
        return
    if args.image:
        image_policy(args.steps, args.repeats, args.warmup)
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

    act_us, bare_us = interleaved(lambda: policy.act(obs), bare, args.repeats, args.warmup)
    report(f"3x256 MLP policy, {args.solver} with {args.steps} steps, batch 1, {len(act_us)} calls each (us)",
           act_us, bare_us, f"{args.steps} bare forwards")


if __name__ == "__main__":
    main()
