"""Offline RL at a fixed gradient-step budget: Diffusion-QL, QGPO and IDQL against DiffusionBC and d3rlpy's IQL,
TD3+BC and deterministic BC, on the D4RL-layout datasets in ../shared/datasets (found by name), all in the same run.

Prints D4RL-normalised scores (mean and standard error over seeds, of the last evaluation and, with
``--eval-every``, of the mean of each run's last three evaluations), the training throughput (gradient steps per
second, evaluation excluded) per agent, and saves learning curves to
``<out>/offline_rl_curves.png`` and every run (curve, throughput, agent settings) to ``<out>/runs.jsonl``; with
``--append`` the runs already logged there for other datasets, agents or seeds stay in the table. The d3rlpy columns
run in their own virtual environment (``--d3rlpy-python``, default ../d3rlpy-venv) through
scripts/d3rlpy_runner.py; they are skipped with a message when it is absent.

    # full comparison (hours on 2 CPU cores)
    OMP_NUM_THREADS=1 python scripts/bench_offline_rl.py --steps 20000 --seeds 0 1 2 --jobs 2
    # small end-to-end check
    OMP_NUM_THREADS=1 python scripts/bench_offline_rl.py --datasets hopper-medium --seeds 0 --steps 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_log import mean_se, read_runs, run_logged  # noqa: E402
from train_offline_rl import make_config, train  # noqa: E402

from agents import AGENTS  # noqa: E402
from envs import load_dataset  # noqa: E402
from envs.d4rl import find_d4rl_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
D3RLPY_PYTHON = ROOT.parent / "d3rlpy-venv" / "bin" / "python"
DATASETS = ("hopper-medium", "hopper-medium-replay", "halfcheetah-medium", "halfcheetah-medium-replay")
OURS = ("diffusion_ql", "qgpo", "idql", "diffusion_bc")
D3RLPY = ("iql", "td3bc", "bc")
D3RLPY_LABEL = {"iql": "d3rlpy IQL", "td3bc": "d3rlpy TD3+BC", "bc": "d3rlpy BC (deterministic)"}
LAST_EVALS = 3


def bench_overrides(kind: str, dataset, steps: int) -> dict:
    """Settings changed from the paper defaults and presets so that a CPU budget is feasible (printed with the
    results). QGPO: behaviour batch 256 instead of 4096 (official) and a quarter-width behaviour network
    (``hidden`` 32 instead of 128): at official sizes a behaviour step takes about 0.75 s on one CPU thread, so the
    behaviour phase alone of a 5,000-step run would take 25 minutes. Every other agent runs as its paper and preset.
    """
    if kind == "qgpo":
        return {"behavior_batch_size": 256, "hidden": 32}
    return {}


def run_ours(kind: str, dataset, args, seed: int) -> dict:
    config = make_config(kind, bench_overrides(kind, dataset, args.steps), steps=args.steps, dataset=dataset.name)
    result = train(kind, dataset, config, steps=args.steps, seed=seed, eval_every=args.eval_every or args.steps,
                   eval_episodes=args.eval_episodes, log_every=max(1, args.steps // 10))
    curve = [{"step": e["step"], "normalized": e["normalized"]} for e in result.evaluations]
    return {"curve": curve, "steps_per_sec": result.steps_per_sec, "config": dataclasses.asdict(config)}


def run_d3rlpy(algo: str, path: Path, args, seed: int) -> dict:
    cmd = [args.d3rlpy_python, str(ROOT / "scripts" / "d3rlpy_runner.py"), "--algo", algo, "--dataset", str(path),
           "--steps", str(args.steps), "--eval-every", str(args.eval_every or args.steps),
           "--eval-episodes", str(args.eval_episodes), "--seed", str(seed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"d3rlpy {algo} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    out = json.loads(lines[-1])
    return {"curve": [{"step": e["step"], "normalized": e["normalized"]} for e in out["evaluations"]],
            "steps_per_sec": out["steps_per_sec"]}


def print_scores(results: dict, labels: dict[str, str], datasets: list[str], last: int, width: int) -> None:
    """Score table: per run the mean of its last ``last`` evaluations, then mean ± standard error over seeds."""
    what = "at the end of the budget" if last == 1 else f"averaged over each run's last {last} evaluations"
    print(f"\nD4RL-normalised score {what} (mean ± standard error over seeds)")
    print(f"{'agent':<{width}}" + "".join(f"{d:>28}" for d in datasets))
    for key, label in labels.items():
        cells = []
        for d in datasets:
            runs = results.get(d, {}).get(key)
            if not runs:
                cells.append(f"{'-':>28}")
                continue
            m, se = mean_se([np.mean([p["normalized"] for p in r["curve"][-last:]]) for r in runs])
            cells.append(f"{f'{m:.1f} ± {se:.1f}':>28}")
        print(f"{label:<{width}}" + "".join(cells))


def print_tables(results: dict, labels: dict[str, str], datasets: list[str]) -> None:
    """Scores at the end of the budget, over each run's last ``LAST_EVALS`` evaluations when all runs have as many
    (less noisy than one evaluation), and throughput."""
    width = max(len(v) for v in labels.values()) + 2
    print_scores(results, labels, datasets, 1, width)
    runs = [r for by_agent in results.values() for agent_runs in by_agent.values() for r in agent_runs]
    if all(len(r["curve"]) >= LAST_EVALS for r in runs):
        print_scores(results, labels, datasets, LAST_EVALS, width)
    print("\nTraining throughput (gradient steps / s, batch 256, 1 thread, evaluation excluded; mean over runs)")
    for key, label in labels.items():
        rates = [r["steps_per_sec"] for d in datasets for r in results.get(d, {}).get(key, [])]
        if rates:
            print(f"{label:<{width}}{np.mean(rates):10.1f}")


def plot_curves(results: dict, labels: dict[str, str], datasets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.8), squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
        for key, label in labels.items():
            runs = results.get(d, {}).get(key)
            if not runs:
                continue
            steps = [p["step"] for p in runs[0]["curve"]]
            scores = np.array([[p["normalized"] for p in r["curve"]] for r in runs])
            mean = scores.mean(0)
            se = scores.std(0, ddof=1) / np.sqrt(len(runs)) if len(runs) > 1 else np.zeros_like(mean)
            ax.errorbar(steps, mean, yerr=se, marker="o", capsize=3, label=label)
        ax.set(title=d, xlabel="gradient steps", ylabel="normalised score")
    handles, names = axes[0][0].get_legend_handles_labels()
    columns = min(len(names), 2 * len(datasets))
    fig.legend(handles, names, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.03 + 0.05 * -(-len(names) // columns), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_job(job: tuple[str, str, int], args: argparse.Namespace) -> dict:
    """One (dataset, agent, seed) run in a single-threaded process: its curve, throughput and settings."""
    torch.set_num_threads(1)
    name, kind, seed = job
    path = find_d4rl_file(name)
    run = run_d3rlpy(kind, path, args, seed) if kind in D3RLPY else run_ours(kind, load_dataset(path), args, seed)
    return {"dataset": name, "agent": kind, "seed": seed, "steps": args.steps, **run}


def print_run(run: dict) -> None:
    print(f"{run['dataset']:>26} {D3RLPY_LABEL.get(run['agent'], run['agent']):>14} seed {run['seed']}: "
          f"normalised {run['curve'][-1]['normalized']:7.2f}  ({run['steps_per_sec']:.1f} steps/s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--agents", nargs="+", default=list(OURS) + list(D3RLPY),
                        help=f"any of {', '.join(OURS + D3RLPY)} ({' / '.join(D3RLPY)} are d3rlpy's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20_000, help="gradient-step budget of every agent")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluation period (default: only at the end)")
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one single-threaded process each)")
    parser.add_argument("--append", action="store_true",
                        help="keep the runs already in <out>/runs.jsonl (other datasets, agents or seeds) in the table")
    parser.add_argument("--report", action="store_true", help="run nothing: print and plot <out>/runs.jsonl")
    parser.add_argument("--d3rlpy-python", default=str(D3RLPY_PYTHON))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.report:
        report(read_runs(args.out / "runs.jsonl"), args.out)
        return
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    unknown = set(args.agents) - set(OURS) - set(D3RLPY)
    if unknown:
        raise SystemExit(f"unknown agents {sorted(unknown)}; choose from {', '.join(OURS + D3RLPY)}")
    agents = [a for a in args.agents if a in D3RLPY or a in AGENTS]
    for missing in sorted(set(args.agents) - set(agents)):
        print(f"skipping {missing}: not registered in agents.AGENTS")
    if any(a in D3RLPY for a in agents) and not Path(args.d3rlpy_python).exists():
        print(f"skipping {', '.join(D3RLPY_LABEL.values())}: no interpreter at {args.d3rlpy_python} "
              f"(create the venv with `python -m venv {D3RLPY_PYTHON.parents[1]} && {D3RLPY_PYTHON.parent}/pip "
              "install torch==2.13.0 d3rlpy h5py 'gymnasium[mujoco]==1.0.0'`)")
        agents = [a for a in agents if a not in D3RLPY]
    print(f"budget: {args.steps} gradient steps per agent (batch 256), seeds {args.seeds}, "
          f"{args.eval_episodes} evaluation episodes every {args.eval_every or args.steps} steps")
    jobs = [(name, kind, seed) for name in args.datasets for kind in agents for seed in args.seeds]
    for name in args.datasets:
        find_d4rl_file(name)  # fail now on a missing dataset, not after hours of other runs
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "runs.jsonl"
    kept = [r for r in read_runs(log_path) if args.append and (r["dataset"], r["agent"], r["seed"]) not in jobs]
    runs = run_logged([(run_job, (job, args)) for job in jobs], log_path, args.jobs, kept, on_result=print_run)
    report(runs, args.out)


def report(runs: list[dict], out: Path) -> None:
    """The score and throughput tables and the learning-curve plot of all ``runs``."""
    if not runs:
        raise SystemExit(f"no runs logged in {out / 'runs.jsonl'}")
    budgets = sorted({r["steps"] for r in runs})
    if len(budgets) > 1:
        print(f"warning: the table mixes runs of different budgets {budgets}")
    results: dict[str, dict[str, list[dict]]] = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        results.setdefault(r["dataset"], {}).setdefault(r["agent"], []).append(r)
    order = OURS + D3RLPY
    labels = {a: D3RLPY_LABEL.get(a, a) for a in sorted({r["agent"] for r in runs}, key=order.index)}
    datasets = sorted(results, key=lambda d: (DATASETS.index(d) if d in DATASETS else len(DATASETS), d))
    seeds = {d: sorted({r["seed"] for runs_ in results[d].values() for r in runs_}) for d in datasets}
    print(f"budget {', '.join(map(str, budgets))} gradient steps; seeds per dataset: {seeds}")
    print_tables(results, labels, datasets)
    plot_curves(results, labels, datasets, out / "offline_rl_curves.png")
    print(f"\ncurves: {out / 'offline_rl_curves.png'}; runs: {out / 'runs.jsonl'}")


if __name__ == "__main__":
    main()
