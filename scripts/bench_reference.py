"""Parity benchmark: a diffrl agent beside the official code of its paper, same data, seeds and budget.

``--agent diffusion_ql``: diffrl's DiffusionQL against github.com/Zhendong-Wang/Diffusion-Policies-for-Offline-RL
(scripts/reference_dql_runner.py), ``--steps`` gradient steps at batch 256 with the dataset's preset on both sides.

``--agent qgpo``: diffrl's QGPO against github.com/ChenDRAG/CEP-energy-guided-diffusion (scripts/
reference_qgpo_runner.py), ``--steps`` gradient steps split in the official ratio (600 x 1000 behaviour steps :
100 x 10,000 critic steps, ``train_behavior.py`` / ``train_critic.py``; Q trained in the first half of the critic
phase): 3750 + 6250 of 10,000. The official batches (4096 behaviour, 256 critic), its data (every transition, K = 16
support actions of each drawn with 15 solver calls, for s and for s') are far too slow on one CPU thread (one
behaviour step at 4096 ~ 1 s, the support set of hopper-medium-replay's 160k states ~ 70 min); the reduced setting
is given by ``--behavior-batch``, ``--critic-batch`` and ``--data-fraction`` (a fixed random subset of whole
episodes of the file, ``reduced_dataset``) and applied identically to both implementations; the networks, K, the
sampler, the learning rates and the phase split stay official. The results/reference_qgpo run used 128, 64 and 1/16.

Each implementation runs in its own single-threaded process: ``official`` from the checkout ``--official`` through
its runner (which substitutes h5py for d4rl and Gymnasium for gym, see there); ``diffrl`` with the agent's defaults
and the dataset's preset (``<Agent>.presets``), trained by scripts/train_offline_rl.py's ``train`` (the shared
Trainer). Both are evaluated every ``--eval-every`` steps over ``--eval-episodes`` episodes in the Gymnasium env
named by the file's ``env_id``, with ``envs.evaluation.evaluate`` and the same episode seeds (seed + 10000 + i), and
scored with the file's reference returns (D4RL normalisation, x100). Throughput counts training time only.

Each finished run is one JSON line in ``<out>/runs.jsonl`` (implementation, dataset, seed, budget, reduction,
curve of normalised scores, steps/s, settings); runs already logged with the same budget, reduction and evaluation
settings are not run again, so later invocations add seeds or datasets. ``--report`` prints the table (final
normalised score and the mean of each run's last three evaluations, mean +- standard error over seeds; gradient
steps/s) and writes the learning curves to ``<out>/curves.png``. ``--jobs N`` runs N runs at a time.

    # the Diffusion-QL parity run (3 seeds, 10k steps each, both implementations)
    OMP_NUM_THREADS=1 python scripts/bench_reference.py --agent diffusion_ql --official /work/ref/dql \\
        --dataset ../shared/datasets/hopper-medium-replay.hdf5 --steps 10000 --seeds 0 1 2 \\
        --eval-every 1000 --eval-episodes 10 --out results/reference_dql --jobs 2
    # the QGPO parity run (one process at a time), then the report
    OMP_NUM_THREADS=1 python scripts/bench_reference.py --agent qgpo --official /tmp/ref/cep \\
        --dataset ../shared/datasets/hopper-medium-replay.hdf5 --steps 10000 --seeds 0 1 2 --eval-every 1000 \\
        --eval-episodes 10 --behavior-batch 128 --critic-batch 64 --data-fraction 0.0625
    python scripts/bench_reference.py --report --out results/reference_qgpo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_dql_runner as dql_runner  # noqa: E402
import reference_qgpo_runner as qgpo_runner  # noqa: E402
from reference_dql_runner import task_name  # noqa: E402
from run_log import file_digest, mean_se, read_runs, run_logged  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IMPLEMENTATIONS = ("official", "diffrl")
AGENTS = ("diffusion_ql", "qgpo")
RUNNERS = {"diffusion_ql": dql_runner, "qgpo": qgpo_runner}
NAMES = {"diffusion_ql": "Diffusion-QL", "qgpo": "QGPO"}
CLASSES = {"diffusion_ql": "DiffusionQL", "qgpo": "QGPO"}
REPOSITORIES = {"diffusion_ql": dql_runner.REPOSITORY, "qgpo": qgpo_runner.REPOSITORY}
OUT_DIRS = {"diffusion_ql": "reference_dql", "qgpo": "reference_qgpo"}
BATCH_SIZE = 256
LAST_EVALS = 3
#: official row / argparse name -> DiffusionQLConfig field, for the settings check.
OFFICIAL_TO_OURS = {"lr": "lr", "eta": "eta", "max_q_backup": "max_q_backup", "reward_tune": "reward_tune",
                    "gn": "max_grad_norm", "discount": "gamma", "tau": "tau", "T": "diffusion_steps"}
#: official QGPO setting -> QGPOConfig fields, for the settings check.
QGPO_TO_OURS = {"alpha": ("beta",), "q_alpha": ("q_alpha",), "diffusion_steps": ("support_steps", "sample_steps"),
                "behavior_lr": ("behavior_lr",), "q_fraction": ("q_train_fraction",)}
CHECKED = {"diffusion_ql": "lr, eta, max_q_backup, reward_tune, gn, discount, tau, T, beta schedule, batch size",
           "qgpo": "alpha = beta, q_alpha, diffusion_steps, M = n_support, behaviour lr, phase split"}


def label(agent: str, implementation: str) -> str:
    return f"official ({REPOSITORIES[agent]})" if implementation == "official" else f"diffrl {CLASSES[agent]}"


def reduction(args: argparse.Namespace) -> dict | None:
    """The reduced setting both implementations run at (None: the official one; Diffusion-QL has none)."""
    if args.agent != "qgpo":
        return None
    return {"behavior_batch": args.behavior_batch, "critic_batch": args.critic_batch,
            "data_fraction": args.data_fraction, "data_seed": args.data_seed}


def batch_size(args: argparse.Namespace) -> int:
    """The Trainer's batch: the critic-phase batch for QGPO, 256 (official) for Diffusion-QL."""
    return args.critic_batch if args.agent == "qgpo" else BATCH_SIZE


