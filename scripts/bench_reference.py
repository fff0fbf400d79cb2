"""Parity benchmark: diffrl's DiffusionQL beside the official Diffusion-QL code, same data, seeds and budget.

For every dataset and seed, two runs of ``--steps`` gradient steps (batch 256) on the same D4RL-layout HDF5 file:

* ``official``: github.com/Zhendong-Wang/Diffusion-Policies-for-Offline-RL from the checkout ``--official``, in its
  own process through scripts/reference_dql_runner.py (the official Diffusion_QL, its data sampler and its
  per-task hyperparameters; see that script for what it substitutes: h5py for d4rl, Gymnasium for gym);
* ``diffrl``: ``DiffusionQL`` with the dataset's preset (``DiffusionQL.presets``, taken from the same table), trained
  by scripts/train_offline_rl.py's ``train`` (the shared Trainer).

Both are evaluated every ``--eval-every`` steps over ``--eval-episodes`` episodes in the Gymnasium env named by the
file's ``env_id``, with ``envs.evaluation.evaluate`` and the same episode seeds (seed + 10000 + i), and scored with
the file's reference returns (D4RL normalisation, x100). Throughput counts training time only.

Each finished run is one JSON line in ``<out>/runs.jsonl`` (implementation, dataset, seed, budget, curve of
normalised scores, steps/s, settings); runs already logged with the same budget and evaluation settings are not
run again, so later invocations add seeds or datasets. ``--report`` prints the table (final normalised score and
the mean of each run's last three evaluations, mean +- standard error over seeds; gradient steps/s) and writes
both learning curves to ``<out>/curves.png``. ``--jobs N`` runs N runs at a time, one single-threaded process each.

    # the full parity run (3 seeds, 10k steps each, both implementations)
    OMP_NUM_THREADS=1 python scripts/bench_reference.py --agent diffusion_ql --official /work/ref/dql \\
        --dataset ../shared/datasets/hopper-medium-replay.hdf5 --steps 10000 --seeds 0 1 2 \\
        --eval-every 1000 --eval-episodes 10 --out results/reference_dql --jobs 2
    python scripts/bench_reference.py --report --out results/reference_dql
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_dql_runner import check_checkout, official_row, read_official_settings, task_name  # noqa: E402
from run_log import read_runs, run_logged  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "scripts" / "reference_dql_runner.py"
IMPLEMENTATIONS = ("official", "diffrl")
LABELS = {"official": "official (Zhendong-Wang/Diffusion-Policies-for-Offline-RL)", "diffrl": "diffrl DiffusionQL"}
AGENTS = ("diffusion_ql",)
BATCH_SIZE = 256
LAST_EVALS = 3
#: official row / argparse name -> DiffusionQLConfig field, for the settings check.
OFFICIAL_TO_OURS = {"lr": "lr", "eta": "eta", "max_q_backup": "max_q_backup", "reward_tune": "reward_tune",
                    "gn": "max_grad_norm", "discount": "gamma", "tau": "tau", "T": "diffusion_steps"}


def diffrl_config(dataset: str | Path, steps: int):
    """DiffusionQL's config for the dataset: defaults, then its preset row; the schedule horizon is the budget."""
    from agents.diffusion_ql import DiffusionQL, DiffusionQLConfig
    from agents.presets import apply_preset

    config, line = apply_preset(DiffusionQLConfig(), DiffusionQL.presets, str(dataset))
    if config.total_steps is None:
        config = dataclasses.replace(config, total_steps=steps)
    return config, line


def settings_differences(checkout: Path, dataset: str | Path, steps: int) -> list[str]:
    """Where the official settings for the dataset's task differ from diffrl's config for it (empty: none)."""
    table, defaults = read_official_settings(checkout)
    _, row = official_row(table, task_name(dataset))
    official = {**row, **defaults}
    config, _ = diffrl_config(dataset, steps)
    out = [f"{name}={official[name]!r} vs {field}={getattr(config, field)!r}"
           for name, field in OFFICIAL_TO_OURS.items() if name in official and official[name] != getattr(config, field)]
    if official.get("beta_schedule") != "vp":
        out.append(f"beta_schedule={official['beta_schedule']!r} (diffrl: vp)")
    if official.get("batch_size") != BATCH_SIZE:
        out.append(f"batch_size={official['batch_size']} (this benchmark: {BATCH_SIZE})")
    return out


