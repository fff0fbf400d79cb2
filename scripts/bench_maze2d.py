"""Maze2D (D4RL's maze2d-v1 protocol, envs.maze): Diffuser as its paper runs it against d3rlpy IQL and BC at the
same gradient-step budget, with the data's waypoint controller as a reference row.

Diffuser takes its maze2d preset (agents/diffuser.py: horizon 128 / 256, T = 64 / 256, U-Net 32 x (1, 4, 8), limits
normaliser, x0 prediction clipped to [-1, 1], action weight 1, no return model, batch 64), the start and the
evaluation goal inpainted; as the official ``plan_maze2d.py`` it plans once per episode and follows the planned states
(envs.maze.PlanFollower). IQL and BC are d3rlpy's (scripts/d3rlpy_maze_runner.py, batch 256) in their own virtual
environment (``--d3rlpy-python``, default ../d3rlpy-venv, the one scripts/bench_offline_rl.py uses); their exported
policies are rolled out here on the same evaluation episodes; without that interpreter they are skipped with a
message. Scores are D4RL-normalised (maze2d-v1 reference returns), mean and standard error over seeds. The datasets
are ``<data-dir>/<task>.hdf5`` as ``diffrl collect <task> --transitions 1000000 --out <data-dir>`` writes them.

Each finished run is appended to ``<out>/runs.jsonl`` (scripts/run_log.py), keyed by task, method, seed, budget,
evaluation episodes, Diffuser overrides and the dataset file's SHA-256 prefix: a rerun skips the runs already there.
The table (``bench.txt``) and plot (``bench.png``) cover the runs of the requested budget.

Cost measured on this machine (2026-12-02, one thread, both cores busy with other runs, load average 4-5) on
maze2d-umaze with the preset (results/maze2d/bench_cost.txt): 200 Diffuser updates took 181.5 s of CPU (0.91 s
per update; 1,120 s of wall time under that load), one 300-step evaluation episode (one 64-step plan at batch 1, then
the follower) 1.0 s of CPU. Medium's horizon is twice umaze's (256, same widths), so about 1.8 s per update
(estimated, not measured). Three seeds on umaze and medium cost about 3 x (0.91 + 1.8) = 8.1 s of CPU per budget
step; ~60 minutes of one core therefore fit ``--steps 400`` (3,250 s for Diffuser; the evaluations, 10 episodes per
run, and the twelve d3rlpy runs on small MLPs were not measured and should add minutes), umaze alone about
``--steps 1200``:

    OMP_NUM_THREADS=1 python scripts/bench_maze2d.py --steps 400 --episodes 10

These are CPU seconds; wall time matches them only on an idle core (it was 6x longer under the load above). The
paper trained 2M steps; such budgets measure early training, not its published scores (113.9 / 121.5 on umaze /
medium).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_log import file_digest, mean_se, read_runs, run_logged  # noqa: E402

from agents.diffuser import PRESETS, Diffuser, DiffuserConfig  # noqa: E402
from agents.presets import apply_preset  # noqa: E402
from diffrl.checkpoint import atomic_open  # noqa: E402
from diffrl.config import apply_overrides  # noqa: E402
from diffrl.seeding import seed_everything  # noqa: E402
from diffrl.training import TrainConfig, Trainer  # noqa: E402
from envs import evaluate, load_dataset  # noqa: E402
from envs.maze import ControllerPolicy, PlanFollower, maze_spec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("maze2d-umaze", "maze2d-medium")
D3RLPY = ("iql", "bc")
METHODS = ("diffuser", *D3RLPY)
LABELS = {"diffuser": "Diffuser", "iql": "d3rlpy IQL", "bc": "d3rlpy BC", "controller": "waypoint controller"}
D3RLPY_PYTHON = ROOT.parent / "d3rlpy-venv" / "bin" / "python"
EVAL_SEED = 10_000  # evaluation episode i starts from seed EVAL_SEED + i for every method and training seed


class TorchScriptPolicy:
    """An exported policy (raw observations (B, obs_dim) -> actions) in the ``envs.evaluation`` protocol."""

    def __init__(self, path: Path) -> None:
        self.module = torch.jit.load(str(path), map_location="cpu").eval()

    def reset(self) -> None:
        """Stateless: nothing to forget between episodes."""

    def act(self, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.module(torch.as_tensor(np.asarray(obs), dtype=torch.float32)).numpy()


def diffuser_config(path: Path, overrides: list[str]) -> DiffuserConfig:
    """The dataset's Diffuser preset, then ``field=value`` overrides."""
    config, _ = apply_preset(DiffuserConfig(), PRESETS, str(path))
    return apply_overrides(config, overrides)