def reduced_dataset(path: Path, fraction: float, seed: int, cache: Path | None = None) -> Path:
    """A D4RL-layout copy of ``path`` holding a fixed random ``fraction`` of its whole episodes (in file order,
    attributes kept; the file name too, so task presets still apply): episodes are taken in a permutation drawn
    with ``seed`` until they hold ``fraction`` of the transitions. ``path`` itself for ``fraction`` >= 1."""
    import h5py

    if fraction >= 1.0:
        return path
    if not 0.0 < fraction:
        raise SystemExit(f"--data-fraction must lie in (0, 1], got {fraction}")
    cache = cache or Path(tempfile.gettempdir()) / "diffrl-bench-reference"
    out = cache / f"{path.stem}-{fraction:g}-seed{seed}" / path.name
    if out.exists():
        return out
    with h5py.File(path, "r") as f:
        fields = {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset)}
        attrs = dict(f.attrs)
    n = len(fields["rewards"])
    done = fields["terminals"].astype(bool) | fields.get("timeouts", np.zeros(n)).astype(bool)
    bounds = np.unique(np.concatenate([[0], np.flatnonzero(done) + 1, [n]]))
    episodes = list(zip(bounds[:-1], bounds[1:], strict=True))
    chosen, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(episodes)):
        if total >= fraction * n:
            break
        chosen.append(episodes[i])
        total += episodes[i][1] - episodes[i][0]
    rows = np.concatenate([np.arange(a, b) for a, b in sorted(chosen)])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with h5py.File(tmp, "w") as f:
        for k, v in fields.items():
            f.create_dataset(k, data=v[rows] if len(v) == n else v)
        f.attrs.update({**attrs, "subset_of": str(path), "subset_fraction": fraction, "subset_seed": seed})
    os.replace(tmp, out)
    return out


def diffrl_config(agent: str, dataset: str | Path, steps: int, reduced: dict | None = None):
    """The agent's config for the dataset: defaults, then its preset row; the budget as ``total_steps`` (the LR
    schedule horizon of Diffusion-QL, the phase split of QGPO); QGPO's behaviour batch from the reduction."""
    from agents import AGENTS as REGISTRY
    from agents.presets import apply_preset

    config_cls, agent_cls = REGISTRY[agent]
    config, line = apply_preset(config_cls(), agent_cls.presets, str(dataset))
    if config.total_steps is None:
        config = dataclasses.replace(config, total_steps=steps)
    if reduced is not None:
        config = dataclasses.replace(config, behavior_batch_size=reduced["behavior_batch"])
    return config, line


