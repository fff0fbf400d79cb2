"""Train a d3rlpy baseline (IQL or deterministic BC) on a Maze2D HDF5 file and export its greedy policy as TorchScript.

Runs in the d3rlpy virtual environment (see scripts/d3rlpy_runner.py, whose file reader and BC config it shares) and
never imports diffrl: the Maze2D evaluation env lives in diffrl, so scripts/bench_maze2d.py loads the exported policy
(``torch.jit.load``; d3rlpy puts the observation scaler inside the graph) and rolls it out there.

    ../d3rlpy-venv/bin/python scripts/d3rlpy_maze_runner.py --algo iql --dataset /work/maze_data/maze2d-umaze.hdf5 \
        --steps 2000 --policy-out /tmp/iql.pt

IQL: expectile 0.7, temperature 3, batch 256, standardised observations, as the locomotion settings of
d3rlpy_runner, but without its return-based reward scaling: a Maze2D file is one continuing stream (no timeouts
until the last row), so the maximum and minimum episode return coincide and that scale divides by zero; the rewards
stay D4RL's 0/1. Prints one JSON line: algorithm, steps, training seconds and steps per second.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import d3rlpy
from d3rlpy_runner import algo_configs, load


def maze_configs() -> dict:
    """d3rlpy config of each Maze2D baseline by name (the ``--algo`` choices)."""
    return {
        "iql": lambda: d3rlpy.algos.IQLConfig(expectile=0.7, weight_temp=3.0, batch_size=256,
                                              observation_scaler=d3rlpy.preprocessing.StandardObservationScaler()),
        "bc": algo_configs()["bc"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", required=True, choices=sorted(maze_configs()))
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy-out", required=True, help="TorchScript file (.pt) of the greedy policy")
    parser.add_argument("--device", default="cpu:0", help="d3rlpy device, e.g. cpu:0 or cuda:0")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    dataset, _ = load(args.dataset)
    d3rlpy.seed(args.seed)
    algo = maze_configs()[args.algo]().create(device=args.device)
    start = time.perf_counter()
    algo.fit(dataset, n_steps=args.steps, n_steps_per_epoch=args.steps, with_timestamp=False,
             logger_adapter=d3rlpy.logging.NoopAdapterFactory(), show_progress=False, save_interval=10**9)
    seconds = time.perf_counter() - start
    out = Path(args.policy_out)
    tmp = out.with_name(out.stem + ".tmp.pt")
    algo.save_policy(str(tmp))
    os.replace(tmp, out)
    print(json.dumps({"algo": args.algo, "steps": args.steps, "train_seconds": seconds,
                      "steps_per_sec": args.steps / max(seconds, 1e-9)}))


if __name__ == "__main__":
    main()