def evaluation(policy, task: str, episodes: int) -> dict:
    """Returns and normalised scores of ``policy`` on the task's fixed evaluation episodes, with the wall time."""
    start, cpu = time.perf_counter(), time.process_time()
    result = evaluate(policy, task, episodes=episodes, seed=EVAL_SEED)
    return {"returns": result.returns.tolist(), "return": result.mean, "normalized": result.normalized_mean,
            "eval_s": time.perf_counter() - start, "eval_cpu_s": time.process_time() - cpu}


def run_diffuser(task: str, path: Path, args: argparse.Namespace, seed: int) -> dict:
    """Train the preset Diffuser for ``args.steps`` updates and evaluate its open-loop plans."""
    config = diffuser_config(path, args.overrides)
    dataset = load_dataset(path)
    seed_everything(seed)
    agent = Diffuser.from_dataset(dataset, config)
    start, cpu = time.perf_counter(), time.process_time()
    Trainer(agent, agent.batch_sampler(dataset), TrainConfig(steps=args.steps, batch_size=Diffuser.default_batch_size,
                                                             seed=seed, progress=False)).fit()
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    generator = torch.Generator().manual_seed(seed)
    follower = PlanFollower(lambda obs: agent.plan(obs, generator)["states"])
    return {"train_s": train_s, "train_cpu_s": train_cpu_s, "config": dataclasses.asdict(config),
            **evaluation(follower, task, args.episodes)}


