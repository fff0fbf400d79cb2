"""Train and evaluate a trajectory planner (Diffuser or Decision Diffuser) on an offline dataset.

    python scripts/train_planner.py diffuser --dataset toy:pointnav --steps 2000 --set goal_conditioned=true \\
        --set train_value=false --set guide_scale=0 --set n_candidates=1 --set goal=0.8,0.0
    python scripts/train_planner.py diffuser --dataset hopper-medium --steps 20000

Training runs through `diffrl.training.Trainer` (TensorBoard under ``<run-dir>/tb``, periodic evaluation,
checkpoints); evaluation rolls the receding-horizon policy out with `envs.evaluate` and times each planning call.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from agents import AGENTS
from agents.planning import PlannerAgent
from diffrl.config import apply_overrides
from diffrl.training import TrainConfig, Trainer
from envs import OfflineDataset, evaluate, load_dataset

PLANNERS = ("diffuser", "decision_diffuser")


def build_planner(kind: str, dataset: OfflineDataset, overrides: list[str] | None = None) -> PlannerAgent:
    """A planner of ``kind`` for ``dataset``, its config built from defaults and ``field=value`` overrides."""
    if kind not in PLANNERS:
        raise ValueError(f"unknown planner {kind!r}; choose one of {PLANNERS}")
    config_cls, agent_cls = AGENTS[kind]
    return agent_cls.from_dataset(dataset, apply_overrides(config_cls(), overrides or []))


class TimedPolicy:
    """Wraps a policy and records the wall time of every ``act`` call (one planning call per step when the
    policy executes one action per plan)."""

    def __init__(self, policy: Any):
        self.policy, self.times = policy, []

    def reset(self) -> None:
        self.policy.reset()

    def act(self, obs: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        action = self.policy.act(obs)
        self.times.append(time.perf_counter() - start)
        return action


def _step_limit(env: Any) -> int | None:
    """The registered episode step limit of an env id or a dataset's env, if any."""
    env_id = env if isinstance(env, str) else getattr(env, "env_id", None)
    try:
        return gym.spec(env_id).max_episode_steps if env_id else None
    except gym.error.Error:
        return None


def evaluate_planner(agent: PlannerAgent, env: Any, episodes: int = 10, seed: int = 0,
                     max_episode_steps: int | None = None, **overrides: Any) -> dict[str, float]:
    """Roll out ``agent.policy(**overrides)`` in ``env``; returns mean return, normalised score (when known), the
    fraction of episodes that terminated before the step limit (PointNav: goal reached; Hopper: fell), and
    seconds per ``act`` call."""
    timed = TimedPolicy(agent.policy(seed=seed, **overrides))
    result = evaluate(timed, env, episodes=episodes, seed=seed, max_episode_steps=max_episode_steps)
    out = {"return_mean": result.mean, "return_stderr": result.stderr,
           "length_mean": float(result.lengths.mean()), "latency_s": float(np.mean(timed.times))}
    limit = max_episode_steps or _step_limit(env)
    if limit:
        out["terminated_frac"] = float((result.lengths < limit).mean())
    if result.normalized_mean is not None:
        out["normalized_mean"], out["normalized_stderr"] = result.normalized_mean, result.normalized_stderr
    return out


def train_planner(agent: PlannerAgent, dataset: OfflineDataset, config: TrainConfig, eval_env: Any = None,
                  eval_episodes: int = 5, max_episode_steps: int | None = None) -> list[dict[str, float]]:
    """Fit ``agent`` on ``dataset`` with the shared Trainer, evaluating in ``eval_env`` every ``eval_every`` steps."""
    def run_eval(agent: PlannerAgent, step: int) -> dict[str, float]:
        return evaluate_planner(agent, eval_env, eval_episodes, config.seed + 10_000, max_episode_steps)

    trainer = Trainer(agent, agent.batch_sampler(dataset), config,
                      evaluate=run_eval if eval_env is not None else None)
    return trainer.fit()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("planner", choices=PLANNERS)
    parser.add_argument("--dataset", required=True, help="dataset spec for envs.load_dataset")
    parser.add_argument("--env", default=None, help="evaluation env id (default: the dataset's env)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="planner config override (repeatable)")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--max-episode-steps", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--run-dir", default="runs/planner")
    args = parser.parse_args(argv)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dataset = load_dataset(args.dataset)
    agent = build_planner(args.planner, dataset, args.overrides)
    env = args.env or dataset
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, log_every=args.log_every,
                         eval_every=args.eval_every, checkpoint_every=args.steps, run_dir=args.run_dir)
    train_planner(agent, dataset, config, env, args.eval_episodes, args.max_episode_steps)
    final = evaluate_planner(agent, env, args.eval_episodes, args.seed + 20_000, args.max_episode_steps)
    run_dir = Path(args.run_dir)
    agent.policy(seed=args.seed).save(run_dir / "policy.pt")
    (run_dir / "final_eval.json").write_text(json.dumps({"config": asdict(agent.config), **final}, indent=1))
    print(json.dumps(final, indent=1))


if __name__ == "__main__":
    main()
