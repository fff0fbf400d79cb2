"""Train an offline-RL agent (Diffusion-QL, QGPO, IDQL, or any registered agent) on an offline dataset.

    OMP_NUM_THREADS=1 python scripts/train_offline_rl.py diffusion_ql \\
        --dataset hopper-medium --steps 20000 --eval-every 5000 \\
        --run-dir runs/dql-hopper eta=1.0 max_grad_norm=9
    OMP_NUM_THREADS=1 python scripts/train_offline_rl.py qgpo --dataset toy:bandit-8gaussians --steps 2000

Training runs through `diffrl.training.Trainer` (TensorBoard under ``<run-dir>/tb``, checkpoints, exact resume with
``--resume``); evaluation rolls out ``agent.policy()`` with `envs.evaluate` and logs the D4RL-normalised return. The
final policy is saved as ``<run-dir>/policy.pt``. `train` is the function the benchmarks call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agents import AGENTS
from agents.presets import apply_preset
from diffrl.config import apply_overrides
from diffrl.training import TrainConfig, Trainer
from envs import OfflineDataset, evaluate, load_dataset


@dataclass
class TrainResult:
    """A trained agent, its evaluations ``[{"step", "normalized", "return"}]`` and the pure training throughput."""

    agent: Any
    evaluations: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    steps: int = 0

    @property
    def steps_per_sec(self) -> float:
        return self.steps / max(self.train_seconds, 1e-9)


def make_config(kind: str, overrides: list[str] | dict[str, Any] | None = None, steps: int | None = None,
                dataset: str | None = None) -> Any:
    """The agent config of ``kind``: defaults, the preset of ``dataset``'s task, ``total_steps = steps`` (LR
    schedules), then overrides."""
    if kind not in AGENTS:
        raise ValueError(f"unknown agent {kind!r}; registered: {sorted(AGENTS)}")
    config_cls, agent_cls = AGENTS[kind]
    config = config_cls()
    if dataset is not None:
        config, line = apply_preset(config, agent_cls.presets, dataset)
        print(f"{kind}: {line}")
    if steps is not None and "total_steps" in {f.name for f in dataclasses.fields(config_cls)}:
        config = dataclasses.replace(config, total_steps=steps)
    if isinstance(overrides, dict):
        return dataclasses.replace(config, **overrides)
    return apply_overrides(config, overrides or [])


def evaluator(dataset: OfflineDataset, episodes: int, seed: int, clock: list[float]):
    """Trainer evaluation callback: normalised score of ``agent.policy()``; its wall time is added to ``clock``."""

    def run(agent: Any, step: int) -> dict[str, float]:
        start = time.perf_counter()
        result = evaluate(agent.policy(seed=seed), dataset, episodes=episodes, seed=seed)
        clock[0] += time.perf_counter() - start
        out = {"return": result.mean}
        if result.normalized_mean is not None:
            out["normalized"] = result.normalized_mean
        return out

    return run


def train(kind: str, dataset: OfflineDataset | str, config: Any = None, steps: int = 10_000, batch_size: int = 256,
          seed: int = 0, eval_every: int = 0, eval_episodes: int = 5, run_dir: str | os.PathLike | None = None,
          checkpoint_every: int = 0, log_every: int = 1000, progress: bool = False,
          resume: bool = False) -> TrainResult:
    """Train agent ``kind`` on ``dataset`` for ``steps`` gradient steps with the shared Trainer.

    ``config``: the agent's config object, or None for its defaults with ``total_steps = steps``. Evaluation every
    ``eval_every`` steps needs an environment for the dataset; its time is excluded from the throughput.
    """
    if isinstance(dataset, str):
        dataset = load_dataset(dataset)
    config = config if config is not None else make_config(kind, steps=steps)
    _, agent_cls = AGENTS[kind]
    torch.manual_seed(seed)
    agent = agent_cls.from_dataset(dataset, config)
    eval_clock = [0.0]
    has_env = getattr(dataset, "env_id", None) is not None
    train_config = TrainConfig(steps=steps, batch_size=batch_size, seed=seed, log_every=log_every,
                               eval_every=eval_every if has_env else 0, checkpoint_every=checkpoint_every,
                               progress=progress, run_dir=None if run_dir is None else str(run_dir))
    sampler = agent.batch_sampler(dataset) if hasattr(agent, "batch_sampler") else dataset.sample
    trainer = Trainer(agent, sampler, train_config,
                      evaluate=evaluator(dataset, eval_episodes, seed + 10_000, eval_clock) if has_env else None)
    start_step = trainer.step
    start = time.perf_counter()
    trainer.fit(resume=resume)
    seconds = time.perf_counter() - start - eval_clock[0]
    return TrainResult(agent, trainer.evaluations, seconds, trainer.step - start_step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("agent", help=f"agent kind: {', '.join(sorted(AGENTS))}")
    parser.add_argument("overrides", nargs="*", help="agent config field=value overrides")
    parser.add_argument("--dataset", required=True, help="D4RL-layout .hdf5 path or name, Minari id, or toy:<name>")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--checkpoint-every", type=int, default=0, help="default: steps / 5 when --run-dir is set")
    parser.add_argument("--run-dir", help="folder for TensorBoard logs, checkpoints, eval files and policy.pt")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dataset = load_dataset(args.dataset)
    config = make_config(args.agent, args.overrides, steps=args.steps, dataset=args.dataset)
    checkpoint_every = args.checkpoint_every or (max(1, args.steps // 5) if args.run_dir else 0)
    result = train(args.agent, dataset, config, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                   eval_every=args.eval_every, eval_episodes=args.eval_episodes, run_dir=args.run_dir,
                   checkpoint_every=checkpoint_every, progress=True, resume=args.resume)
    summary: dict[str, Any] = {"agent": args.agent, "dataset": dataset.name, "steps": result.steps,
                               "steps_per_sec": round(result.steps_per_sec, 2), "evaluations": result.evaluations,
                               "config": dataclasses.asdict(config)}
    if args.run_dir:
        policy_path = result.agent.policy(seed=args.seed).save(Path(args.run_dir) / "policy.pt")
        summary["policy"] = str(policy_path)
        (Path(args.run_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(json.dumps(summary, indent=2, default=float))


if __name__ == "__main__":
    main()
