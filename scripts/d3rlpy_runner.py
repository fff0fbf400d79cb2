"""Train a d3rlpy baseline (IQL, TD3+BC or deterministic BC) on a D4RL-layout HDF5 file; print one JSON line with
the learning curve.

Runs in its own virtual environment (d3rlpy pins gymnasium==1.0.0) and imports only d3rlpy, gymnasium, h5py and
numpy, never diffrl. scripts/bench_offline_rl.py starts it as a subprocess:

    ../d3rlpy-venv/bin/python scripts/d3rlpy_runner.py --algo td3bc \
        --dataset ../shared/datasets/hopper-medium.hdf5 --steps 5000

Settings are d3rlpy's reproduction settings for D4RL locomotion: TD3+BC (Fujimoto & Gu 2021) with alpha 2.5 and
standardised observations; IQL (Kostrikov et al. 2022) with expectile 0.7, temperature 3 and rewards scaled by
1000 / (max - min episode return); BC: a deterministic MLP policy regressed on the dataset actions (mean squared
error), standardised observations. The reported throughput excludes evaluation time.
"""

from __future__ import annotations

import argparse
import json
import time

import d3rlpy
import gymnasium as gym
import h5py
import numpy as np


def load(path: str) -> tuple[d3rlpy.dataset.MDPDataset, dict]:
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
        attrs = {k: f.attrs[k] for k in ("env_id", "ref_min_score", "ref_max_score") if k in f.attrs}
    timeouts = data["timeouts"].astype(np.float32)
    terminals = data["terminals"].astype(np.float32)
    timeouts[-1] = float(terminals[-1] == 0)  # close the last episode
    dataset = d3rlpy.dataset.MDPDataset(data["observations"].astype(np.float32), data["actions"].astype(np.float32),
                                        data["rewards"].astype(np.float32), terminals, timeouts=timeouts)
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    return dataset, attrs


def algo_configs() -> dict:
    """d3rlpy config of each baseline by name (the ``--algo`` choices)."""
    scaler = d3rlpy.preprocessing.StandardObservationScaler
    return {
        "td3bc": lambda: d3rlpy.algos.TD3PlusBCConfig(alpha=2.5, batch_size=256, observation_scaler=scaler()),
        "iql": lambda: d3rlpy.algos.IQLConfig(
            expectile=0.7, weight_temp=3.0, batch_size=256, observation_scaler=scaler(),
            reward_scaler=d3rlpy.preprocessing.ReturnBasedRewardScaler(multiplier=1000.0)),
        "bc": lambda: d3rlpy.algos.BCConfig(batch_size=256, observation_scaler=scaler()),
    }


def make_algo(name: str, seed: int, device: str = "cpu:0"):
    d3rlpy.seed(seed)
    return algo_configs()[name]().create(device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", required=True, choices=sorted(algo_configs()))
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--eval-every", type=int, default=0, help="default: only at the end")
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu:0", help="d3rlpy device, e.g. cpu:0 or cuda:0")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    dataset, attrs = load(args.dataset)
    algo = make_algo(args.algo, args.seed, args.device)
    env = gym.make(attrs["env_id"])
    env.reset(seed=args.seed + 10_000)
    every = args.eval_every or args.steps
    curve, train_seconds, start = [], 0.0, time.perf_counter()
    fitter = algo.fitter(dataset, n_steps=args.steps, n_steps_per_epoch=every, with_timestamp=False,
                         logger_adapter=d3rlpy.logging.NoopAdapterFactory(), show_progress=False, save_interval=10**9)
    for epoch, _ in fitter:
        train_seconds += time.perf_counter() - start
        returns = d3rlpy.metrics.evaluate_qlearning_with_environment(algo, env, n_trials=args.eval_episodes)
        point = {"step": epoch * every, "return": float(returns)}
        if "ref_min_score" in attrs:
            lo, hi = float(attrs["ref_min_score"]), float(attrs["ref_max_score"])
            point["normalized"] = 100.0 * (float(returns) - lo) / (hi - lo)
        curve.append(point)
        start = time.perf_counter()
    print(json.dumps({"algo": args.algo, "steps": args.steps, "train_seconds": train_seconds,
                      "steps_per_sec": args.steps / max(train_seconds, 1e-9), "evaluations": curve}))


if __name__ == "__main__":
    main()
