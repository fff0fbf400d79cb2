"""Few-step students on tasks: a DiffusionBC teacher against its 2-step and 1-step progressive students.

For each seed: a DiffusionBC teacher is trained with the agent's defaults (5-step DDPM chain and sampler: the
teacher row), then ``diffrl.distill`` makes a 2-step and a 1-step student by progressive distillation of its
VP-SDE model from a 16-step DDIM grid (16 -> 8 -> 4 -> 2 -> 1, ``--iterations`` updates per round: 3 rounds for the
2-step student, 4 for the 1-step one; progressive is the method closest to the exact sampler on the closed form,
see results/distill/bench_distill.md). Teacher and students are evaluated on the same episodes
(environment seeds ``10000 + i``, policy seed = run seed) and their ``act()`` latency on one observation is timed
in interleaved rounds (median, ms).

``--task pointnav``: ``toy:pointnav``; return, goal rate and the goal rate along each route (``envs.toy.episode_route``,
as in results/pointnav_routes.json). ``--task hopper-medium``: ``--dataset`` (D4RL layout HDF5); return and the
D4RL-normalised score. Each finished seed is appended to ``<out>/runs_<task>.jsonl``; a rerun with the same
settings skips the seeds logged there, runs of other settings stay in the log and get rows of their own. The table
(mean +- standard error over seeds, one block per task and budget) goes to ``<out>/tasks.md`` and ``tasks.csv``, the
plot to ``tasks.png``. ``--work-dir`` keeps the teacher and student run folders (default: a temporary folder); a
teacher already trained there with the same settings is reused.

    OMP_NUM_THREADS=1 python scripts/bench_distill_tasks.py --task pointnav
    OMP_NUM_THREADS=1 python scripts/bench_distill_tasks.py --task hopper-medium --teacher-steps 10000 --episodes 10
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bc import pointnav_rollouts, summarise  # noqa: E402
from bench_policy_latency import timings  # noqa: E402
from run_log import file_digest, mean_se, read_runs  # noqa: E402

import diffrl  # noqa: E402
from agents.policy import CHECKPOINT_KIND, load_policy  # noqa: E402
from diffrl.checkpoint import atomic_open, load_checkpoint, save_checkpoint  # noqa: E402
from diffrl.distillation import DEFAULT_TEACHER_STEPS  # noqa: E402
from envs import evaluate, load_dataset  # noqa: E402

EVAL_SEED = 10_000
STUDENT_STEPS = (2, 1)
DEFAULTS = {"pointnav": {"teacher_steps": 3000, "iterations": 500, "episodes": 100},
            "hopper-medium": {"teacher_steps": 10_000, "iterations": 1000, "episodes": 10}}
#: The teacher's model sampled by deterministic DDIM on the grid the progressive rounds start from (no training):
#: tells what the deterministic sampler itself does from what distillation does.
ODE_TEACHER = f"teacher-ddim{DEFAULT_TEACHER_STEPS}"
POLICIES = ["teacher", ODE_TEACHER, *(f"progressive-{k}" for k in STUDENT_STEPS)]
COLOURS = dict(zip(POLICIES, ("tab:gray", "silver", "tab:blue", "tab:orange"), strict=True))
LR_NOTES = {"constant": "constant learning rate, no gradient clipping",
            "annealed": "learning rate decayed linearly to 0 within each round, gradient norm clipped to 1 (official)"}
ROUTE_SHARE = 0.1  # a route is kept when at least this share of the episodes reaches the goal along it


def settings_of(args: argparse.Namespace) -> dict:
    """What makes two runs comparable (a rerun skips seeds logged with the same settings)."""
    data = args.dataset if args.task == "hopper-medium" else "toy:pointnav"
    return {"task": args.task, "dataset": data, "dataset_sha": file_digest(Path(data)) if Path(data).is_file() else
            None, "teacher_steps": args.teacher_steps, "iterations": args.iterations, "episodes": args.episodes,
            "batch_size": args.batch_size, "student_lr": "constant" if args.constant_lr else "annealed"}


def score(task: str, path: Path, dataset, episodes: int, seed: int) -> dict:
    """The policy file's evaluation on episodes seeded ``EVAL_SEED + i``."""
    policy = load_policy(path, seed=seed)
    if task == "pointnav":
        row = summarise(pointnav_rollouts(policy, episodes, seed=EVAL_SEED))
        return {"return": row["mean_return"], "goal": row["goal"], "goal_up": row["goal_up"],
                "goal_down": row["goal_down"]}
    result = evaluate(policy, dataset, episodes=episodes, seed=EVAL_SEED)
    return {"return": result.mean, "normalized": result.normalized_mean}


