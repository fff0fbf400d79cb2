"""Diffuser benchmarks, all in one run over several seeds at a stated budget.

``pointnav``: goal-conditioned Diffuser on the two-route navigation toy (``toy:pointnav``, env
``diffrl/PointNav-v0``): the goal (0.8, 0) is inpainted at the last plan step; reports the share of episodes
reaching the goal.

``hopper-medium`` / ``halfcheetah-medium`` (found in ../shared/datasets): one Diffuser (T = 100) per seed, planned
four ways: unguided (guide scale 0, one candidate) and value-guided (guide scale, candidates ranked by the return
model) with DDPM at 100 steps, and value-guided with DPM-Solver++ at 10 and 20 steps. Reports the D4RL-normalised
score and the wall time of one planning call (one env step for all parallel episodes).

    OMP_NUM_THREADS=1 python scripts/bench_planners.py --budget tiny
    OMP_NUM_THREADS=1 python scripts/bench_planners.py --budget small --tasks hopper-medium --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_log import read_runs, run_logged  # noqa: E402
from train_planner import build_planner, evaluate_planner  # noqa: E402

from diffrl.seeding import seed_everything  # noqa: E402
from diffrl.training import TrainConfig, Trainer  # noqa: E402
from envs import load_dataset  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results"
POINTNAV_GOAL = "goal=0.8,0.0"
TASKS = ("pointnav", "hopper-medium", "halfcheetah-medium")

#: Budgets: training steps/batch, network, evaluation episodes and step cap, candidate plans.
BUDGETS = {
    "tiny": {"nav_steps": 800, "steps": 600, "batch": 32, "dims": "16,32,64", "horizon": 16, "episodes": 2,
             "max_steps": 50, "nav_episodes": 10, "candidates": 4},
    "small": {"nav_steps": 2000, "steps": 5000, "batch": 64, "dims": "32,64,128", "horizon": 32, "episodes": 5,
              "max_steps": 300, "nav_episodes": 20, "candidates": 16},
    "full": {"nav_steps": 5000, "steps": 200_000, "batch": 32, "dims": "32,64,128,256", "horizon": 32,
             "episodes": 10, "max_steps": 1000, "nav_episodes": 50, "candidates": 64},
}

#: Planning variants compared on the locomotion tasks: name -> policy overrides (candidates filled in per budget).
METHODS = {
    "unguided DDPM-100": {"solver": "ddpm", "sampling_steps": 100, "guide_scale": 0.0, "n_candidates": 1},
    "guided DDPM-100": {"solver": "ddpm", "sampling_steps": 100},
    "guided DPM++-20": {"solver": "dpm-solver++", "sampling_steps": 20},
    "guided DPM++-10": {"solver": "dpm-solver++", "sampling_steps": 10},
}


def _fit(agent, dataset, steps: int, batch: int, seed: int) -> float:
    seed_everything(seed)
    start = time.perf_counter()
    Trainer(agent, agent.batch_sampler(dataset), TrainConfig(steps=steps, batch_size=batch, seed=seed,
                                                             log_every=max(1, steps // 5), progress=False)).fit()
    return time.perf_counter() - start


def run_pointnav(seed: int, budget: dict) -> dict:
    """Goal-conditioned Diffuser on PointNav: goal-reaching rate of the receding-horizon planner."""
    torch.set_num_threads(1)
    dataset = load_dataset("toy:pointnav")
    agent = build_planner("diffuser", dataset, [
        "horizon=32", "dims=32,64", "goal_conditioned=true", "train_value=false", "guide_scale=0",
        "n_candidates=1", POINTNAV_GOAL])
    train_s = _fit(agent, dataset, budget["nav_steps"], 64, seed)
    result = evaluate_planner(agent, "diffrl/PointNav-v0", budget["nav_episodes"], seed=1000 + seed)
    return {"task": "pointnav", "seed": seed, "train_s": train_s, "goal_rate": result["terminated_frac"], **result}


def run_locomotion(task: str, seed: int, budget: dict) -> dict:
    """One Diffuser (T = 100) trained per seed; each planning variant of `METHODS` evaluated on it."""
    torch.set_num_threads(1)
    dataset = load_dataset(task)
    agent = build_planner("diffuser", dataset, [
        "diffusion_steps=100", f"horizon={budget['horizon']}", f"dims={budget['dims']}",
        f"n_candidates={budget['candidates']}"])
    train_s = _fit(agent, dataset, budget["steps"], budget["batch"], seed)
    out = {"task": task, "seed": seed, "train_s": train_s, "methods": {}}
    for name, overrides in METHODS.items():
        out["methods"][name] = evaluate_planner(agent, dataset, budget["episodes"], seed=1000 + seed,
                                                max_episode_steps=budget["max_steps"], **overrides)
    return out


def _mean_se(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
    return f"{v.mean():.1f} ± {se:.1f}"


def report(results: list[dict], budget_name: str, budget: dict, wall_s: float) -> str:
    """Markdown tables: goal-reaching on PointNav; normalised score and latency per planning variant."""
    lines = [f"# Planner benchmark (budget `{budget_name}`: {json.dumps(budget)})", "",
             f"Wall time of the last invocation {wall_s / 60:.1f} min; mean ± standard error over seeds. "
             "Latency / step: wall time of "
             "one planning call for all parallel episodes (batch = episodes x candidates), on a CPU shared with "
             "other jobs, so compare rows of one table, not absolute values.", ""]
    nav = [r for r in results if r["task"] == "pointnav"]
    if nav:
        lines += ["## PointNav, goal-conditioned Diffuser", "",
                  "| seeds | train steps | goal reached (%) | return | latency / step (ms) |", "|---|---|---|---|---|",
                  f"| {len(nav)} | {budget['nav_steps']} | {_mean_se([100 * r['goal_rate'] for r in nav])} | "
                  f"{_mean_se([r['return_mean'] for r in nav])} | "
                  f"{1000 * np.mean([r['latency_s'] for r in nav]):.0f} |", ""]
    loco = [r for r in results if r["task"] != "pointnav"]
    if loco:
        lines += ["## Locomotion: normalised score (episodes capped at "
                  f"{budget['max_steps']} steps) and planning latency", "",
                  "| task | method | seeds | normalised score | return | latency / step (ms) |",
                  "|---|---|---|---|---|---|"]
        for task in dict.fromkeys(r["task"] for r in loco):
            runs = [r for r in loco if r["task"] == task]
            for name in METHODS:
                rows = [r["methods"][name] for r in runs]
                lines.append(f"| {task} | {name} | {len(rows)} | {_mean_se([m['normalized_mean'] for m in rows])} | "
                             f"{_mean_se([m['return_mean'] for m in rows])} | "
                             f"{1000 * np.mean([m['latency_s'] for m in rows]):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="tiny")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="parallel worker processes (one thread each)")
    parser.add_argument("--out", default=str(RESULTS / "bench_planners"))
    parser.add_argument("--append", action="store_true",
                        help="keep the runs already logged for this budget (other tasks/seeds) in the report")
    args = parser.parse_args(argv)

    budget = BUDGETS[args.budget]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log_path = out / f"{args.budget}.jsonl"
    rerun = {(task, s) for task in args.tasks for s in args.seeds}
    kept = [r for r in read_runs(log_path) if args.append and (r["task"], r["seed"]) not in rerun]
    calls = [(run_pointnav, (s, budget)) if task == "pointnav" else (run_locomotion, (task, s, budget))
             for task in args.tasks for s in args.seeds]
    results = run_logged(calls, log_path, args.jobs, kept)
    order = list(dict.fromkeys([*TASKS, *args.tasks]))
    results.sort(key=lambda r: (order.index(r["task"]), r["seed"]))
    text = report(results, args.budget, budget, time.perf_counter() - start)
    (out / f"{args.budget}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