def run_d3rlpy(algo: str, task: str, path: Path, args: argparse.Namespace, seed: int) -> dict:
    """Train a d3rlpy baseline in its own interpreter, then evaluate its exported policy here."""
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.pt"
        cmd = [args.d3rlpy_python, str(ROOT / "scripts" / "d3rlpy_maze_runner.py"), "--algo", algo, "--dataset",
               str(path), "--steps", str(args.steps), "--seed", str(seed), "--policy-out", str(policy)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines or not policy.exists():
            raise RuntimeError(f"d3rlpy {algo} on {path} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        return {"train_s": json.loads(lines[-1])["train_seconds"],
                **evaluation(TorchScriptPolicy(policy), task, args.episodes)}


def run_job(job: dict, args: argparse.Namespace) -> dict:
    """One logged run: ``job`` (its key) with the method's results."""
    torch.set_num_threads(1)
    task, path, method, seed = job["task"], Path(job["path"]), job["method"], job["seed"]
    if method == "controller":
        out = {"train_s": 0.0, **evaluation(ControllerPolicy(task, seed=seed), task, args.episodes)}
    elif method == "diffuser":
        out = run_diffuser(task, path, args, seed)
    else:
        out = run_d3rlpy(method, task, path, args, seed)
    return {**job, **out}


KEY = ("task", "method", "seed", "steps", "episodes", "settings", "digest")


def jobs_for(args: argparse.Namespace, paths: dict[str, Path], methods: list[str]) -> list[dict]:
    """Every (task, method, seed) run of this invocation as its key; the controller once per task (seed 0)."""
    settings = " ".join(args.overrides)
    jobs = []
    for task in args.tasks:
        digest = file_digest(paths[task])
        common = {"steps": args.steps, "episodes": args.episodes, "digest": digest, "path": str(paths[task])}
        jobs.append({"task": task, "method": "controller", "seed": 0, "settings": "", **common})
        jobs += [{"task": task, "method": m, "seed": s, "settings": settings if m == "diffuser" else "", **common}
                 for m in methods for s in args.seeds]
    return jobs


def _key(run: dict) -> tuple:
    return tuple(run[k] for k in KEY)


def table(runs: list[dict], steps: int, episodes: int) -> str:
    """The score table of ``runs`` (one budget), one row per task and method."""
    lines = [f"Maze2D, D4RL-normalised score (maze2d-v1 references), {steps} gradient steps per learner, "
             f"{episodes} evaluation episodes (seeds {EVAL_SEED}..{EVAL_SEED + episodes - 1}) per run; mean ± s.e. "
             "over training seeds. The controller is the data's behaviour without action noise (one run).", "",
             "| task | method | seeds | normalised | return | train s / run | eval s / episode |",
             "|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in runs):
        for method in ("controller", *METHODS):
            group = sorted((r for r in runs if r["task"] == task and r["method"] == method), key=lambda r: r["seed"])
            if not group:
                continue
            score, score_se = mean_se([r["normalized"] for r in group])
            ret, ret_se = mean_se([r["return"] for r in group])
            train_s = np.mean([r["train_s"] for r in group])
            eval_s = np.mean([r["eval_s"] / r["episodes"] for r in group])
            seeds = ",".join(str(r["seed"]) for r in group)
            lines.append(f"| {task} | {LABELS[method]} | {seeds} | {score:.1f} ± {score_se:.1f} | {ret:.1f} ± "
                         f"{ret_se:.1f} | {train_s:.0f} | {eval_s:.2f} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path, steps: int) -> None:
    """Bars of the mean normalised score per method (seeds as dots), the controller as a dashed line, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in runs))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        here = [m for m in METHODS if any(r["task"] == task and r["method"] == m for r in runs)]
        for i, method in enumerate(here):
            scores = [r["normalized"] for r in runs if r["task"] == task and r["method"] == method]
            mean, se = mean_se(scores)
            ax.bar(i, mean, yerr=se, color=f"C{i}", alpha=0.7, capsize=4)
            ax.scatter(np.full(len(scores), i), scores, color="k", s=12, zorder=3)
        for r in runs:
            if r["task"] == task and r["method"] == "controller":
                ax.axhline(r["normalized"], color="gray", ls="--", label=LABELS["controller"])
        ax.set_xticks(range(len(here)), [LABELS[m] for m in here])
        ax.set_title(f"{task}, {steps} gradient steps")
        ax.set_ylabel("D4RL-normalised score")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def dataset_paths(tasks: list[str], data_dir: Path) -> dict[str, Path]:
    """``<data_dir>/<task>.hdf5`` per task, or one line saying how to make a missing one."""
    paths = {}
    for task in tasks:
        maze_spec(task)
        paths[task] = data_dir / f"{task}.hdf5"
        if not paths[task].is_file():
            raise SystemExit(f"error: {paths[task]} not found; make it with `diffrl collect {task} "
                             f"--transitions 1000000 --out {data_dir} --formats hdf5`")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=["maze2d-umaze", "maze2d-medium",
                                                                          "maze2d-large"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=400, help="gradient steps of every learner")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes per run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="Diffuser config override after the preset (repeatable; part of the run key)")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "maze_data")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "maze2d")
    parser.add_argument("--d3rlpy-python", default=str(D3RLPY_PYTHON))
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.episodes < 1 or args.jobs < 1:
        raise SystemExit("error: --steps, --episodes and --jobs must be >= 1")
    paths = dataset_paths(args.tasks, args.data_dir)
    try:
        diffuser_config(next(iter(paths.values())), args.overrides)
    except ValueError as err:
        raise SystemExit(f"error: --set: {err}") from None
    methods = list(args.methods)
    if any(m in D3RLPY for m in methods) and not Path(args.d3rlpy_python).exists():
        print(f"skipping d3rlpy IQL and BC: no interpreter at {args.d3rlpy_python} (see scripts/bench_offline_rl.py "
              "for the venv)")
        methods = [m for m in methods if m not in D3RLPY]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    kept = read_runs(log)
    done = {_key(r) for r in kept}
    jobs = jobs_for(args, paths, methods)
    todo = [job for job in jobs if _key(job) not in done]
    print(f"{len(todo)} runs to do, {len(kept)} logged in {log}")
    runs = run_logged([(run_job, (job, args)) for job in todo], log, args.jobs, kept,
                      on_result=lambda r: print(f"{r['task']} {r['method']} seed {r['seed']}: normalised "
                                                f"{r['normalized']:.1f} (train {r['train_s']:.0f} s)"))
    wanted = {_key(job) for job in jobs}
    current = [r for r in runs if _key(r) in wanted]
    text = table(current, args.steps, args.episodes)
    with atomic_open(args.out / "bench.txt", "w") as f:
        f.write(text)
    plot(current, args.out / "bench.png", args.steps)
    print(text + f"\ntable: {args.out / 'bench.txt'}; plot: {args.out / 'bench.png'}; runs: {log}")


if __name__ == "__main__":
    main()