def settings_differences(agent: str, checkout: Path, dataset: str | Path, steps: int,
                         reduced: dict | None = None) -> list[str]:
    """Where the official settings for the dataset's task differ from diffrl's config for it (empty: none)."""
    config, _ = diffrl_config(agent, dataset, steps, reduced)
    if agent == "qgpo":
        official = qgpo_runner.read_official_settings(checkout)
        m = official["M"]["antmaze" if "antmaze" in task_name(dataset) else "locomotion"]
        out = [f"{name}={official[name]!r} vs {field}={getattr(config, field)!r}" for name, fields in
               QGPO_TO_OURS.items() for field in fields if official[name] != getattr(config, field)]
        if m != config.n_support:
            out.append(f"M={m} vs n_support={config.n_support}")
        if qgpo_runner.phase_split(official, steps) != config.phase_steps():
            out.append(f"phase split {qgpo_runner.phase_split(official, steps)} vs {config.phase_steps()}")
        return out
    table, defaults = dql_runner.read_official_settings(checkout)
    _, row = dql_runner.official_row(table, task_name(dataset))
    official = {**row, **defaults}
    out = [f"{name}={official[name]!r} vs {field}={getattr(config, field)!r}"
           for name, field in OFFICIAL_TO_OURS.items() if name in official and official[name] != getattr(config, field)]
    if official.get("beta_schedule") != "vp":
        out.append(f"beta_schedule={official['beta_schedule']!r} (diffrl: vp)")
    if official.get("batch_size") != BATCH_SIZE:
        out.append(f"batch_size={official['batch_size']} (this benchmark: {BATCH_SIZE})")
    return out


def official_command(data: Path, seed: int, args: argparse.Namespace) -> list[str]:
    cmd = [args.python, str(Path(RUNNERS[args.agent].__file__).resolve()), "--official", str(args.official),
           "--dataset", str(data), "--steps", str(args.steps), "--eval-every", str(args.eval_every),
           "--eval-episodes", str(args.eval_episodes), "--seed", str(seed), "--eval-seed", str(seed + 10_000)]
    if args.agent == "qgpo":
        cmd += ["--behavior-batch", str(args.behavior_batch), "--critic-batch", str(args.critic_batch)]
    return cmd


def run_official(data: Path, seed: int, args: argparse.Namespace) -> dict:
    cmd = official_command(data, seed, args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the official run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1])
    return {"curve": out["evaluations"], "steps_per_sec": out["steps_per_sec"], "settings": out["settings"],
            "transitions": out["transitions"], "stubbed_imports": out["stubbed_imports"]}