def latencies(paths: dict[str, Path], repeats: int = 1000, rounds: int = 5) -> dict[str, float]:
    """Median ``act()`` time (ms) on one observation of each policy, measured in interleaved rounds."""
    policies = {name: load_policy(path, seed=0) for name, path in paths.items()}
    times: dict[str, list[np.ndarray]] = {name: [] for name in policies}
    for _ in range(rounds):
        for name, policy in policies.items():
            obs = np.zeros(policy.obs_dim, dtype=np.float32)
            times[name].append(timings(lambda p=policy, o=obs: p.act(o), repeats // rounds, 50))
    return {name: float(np.median(np.concatenate(v))) / 1000 for name, v in times.items()}


def budget_of(run: dict) -> tuple:
    """The settings that make runs one row group: task, data, teacher and student budgets, episodes."""
    keys = ("task", "dataset_sha", "teacher_steps", "iterations", "episodes", "batch_size")
    return (*(run.get(k) for k in keys), run.get("student_lr", "constant"))  # the first runs had a constant rate


def run_seed(args: argparse.Namespace, seed: int, dataset, root: Path) -> dict:
    """Teacher and students of one seed, scored and timed; a teacher finished in ``root`` before is reused."""
    settings = settings_of(args)
    data = settings["dataset"]
    teacher_dir = root / f"{args.task}-{settings['dataset_sha']}-teacher{args.teacher_steps}-b{args.batch_size}-{seed}"
    teacher_log = teacher_dir / "teacher_train_s.json"
    if not teacher_log.exists():
        start = time.perf_counter()
        diffrl.make("diffusion_bc", data, seed=seed, batch_size=args.batch_size).fit(
            args.teacher_steps, eval_episodes=0, run_dir=teacher_dir, overwrite=True, progress=False)
        with atomic_open(teacher_log, "w") as f:
            json.dump({"train_s": time.perf_counter() - start}, f)
    train_s = {"teacher": json.loads(teacher_log.read_text())["train_s"], ODE_TEACHER: 0.0}
    paths = {"teacher": teacher_dir / "policy.pt", ODE_TEACHER: teacher_dir / "policy_ddim.pt"}
    payload = load_checkpoint(paths["teacher"], expected_kind=CHECKPOINT_KIND)
    ddim = {"solver": "ddim", "solver_kwargs": {}, "steps": DEFAULT_TEACHER_STEPS}
    save_checkpoint(paths[ODE_TEACHER], {**payload, "actor_config": {**payload["actor_config"], **ddim}},
                    kind=CHECKPOINT_KIND)
    for steps in STUDENT_STEPS:
        name, out = f"progressive-{steps}", teacher_dir.with_name(f"{teacher_dir.name}-progressive{steps}-it"
                                                                   f"{args.iterations}-{settings['student_lr']}")
        start = time.perf_counter()
        diffrl.distill(teacher_dir, "progressive", steps, out_dir=out, overwrite=True, batch_size=args.batch_size,
                       seed=seed, device="cpu", eval_episodes=0, progress=False, iterations=args.iterations,
                       **({"anneal_lr": False, "max_grad_norm": None} if args.constant_lr else {}))
        train_s[name] = time.perf_counter() - start
        paths[name] = out / "policy.pt"
    latency = latencies(paths)
    policies = {}
    for name, path in paths.items():
        policy = load_policy(path, seed=0)
        policies[name] = {**score(args.task, path, dataset, args.episodes, seed), "latency_ms": latency[name],
                          "train_s": train_s[name], "calls": policy.actor.steps,
                          "sampler": type(policy.actor.solver).__name__}
        print(seed, name, policies[name], flush=True)
    return {**settings_of(args), "seed": seed, "policies": policies}


#: The standard error of a single seed: unknown.
NAN = float("nan")


def summary(runs: list[dict]) -> list[dict]:
    """One row per (task, policy): mean and standard error over seeds of every metric, the headline metric (goal
    rate, D4RL score) minus the teacher's of the same seed, and where the mean lies against the teacher's mean +- one
    standard error (the teacher's, over seeds): within, above or below."""
    rows = []
    for budget in dict.fromkeys(map(budget_of, runs)):
        group = [r for r in runs if budget_of(r) == budget]
        task = budget[0]
        headline = "normalized" if task == "hopper-medium" else "goal"
        teacher = mean_se([r["policies"]["teacher"][headline] for r in group], single=NAN)
        for name in (n for n in POLICIES if all(n in r["policies"] for r in group)):
            cells = [r["policies"][name] for r in group]
            row = {"task": task, "block": f"{task}, {budget[3]} per round, {budget[-1]} lr", "policy": name,
                   "sampler": cells[0]["sampler"], "calls": cells[0]["calls"],
                   "seeds": len(group), "teacher_steps": group[0]["teacher_steps"],
                   "iterations": group[0]["iterations"], "episodes": group[0]["episodes"],
                   "batch_size": group[0]["batch_size"], "student_lr": budget[-1]}
            for key in ("return", "normalized", "goal", "goal_up", "goal_down", "latency_ms", "train_s"):
                if key in cells[0]:
                    row[key], row[f"{key}_se"] = mean_se([c[key] for c in cells], single=NAN)
            row["minus_teacher"], row["minus_teacher_se"] = mean_se(
                [r["policies"][name][headline] - r["policies"]["teacher"][headline] for r in group], single=NAN)
            gap = row[headline] - teacher[0]
            row["vs_teacher"] = "within" if abs(gap) <= teacher[1] else "above" if gap > 0 else "below"
            if task == "pointnav":
                row["both_routes"] = sum(min(c["goal_up"], c["goal_down"]) >= ROUTE_SHARE for c in cells)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    def pm(row: dict, key: str, fmt: str) -> str:
        return f"{row[key]:{fmt}} +- {row[key + '_se']:{fmt}}" if key in row else "-"

    lines = ["| task, student updates | policy | sampler, calls | return | D4RL score | goal rate | goal up | "
             "goal down | seeds with both routes | act() median ms | minus teacher | vs teacher +- 1 SE | "
             "training wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['policy']} | {r['sampler']} {r['calls']} | {pm(r, 'return', '.1f')} | "
                     f"{pm(r, 'normalized', '.1f')} | {pm(r, 'goal', '.2f')} | {pm(r, 'goal_up', '.2f')} | "
                     f"{pm(r, 'goal_down', '.2f')} | {r['both_routes'] if 'both_routes' in r else '-'} | "
                     f"{pm(r, 'latency_ms', '.2f')} | {pm(r, 'minus_teacher', '.2f')} | "
                     f"{r['vs_teacher']} | {r['train_s']:.0f} |")
    budgets = {(r["task"], r["seeds"], r["teacher_steps"], r["batch_size"], r["iterations"], r["episodes"],
                r["student_lr"]) for r in rows}
    lines += ["", "minus teacher: the headline metric (goal rate for pointnav, D4RL score for hopper-medium) minus the "
              "teacher's of the same seed (mean +- s.e. over seeds); vs teacher +- 1 SE: whether the mean lies within, "
              "above or below the teacher's mean +- the teacher's standard error over seeds; seeds with both routes: "
              "seeds where at least "
              f"{ROUTE_SHARE:.0%} of the episodes reach the goal along each route (envs.toy.episode_route); "
              + (f"{ODE_TEACHER}: the teacher's network sampled by {DEFAULT_TEACHER_STEPS}-step deterministic DDIM "
                 "(no training); " if any(r["policy"] == ODE_TEACHER for r in rows) else "")
              + "means +- standard errors over seeds; latency: median of act() on one observation, interleaved "
              "rounds.", ""]
    lines += [f"{task}: {seeds} seeds; teacher {steps} updates at batch {batch}, students {it} updates per progressive "
              f"round from a {DEFAULT_TEACHER_STEPS}-step DDIM grid (3 rounds for 2 calls, 4 for 1 call), "
              f"{LR_NOTES[lr]}; {eps} evaluation episodes per policy and seed; one CPU thread on a shared 2-core "
              "machine." for task, seeds, steps, batch, it, eps, lr in sorted(budgets)]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(dict.fromkeys(r["block"] for r in rows))
    fig, axes = plt.subplots(2, len(blocks), figsize=(4.5 * len(blocks), 6.5), squeeze=False)
    for j, block in enumerate(blocks):
        group = [r for r in rows if r["block"] == block]
        hopper = group[0]["task"] == "hopper-medium"
        key, label = ("normalized", "D4RL-normalised score") if hopper else ("goal", "goal rate")
        names = [f"{r['policy']}\n({r['calls']} calls)" for r in group]
        for i, (metric, ylabel) in enumerate(((key, label), ("latency_ms", "act() median latency (ms)"))):
            ax = axes[i][j]
            ax.bar(names, [r[metric] for r in group], yerr=[r[metric + "_se"] for r in group], capsize=4,
                   color=[COLOURS[r["policy"]] for r in group])
            ax.set_ylabel(ylabel)
            ax.set_title(f"{block}, {group[0]['seeds']} seeds (mean +- s.e.)", fontsize=9)
            ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path) -> None:
    runs = [r for f in sorted(out.glob("runs_*.jsonl")) for r in read_runs(f)]
    if not runs:
        return
    rows = summary(runs)
    with open(out / "tasks.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    (out / "tasks.md").write_text(table + "\n")
    plot(rows, out / "tasks.png")
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=tuple(DEFAULTS), default="pointnav")
    parser.add_argument("--dataset", default="/work/shared/datasets/hopper-medium.hdf5", help="hopper-medium data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-steps", type=int, help="teacher updates (pointnav 3000, hopper-medium 10000)")
    parser.add_argument("--iterations", type=int, help="student updates per round (pointnav 500, hopper 1000)")
    parser.add_argument("--episodes", type=int, help="evaluation episodes (pointnav 100, hopper-medium 10)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("results/distill"))
    parser.add_argument("--work-dir", type=Path, help="keep teacher and student runs here (default: temporary)")
    parser.add_argument("--constant-lr", action="store_true",
                        help="students at a constant learning rate without clipping (the first runs' setting)")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table and plot from the logs")
    args = parser.parse_args()
    for name, value in DEFAULTS[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        log = args.out / f"runs_{args.task}.jsonl"
        settings = settings_of(args)
        done = {r["seed"] for r in read_runs(log)
                if all({"student_lr": "constant", **r}.get(k) == v for k, v in settings.items())}
        dataset = load_dataset(settings["dataset"])
        with contextlib.ExitStack() as stack:
            root = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="distill-tasks-")))
            for seed in (s for s in args.seeds if s not in done):
                row = run_seed(args, seed, dataset, root)
                with open(log, "a") as f:
                    f.write(json.dumps(row) + "\n")
    write_outputs(args.out)


if __name__ == "__main__":
    main()
