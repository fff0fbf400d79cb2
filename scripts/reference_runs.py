"""What the official-code runners share: their command line, data loading, evaluation and the JSON record."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def runner_parser(description: str, repository: str, steps_help: str) -> argparse.ArgumentParser:
    """The options every runner takes; a runner adds its own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help=f"checkout of {repository} (the repository root)")
    parser.add_argument("--dataset", required=True, help="D4RL-layout HDF5 file (attribute env_id names the env)")
    parser.add_argument("--steps", type=int, default=10_000, help=steps_help)
    parser.add_argument("--eval-every", type=int, default=0, help="default: only at the end")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seed", type=int, default=None, help="first episode seed (default: seed + 10000, "
                                                                    "as diffrl's training script)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    return parser


def eval_period(args: argparse.Namespace) -> int:
    """Steps between evaluations; exits with one line unless ``--steps`` is a positive multiple of it."""
    every = args.eval_every or args.steps
    if args.steps < 1 or every < 1 or args.steps % every:
        raise SystemExit(f"--steps ({args.steps}) must be a positive multiple of --eval-every ({every})")
    return every


def load_evaluation(threads: int) -> Callable:
    """Set the thread count and import ``envs.evaluation.evaluate``; call before the checkout enters ``sys.path``
    (its top-level ``agents`` / ``utils`` / ``dataset`` packages would shadow the project's)."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from envs.evaluation import evaluate

    return evaluate


def load_transitions(path: str | Path) -> tuple[dict, dict]:
    """(transitions as float32 arrays in the layout of d4rl.qlearning_dataset, file attributes)."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals") if k in f}
        if "next_observations" in f:
            data["next_observations"] = f["next_observations"][()]
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    if "next_observations" not in data:  # D4RL files without it: the next row, last row dropped
        data = {k: v[:-1] for k, v in data.items()} | {"next_observations": data["observations"][1:]}
    out = {k: np.asarray(v, dtype=np.float32) for k, v in data.items()}
    out["rewards"], out["terminals"] = out["rewards"].reshape(-1), out["terminals"].reshape(-1)
    return out, attrs


def load_data(path: str | Path) -> tuple[dict, dict]:
    """The file's transitions and attributes; exits with one line when no ``env_id`` names its env."""
    data, attrs = load_transitions(path)
    if "env_id" not in attrs:
        raise SystemExit(f"{path} has no env_id attribute naming its Gymnasium env")
    return data, attrs


class Evaluation:
    """Scores a policy in the file's env on the same episode seeds at every call and keeps the learning curve."""

    def __init__(self, evaluate: Callable, attrs: dict, args: argparse.Namespace) -> None:
        self.evaluate, self.env_id, self.episodes = evaluate, attrs["env_id"], args.eval_episodes
        self.ref = ((float(attrs["ref_min_score"]), float(attrs["ref_max_score"]))
                    if "ref_min_score" in attrs and "ref_max_score" in attrs else None)
        self.seed = args.seed + 10_000 if args.eval_seed is None else args.eval_seed
        self.curve: list[dict] = []

    def __call__(self, policy, step: int) -> None:
        result = self.evaluate(policy, self.env_id, episodes=self.episodes, seed=self.seed, ref_scores=self.ref)
        point = {"step": step, "return": result.mean}
        if result.normalized_mean is not None:
            point["normalized"] = result.normalized_mean
        self.curve.append(point)
        print(f"official step {step}: return {result.mean:.1f}", file=sys.stderr, flush=True)


def print_record(repository: str, checkout: Path, steps: int, train_seconds: float, evaluation: Evaluation,
                 settings: dict, transitions: int, stubbed: list[str], **extra: object) -> None:
    """The run's one JSON line on stdout, as ``bench_reference.run_official`` reads it."""
    print(json.dumps({"implementation": "official", "repository": repository, "checkout": str(checkout),
                      "steps": steps, "train_seconds": train_seconds, "steps_per_sec": steps / max(train_seconds, 1e-9),
                      **extra, "evaluations": evaluation.curve, "settings": settings, "transitions": transitions,
                      "stubbed_imports": stubbed}))