def run_official(dataset: Path, seed: int, args: argparse.Namespace) -> dict:
    cmd = [args.python, str(RUNNER), "--official", str(args.official), "--dataset", str(dataset), "--steps",
           str(args.steps), "--eval-every", str(args.eval_every), "--eval-episodes", str(args.eval_episodes),
           "--seed", str(seed), "--eval-seed", str(seed + 10_000)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the official run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1])
    return {"curve": out["evaluations"], "steps_per_sec": out["steps_per_sec"], "settings": out["settings"],
            "transitions": out["transitions"], "stubbed_imports": out["stubbed_imports"]}


def run_diffrl(dataset: Path, seed: int, args: argparse.Namespace) -> dict:
    from train_offline_rl import train

    from envs import load_dataset

    data = load_dataset(dataset)
    config, preset = diffrl_config(dataset, args.steps)
    result = train("diffusion_ql", data, config, steps=args.steps, batch_size=BATCH_SIZE, seed=seed,
                   eval_every=args.eval_every, eval_episodes=args.eval_episodes, log_every=max(1, args.steps // 10))
    curve = [{"step": e["step"], "return": e["return"], "normalized": e.get("normalized")} for e in result.evaluations]
    return {"curve": curve, "steps_per_sec": result.steps_per_sec, "settings": dataclasses.asdict(config),
            "preset": preset, "transitions": len(data)}


def run_job(job: tuple[str, str, int], args: argparse.Namespace) -> dict:
    """One (implementation, dataset, seed) run in a single-threaded process."""
    import torch

    torch.set_num_threads(1)
    implementation, dataset, seed = job
    run = (run_official if implementation == "official" else run_diffrl)(Path(dataset), seed, args)
    return {"implementation": implementation, "agent": args.agent, "dataset": task_name(dataset),
            "dataset_path": str(dataset), "seed": seed, "steps": args.steps, "eval_every": args.eval_every,
            "eval_episodes": args.eval_episodes, "final": run["curve"][-1].get("normalized"), **run}


def run_key(run: dict) -> tuple:
    return (run["implementation"], run["agent"], run["dataset"], run["seed"], run["steps"], run["eval_every"],
            run["eval_episodes"])


# ------------------------------------------------------------------------------------------------ report
def mean_se(values: list[float]) -> tuple[float, float]:
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), (float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0)


def group(runs: list[dict]) -> dict[tuple[str, int], dict[str, list[dict]]]:
    """(dataset, budget) -> implementation -> runs sorted by seed."""
    out: dict[tuple[str, int], dict[str, list[dict]]] = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        out.setdefault((r["dataset"], r["steps"]), {}).setdefault(r["implementation"], []).append(r)
    return out


def report(runs: list[dict], out: Path) -> str:
    """Print (and return) the table of all ``runs`` and plot their learning curves to ``out/curves.png``."""
    if not runs:
        raise SystemExit(f"no runs logged in {out / 'runs.jsonl'}")
    lines = ["D4RL-normalised score (x100): mean ± standard error over seeds; gradient steps / s (training only, "
             "batch 256, one thread)"]
    head = f"{'dataset':<28}{'budget':>8}  {'implementation':<22}{'seeds':>6}{'final':>16}{'last 3 evals':>16}" \
           f"{'steps / s':>11}"
    lines += [head, "-" * len(head)]
    for (dataset, steps), by_impl in sorted(group(runs).items()):
        for impl in sorted(by_impl, key=lambda i: IMPLEMENTATIONS.index(i) if i in IMPLEMENTATIONS else 99):
            rs = by_impl[impl]
            final = mean_se([r["curve"][-1]["normalized"] for r in rs])
            last = mean_se([np.mean([p["normalized"] for p in r["curve"][-LAST_EVALS:]]) for r in rs])
            rate = np.mean([r["steps_per_sec"] for r in rs])
            seeds = ",".join(str(r["seed"]) for r in rs)
            lines.append(f"{dataset:<28}{steps:>8}  {impl:<22}{seeds:>6}{f'{final[0]:.1f} ± {final[1]:.1f}':>16}"
                         f"{f'{last[0]:.1f} ± {last[1]:.1f}':>16}{rate:>11.1f}")
    text = "\n".join(lines)
    print(text)
    plot_curves(runs, out / "curves.png")
    print(f"\ncurves: {out / 'curves.png'}; runs: {out / 'runs.jsonl'}")
    return text


def plot_curves(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(runs)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, ((dataset, steps), by_impl) in zip(axes[0], sorted(groups.items()), strict=True):
        for impl, rs in sorted(by_impl.items()):
            n = min(len(r["curve"]) for r in rs)
            x = np.array([p["step"] for p in rs[0]["curve"][:n]])
            y = np.array([[p["normalized"] for p in r["curve"][:n]] for r in rs])
            mean = y.mean(0)
            se = y.std(0, ddof=1) / np.sqrt(len(rs)) if len(rs) > 1 else np.zeros_like(mean)
            seeds = f"{len(rs)} seed{'s' * (len(rs) > 1)}"
            line, = ax.plot(x, mean, marker="o", label=f"{LABELS.get(impl, impl)} ({seeds})")
            ax.fill_between(x, mean - se, mean + se, color=line.get_color(), alpha=0.2)
        ax.set(title=f"Diffusion-QL on {dataset} ({steps} steps)", xlabel="gradient steps",
               ylabel="D4RL-normalised score (mean over seeds)")
        ax.legend(fontsize=8, title="shaded: ±1 standard error over seeds", title_fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_run(run: dict) -> None:
    print(f"{run['dataset']:>26} {run['implementation']:>9} seed {run['seed']}: normalised {run['final']:7.2f} "
          f"({run['steps_per_sec']:.1f} steps/s)", flush=True)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agent", choices=AGENTS, default="diffusion_ql")
    parser.add_argument("--official", type=Path, help="checkout of the official code (e.g. /work/ref/dql)")
    parser.add_argument("--dataset", nargs="+", type=Path, help="D4RL-layout HDF5 file(s) with an env_id attribute")
    parser.add_argument("--steps", type=int, default=10_000, help="gradient-step budget of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-every", type=int, default=0, help="evaluation period (default: only at the end)")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one single-threaded process each)")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the official runs")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "reference_dql")
    parser.add_argument("--report", action="store_true", help="run nothing: print and plot <out>/runs.jsonl")
    args = parser.parse_args(argv)
    if args.report:
        report(read_runs(args.out / "runs.jsonl"), args.out)
        return
    if not args.dataset:
        parser.error("--dataset is required (unless --report)")
    args.eval_every = args.eval_every or args.steps
    if args.steps < 1 or args.steps % args.eval_every:
        parser.error(f"--steps ({args.steps}) must be a positive multiple of --eval-every ({args.eval_every})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    datasets = [path.resolve() for path in args.dataset]
    for path in datasets:
        if not path.is_file():
            raise SystemExit(f"dataset file not found: {path}")
    if "official" in args.implementations:
        if args.official is None:
            parser.error("--official is required to run the official implementation")
        args.official = check_checkout(args.official)
        for path in datasets:
            diffs = settings_differences(args.official, path, args.steps)
            print(f"{task_name(path)}: official and diffrl settings "
                  + (f"differ: {'; '.join(diffs)}" if diffs else "agree (lr, eta, max_q_backup, reward_tune, gn, "
                                                                 "discount, tau, T, beta schedule, batch size)"))
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "runs.jsonl"
    kept = read_runs(log_path)
    done = {run_key(r) for r in kept}
    jobs = []
    for path in datasets:
        for seed in args.seeds:
            for impl in args.implementations:
                key = (impl, args.agent, task_name(path), seed, args.steps, args.eval_every, args.eval_episodes)
                if key in done:
                    print(f"already logged: {impl} {task_name(path)} seed {seed} ({args.steps} steps)")
                else:
                    jobs.append((impl, str(path), seed))
    print(f"budget: {args.steps} gradient steps (batch {BATCH_SIZE}), {args.eval_episodes} evaluation episodes every "
          f"{args.eval_every} steps; {len(jobs)} run(s) to do, {args.jobs} at a time", flush=True)
    runs = run_logged([(run_job, (job, args)) for job in jobs], log_path, max(1, args.jobs), kept,
                      on_result=print_run) if jobs else kept
    report(runs, args.out)


if __name__ == "__main__":
    main()
