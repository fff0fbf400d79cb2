"""PushT (gym-pusht, envs/pusht.py): Diffusion Policy against Gaussian behaviour cloning on the scripted expert's
demonstrations, with state observations (agent x, y, block x, y, angle) and with 96x96 images + agent position.

Steps: collect ``--demos`` expert episodes (env seeds 0..demos-1; only the successful ones are kept; the images are
stored too) into ``<data-dir>/pusht-expert-<demos>.hdf5`` unless it exists; evaluate the expert on the evaluation
seeds; train Diffusion Policy (agents/diffusion_policy.py) and Gaussian BC (agents/baselines.py) for the same number
of updates at the same batch size per observation type and training seed; roll each out on env seeds 10000..10000 +
episodes - 1. Reported: success rate (an episode succeeds when the coverage of the goal exceeds 0.95 at some step)
and the mean over episodes of the maximum coverage (Chi et al. 2023 report max coverage), mean ± standard error over
training seeds.

Diffusion Policy takes the paper's settings (horizon 16, 2 observations, 8 executed actions, DDPM with 100 steps,
squared-cosine betas, eps prediction, DDIM with 10 steps, AdamW with cosine schedule and warmup, EMA) except for
these deviations, all for CPU time (one core): U-Net widths ``--dims`` (default 64, 128, 256: 5.3M parameters
instead of 65M at 256, 512, 1024); batch 64 (``--batch``; the paper's is 256); learning rate ``--lr`` 1e-3 instead of
1e-4 (one pilot at seed 0, 10 evaluation episodes: 2,000 updates at 1e-3 reached mean max coverage 0.34, where 4,000
updates at 1e-4 reached 0.20 on 50 episodes; both logged); warmup ``min(500, steps / 10)`` updates; far fewer updates
than the paper's (it trains for thousands of epochs); with images the ResNet-18 encoder's width is
``--encoder-width`` (default 16 instead of 64). Gaussian BC is agents/baselines.py's 3x256 MLP (maximum likelihood,
mean action at evaluation, Adam at its default 3e-4, which did better than 1e-3 in the same pilot: 0.25 against
0.16) given the same two-step observation history (``n_obs_steps=2``: the MLP sees both steps concatenated) and
acting one step at a time; with images each step goes through the same kind of image encoder as Diffusion
Policy's (``GaussianBCConfig.cameras``, same width).

Cost on this machine (one thread, the other core busy): Diffusion Policy (state) 3-7 updates/s at batch 64 (2.2 at
batch 256), 2.5 s per 300-step evaluation episode; Gaussian BC (state) about 200-350 updates/s; with images
Diffusion Policy 2.7 and Gaussian BC 4.7 updates/s at batch 64, 3.5 and 2.2 s per episode. The expert takes about
1-2 s per episode (3.5 with images recorded).

Each finished run is appended to ``<out>/runs.jsonl`` (scripts/run_log.py), keyed by observation type, method,
seed, updates, batch, evaluation episodes, the settings and the dataset file's SHA-256 prefix; a rerun skips runs
already there. ``bench.md`` (table) and ``bench.png`` (plot) cover the runs of the requested settings.

    OMP_NUM_THREADS=1 python scripts/bench_pusht.py --steps 2000 --image-steps 500 --episodes 50 --image-episodes 20
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from run_log import file_digest, mean_se, read_runs, run_logged  # noqa: E402

from agents.baselines import GaussianBC, GaussianBCConfig  # noqa: E402
from agents.diffusion_policy import DiffusionPolicy, DiffusionPolicyConfig  # noqa: E402
from diffrl.checkpoint import atomic_open  # noqa: E402
from diffrl.seeding import seed_everything  # noqa: E402
from diffrl.training import TrainConfig, Trainer  # noqa: E402
from envs.pusht import (  # noqa: E402
    MAX_STEPS,
    ImageWindows,
    collect_demos,
    evaluate_expert,
    evaluate_pusht,
    image_dataset,
    initial_coverage,
    read_demos,
    write_demos,
)

ROOT = Path(__file__).resolve().parent.parent
EVAL_SEED = 10_000
METHODS = ("dp", "gbc")
LABELS = {"expert": "scripted expert", "dp": "Diffusion Policy (U-Net)", "gbc": "Gaussian BC (MLP)"}
SHORT = {"expert": "expert", "dp": "Diffusion\nPolicy", "gbc": "Gaussian\nBC"}
N_OBS = 2  # observation history of both methods
PAPER_LR = 1e-4  # Chi et al.'s AdamW learning rate


def dp_config(args: argparse.Namespace, obs: str, steps: int) -> DiffusionPolicyConfig:
    """The paper's settings with the CPU deviations of the module docstring."""
    images = dict(cameras=("image",), encoder_width=args.encoder_width) if obs == "image" else {}
    return DiffusionPolicyConfig(dims=tuple(args.dims), lr=args.lr, total_steps=steps,
                                 warmup_steps=min(500, steps // 10), n_obs_steps=N_OBS, **images)


def gbc_config(args: argparse.Namespace, obs: str, steps: int) -> GaussianBCConfig:
    images = dict(cameras=("image",), encoder_width=args.encoder_width) if obs == "image" else {}
    return GaussianBCConfig(total_steps=steps, n_obs_steps=N_OBS, **images)


def train(agent, sampler, steps: int, batch: int, seed: int) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    Trainer(agent, sampler, TrainConfig(steps=steps, batch_size=batch, seed=seed, progress=False)).fit()
    return time.perf_counter() - start, time.process_time() - cpu


def run_job(job: dict, args: argparse.Namespace) -> dict:
    """One logged run: train the method on the demonstrations of the job's observation type, then evaluate it."""
    torch.set_num_threads(1)
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    obs, method, seed = job["obs"], job["method"], job["seed"]
    if method == "expert":
        return {**job, "train_s": 0.0, **evaluate_expert(job["episodes"], EVAL_SEED, args.max_steps)}
    demos = read_demos(job["path"], images=obs == "image")
    seed_everything(seed)
    config = (dp_config if method == "dp" else gbc_config)(args, obs, job["steps"])
    data = demos.dataset if obs == "state" else image_dataset(demos)
    agent = (DiffusionPolicy if method == "dp" else GaussianBC).from_dataset(data, config)
    if obs == "state":
        sampler = agent.batch_sampler(data)
    else:
        horizon, after = (config.horizon, config.n_action_steps - 1) if method == "dp" else (N_OBS, 0)
        sampler = ImageWindows(data, demos.images, horizon, N_OBS, pad_before=N_OBS - 1, pad_after=after).sample
    train_s, train_cpu_s = train(agent, sampler, job["steps"], job["batch"], seed)
    policy = agent.policy(seed=seed)
    result = evaluate_pusht(policy, obs, job["episodes"], EVAL_SEED, args.max_steps)
    params = sum(p.numel() for p in agent.actor.parameters())
    return {**job, "train_s": train_s, "train_cpu_s": train_cpu_s, "params": params,
            "updates_per_s": job["steps"] / train_s, **result}


KEY = ("obs", "method", "seed", "steps", "batch", "episodes", "settings", "digest")


def _key(run: dict) -> tuple:
    return tuple(run[k] for k in KEY)


def jobs_for(args: argparse.Namespace, path: Path) -> list[dict]:
    """Every run of this invocation as its key; the expert once (on the state environment)."""
    digest = file_digest(path)
    settings = f"dims={','.join(map(str, args.dims))} encoder_width={args.encoder_width}"
    if args.lr != PAPER_LR:
        settings += f" lr={args.lr:g}"
    if args.max_steps != MAX_STEPS:
        settings += f" max_steps={args.max_steps}"
    common = {"digest": digest, "path": str(path)}
    cut = f"max_steps={args.max_steps}" if args.max_steps != MAX_STEPS else ""
    jobs = [{"obs": "state", "method": "expert", "seed": 0, "steps": 0, "batch": 0, "settings": cut,
             "episodes": args.episodes, **common}]
    budgets = {"state": (args.steps, args.batch, args.seeds, args.episodes),
               "image": (args.image_steps, args.image_batch, args.image_seeds, args.image_episodes)}
    for obs in args.obs:
        steps, batch, seeds, episodes = budgets[obs]
        jobs += [{"obs": obs, "method": m, "seed": s, "steps": steps, "batch": batch, "settings": settings,
                  "episodes": episodes, **common} for s in seeds for m in args.methods]
    return jobs


def table(runs: list[dict], stats: dict) -> str:
    """The results table of ``runs`` (one row per observation type and method)."""
    lines = ["PushT, evaluation episodes from env seeds 10000, 10001, ... (the same for every run); success = coverage "
             "above 0.95 at some step; coverage = mean over episodes of the maximum coverage; mean ± s.e. over "
             "training seeds. Demonstrations: the scripted expert on env seeds "
             f"0..{stats['tried'] - 1}: success {stats['success_rate']:.2f}, mean max coverage "
             f"{stats['mean_max_coverage']:.3f}; the {stats['kept']} successful episodes ({stats['transitions']} "
             "steps) are the training data. Not pushing at all scores the initial coverage: "
             + ", ".join(f"{n} episodes {initial_coverage(n, EVAL_SEED):.3f}"
                         for n in sorted({r["episodes"] for r in runs})) + ".", "",
             "| observations | method | seeds | updates x batch | episodes / run | success rate | mean max coverage | "
             "params | train s / run | eval s / episode |", "|---|---|---|---|---|---|---|---|---|---|"]
    for obs in ("state", "image"):
        for method in ("expert", *METHODS):
            group = sorted((r for r in runs if r["obs"] == obs and r["method"] == method), key=lambda r: r["seed"])
            if not group:
                continue
            succ, succ_se = mean_se([r["success_rate"] for r in group])
            cov, cov_se = mean_se([r["mean_coverage"] for r in group])
            seeds = ",".join(str(r["seed"]) for r in group) if method != "expert" else "-"
            budget = f"{group[0]['steps']} x {group[0]['batch']}" if method != "expert" else "-"
            params = f"{group[0]['params'] / 1e6:.2f}M" if "params" in group[0] else "-"
            train_s = np.mean([r["train_s"] for r in group])
            eval_s = np.mean([r["eval_s"] / r["episodes"] for r in group])
            lines.append(f"| {obs} | {LABELS[method]} | {seeds} | {budget} | {group[0]['episodes']} | "
                         f"{succ:.2f} ± {succ_se:.2f} | "
                         f"{cov:.3f} ± {cov_se:.3f} | {params} | {train_s:.0f} | {eval_s:.2f} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    """Bars of success rate and mean max coverage per observation type and method (seeds as dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(obs, m) for obs in ("state", "image") for m in ("expert", *METHODS)
              if any(r["obs"] == obs and r["method"] == m for r in runs)]
    seeds = len({r["seed"] for r in runs if r["method"] != "expert"})
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, field, title in zip(axes, ("success_rate", "mean_coverage"), ("success rate", "mean max coverage"),
                                strict=True):
        for i, (obs, method) in enumerate(groups):
            values = [r[field] for r in runs if r["obs"] == obs and r["method"] == method]
            mean, se = mean_se(values)
            ax.bar(i, mean, yerr=se, color=f"C{('expert', *METHODS).index(method)}", alpha=0.7, capsize=4)
            ax.scatter(np.full(len(values), i), values, color="k", s=12, zorder=3)
        budget = {(r["obs"], r["method"]): f"{r['steps']} updates\n" if r["steps"] else "" for r in runs}
        ax.set_xticks(range(len(groups)), [f"{SHORT[m]}\n({obs})\n{budget[obs, m]}" for obs, m in groups],
                      fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(title)
        ax.set_title(f"PushT: {title} ({seeds} training seeds: mean +- s.e., dots)", fontsize=10)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--obs", nargs="+", default=["state", "image"], choices=["state", "image"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--demos", type=int, default=110, help="expert episodes tried (successful ones kept)")
    parser.add_argument("--steps", type=int, default=2000, help="updates of every learner, state observations")
    parser.add_argument("--batch", type=int, default=64, help="batch size, state observations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image-steps", type=int, default=500, help="updates of every learner, images")
    parser.add_argument("--image-batch", type=int, default=64)
    parser.add_argument("--image-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lr", type=float, default=1e-3, help=f"Diffusion Policy learning rate (paper: {PAPER_LR:g})")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256], help="Diffusion Policy U-Net widths")
    parser.add_argument("--encoder-width", type=int, default=16, help="ResNet-18 width of the image encoder")
    parser.add_argument("--episodes", type=int, default=50, help="evaluation episodes per run")
    parser.add_argument("--image-episodes", type=int, default=20, help="evaluation episodes per run, images")
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS, help="evaluation episode length (300: PushT's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each; one log writer)")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "pusht_data")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "pusht")
    args = parser.parse_args(argv)
    if min(args.demos, args.steps, args.batch, args.image_steps, args.image_batch, args.episodes,
           args.image_episodes, args.encoder_width, args.max_steps, *args.dims) < 1 or args.lr <= 0:
        raise SystemExit("error: --demos, --steps, --batch, --image-steps, --image-batch, --episodes, "
                         "--image-episodes, --encoder-width, --max-steps and --dims must be >= 1, --lr > 0")
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    torch.set_num_threads(1)
    path = args.data_dir / f"pusht-expert-{args.demos}.hdf5"
    if not path.is_file():
        print(f"collecting {args.demos} expert episodes into {path}")
        write_demos(path, collect_demos(args.demos, seed=0, images=True))
    stats = read_demos(path).stats
    print(f"demonstrations: {path} ({stats})")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    kept = read_runs(log)
    done = {_key(r) for r in kept}
    jobs = jobs_for(args, path)
    todo = [job for job in jobs if _key(job) not in done]
    print(f"{len(todo)} runs to do, {len(kept)} logged in {log}")
    runs = run_logged([(run_job, (job, args)) for job in todo], log, args.jobs, kept,
                      on_result=lambda r: print(f"{r['obs']} {r['method']} seed {r['seed']}: success "
                                                f"{r['success_rate']:.2f}, coverage {r['mean_coverage']:.3f} "
                                                f"(train {r['train_s']:.0f} s, eval {r['eval_s']:.0f} s)",
                                                flush=True))
    wanted = {_key(job) for job in jobs}
    current = [r for r in runs if _key(r) in wanted]
    text = table(current, stats)
    with atomic_open(args.out / "bench.md", "w") as f:
        f.write(text)
    plot(current, args.out / "bench.png")
    print(text + f"\ntable: {args.out / 'bench.md'}; plot: {args.out / 'bench.png'}; runs: {log}")


if __name__ == "__main__":
    main()
