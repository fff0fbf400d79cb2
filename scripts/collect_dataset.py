"""Collect behaviour datasets with a SAC agent trained online (see envs.collect.collect).

Example: python scripts/collect_dataset.py Hopper-v5 --levels medium expert --n-transitions 100000 --out datasets
"""

import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from envs.collect import FORMATS, LEVELS, collect  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("env_id", help="Gymnasium env id, e.g. Hopper-v5")
    parser.add_argument("--levels", nargs="+", default=["medium"], choices=LEVELS)
    parser.add_argument("--n-transitions", type=int, default=100_000)
    parser.add_argument("--train-steps", type=int, default=150_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="datasets", help="folder for the D4RL HDF5 files")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--snapshots", type=int, default=10)
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    written = collect(args.env_id, args.levels, n_transitions=args.n_transitions, train_steps=args.train_steps,
                      seed=args.seed, out_dir=args.out, formats=args.formats, snapshots=args.snapshots,
                      eval_episodes=args.eval_episodes, progress=args.progress)
    print(json.dumps(written, indent=2))


if __name__ == "__main__":
    main()