def run_diffrl(data: Path, seed: int, args: argparse.Namespace) -> dict:
    from train_offline_rl import train

    from envs import load_dataset

    dataset = load_dataset(data)
    config, preset = diffrl_config(args.agent, data, args.steps, reduction(args))
    result = train(args.agent, dataset, config, steps=args.steps, batch_size=batch_size(args), seed=seed,
                   eval_every=args.eval_every, eval_episodes=args.eval_episodes, log_every=max(1, args.steps // 10))
    curve = [{"step": e["step"], "return": e["return"], "normalized": e.get("normalized")} for e in result.evaluations]
    return {"curve": curve, "steps_per_sec": result.steps_per_sec, "settings": dataclasses.asdict(config),
            "preset": preset, "transitions": len(dataset)}


def run_job(job: tuple[str, str, int], args: argparse.Namespace) -> dict:
    """One (implementation, dataset, seed) run in a single-threaded process."""
    import torch

    torch.set_num_threads(1)
    implementation, dataset, seed = job
    reduced = reduction(args)
    data = (reduced_dataset(Path(dataset), reduced["data_fraction"], reduced["data_seed"], args.data_dir) if reduced
            else Path(dataset))
    run = (run_official if implementation == "official" else run_diffrl)(data, seed, args)
    return {**job_fields(implementation, Path(dataset), seed, args), "dataset_path": str(dataset),
            **({"reduction": reduced} if reduced else {}), "final": run["curve"][-1].get("normalized"), **run}


def job_fields(implementation: str, dataset: Path, seed: int, args: argparse.Namespace) -> dict:
    """What identifies a run besides its reduction; the file's digest keeps runs on a remade file apart."""
    return {"implementation": implementation, "agent": args.agent, "dataset": task_name(dataset),
            "dataset_sha256": file_digest(dataset), "seed": seed, "steps": args.steps, "eval_every": args.eval_every,
            "eval_episodes": args.eval_episodes}


def run_key(run: dict) -> tuple:
    return (run["implementation"], run["agent"], run["dataset"], run.get("dataset_sha256"), run["seed"],
            run["steps"], run["eval_every"], run["eval_episodes"], json.dumps(run.get("reduction"), sort_keys=True))


# ------------------------------------------------------------------------------------------------ report
def group(runs: list[dict]) -> dict[tuple[str, str, str, int], dict[str, list[dict]]]:
    """(agent, dataset, file digest, budget) -> implementation -> runs sorted by seed."""
    out: dict[tuple[str, str, str, int], dict[str, list[dict]]] = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        key = (r["agent"], r["dataset"], r.get("dataset_sha256", "unrecorded"), r["steps"])
        out.setdefault(key, {}).setdefault(r["implementation"], []).append(r)
    return out


def describe_reduction(reduced: dict | None) -> str:
    if not reduced:
        return "batch 256"
    return (f"behaviour batch {reduced['behavior_batch']}, critic batch {reduced['critic_batch']}, "
            f"{reduced['data_fraction']:g} of the episodes (seed {reduced['data_seed']})")


def report(runs: list[dict], out: Path) -> str:
    """Print (and return) the table of all ``runs`` and plot their learning curves to ``out/curves.png``."""
    if not runs:
        raise SystemExit(f"no runs logged in {out / 'runs.jsonl'}")
    lines = ["D4RL-normalised score (x100): mean ± standard error over seeds; gradient steps / s (training only, "
             "one thread)"]
    head = f"{'dataset':<28}{'budget':>8}  {'implementation':<22}{'seeds':>6}{'final':>16}{'last 3 evals':>16}" \
           f"{'steps / s':>11}"
    lines += [head, "-" * len(head)]
    for (agent, dataset, digest, steps), by_impl in sorted(group(runs).items()):
        settings = {describe_reduction(r.get("reduction")) for rs in by_impl.values() for r in rs}
        lines.append(f"{NAMES[agent]}, {'; '.join(sorted(settings))}, file sha256 {digest}:")
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
    for ax, ((agent, dataset, _, steps), by_impl) in zip(axes[0], sorted(groups.items()), strict=True):
        for impl, rs in sorted(by_impl.items()):
            n = min(len(r["curve"]) for r in rs)
            x = np.array([p["step"] for p in rs[0]["curve"][:n]])
            y = np.array([[p["normalized"] for p in r["curve"][:n]] for r in rs])
            mean = y.mean(0)
            se = y.std(0, ddof=1) / np.sqrt(len(rs)) if len(rs) > 1 else np.zeros_like(mean)
            seeds = f"{len(rs)} seed{'s' * (len(rs) > 1)}"
            line, = ax.plot(x, mean, marker="o", label=f"{label(agent, impl)} ({seeds})")
            ax.fill_between(x, mean - se, mean + se, color=line.get_color(), alpha=0.2)
        ax.set(title=f"{NAMES[agent]} on {dataset} ({steps} steps)", xlabel="gradient steps",
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
    parser.add_argument("--behavior-batch", type=int, default=4096, help="QGPO: behaviour-phase batch (official "
                                                                        "4096)")
    parser.add_argument("--critic-batch", type=int, default=256, help="QGPO: critic-phase batch (official 256)")
    parser.add_argument("--data-fraction", type=float, default=1.0, help="QGPO: fraction of the file's episodes "
                                                                       "both implementations train on")
    parser.add_argument("--data-seed", type=int, default=0, help="QGPO: seed of the episode subset")
    parser.add_argument("--data-dir", type=Path, default=None, help="QGPO: where the subset files are written "
                                                                  "(default: the temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/reference_dql or reference_qgpo")
    parser.add_argument("--report", action="store_true", help="run nothing: print and plot <out>/runs.jsonl")
    args = parser.parse_args(argv)
    args.out = args.out or ROOT / "results" / OUT_DIRS[args.agent]
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
        args.official = RUNNERS[args.agent].check_checkout(args.official)
        for path in datasets:
            diffs = settings_differences(args.agent, args.official, path, args.steps, reduction(args))
            print(f"{task_name(path)}: official and diffrl settings "
                  + (f"differ: {'; '.join(diffs)}" if diffs else f"agree ({CHECKED[args.agent]})"))
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "runs.jsonl"
    kept = read_runs(log_path)
    done = {run_key(r) for r in kept}
    jobs = []
    for path in datasets:
        for seed in args.seeds:
            for impl in args.implementations:
                if run_key({**job_fields(impl, path, seed, args), "reduction": reduction(args)}) in done:
                    print(f"already logged: {impl} {task_name(path)} seed {seed} ({args.steps} steps)")
                else:
                    jobs.append((impl, str(path), seed))
    print(f"budget: {args.steps} gradient steps ({describe_reduction(reduction(args))}), {args.eval_episodes} "
          f"evaluation episodes every "
          f"{args.eval_every} steps; {len(jobs)} run(s) to do, {args.jobs} at a time", flush=True)
    runs = run_logged([(run_job, (job, args)) for job in jobs], log_path, max(1, args.jobs), kept,
                      on_result=print_run) if jobs else kept
    report(runs, args.out)


if __name__ == "__main__":
    main()
