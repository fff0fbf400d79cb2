"""Diffusion BC against Gaussian BC at the same training budget, in the same run.

``--task pointnav``: the two-route navigation toy (``toy:pointnav``, env ``diffrl/PointNav-v0``). Reports per agent
the share of episodes reaching the goal along each route, obstacle hits and mean return, and plots the rolled-out
trajectories to ``results/pointnav_routes.png`` (the rollouts go to ``results/pointnav_routes_paths.json``, from
which ``--plot-only`` re-renders the plot).

``--task hopper``: ``hopper-medium`` (D4RL layout HDF5), several seeds; prints the D4RL-normalised score (mean and
standard error over seeds) of both agents after ``--steps`` gradient steps.

    OMP_NUM_THREADS=1 python scripts/bench_bc.py --task pointnav
    OMP_NUM_THREADS=1 python scripts/bench_bc.py --task hopper --steps 10000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from agents import DiffusionBC, DiffusionBCConfig, GaussianBC, GaussianBCConfig
from diffrl.seeding import seed_everything
from diffrl.training import TrainConfig, Trainer
from envs.datasets import load_dataset
from envs.evaluation import evaluate
from envs.toy import POINTNAV_ID, PointNavEnv, episode_route

RESULTS = Path(__file__).resolve().parent.parent / "results"
AGENTS = {"diffusion_bc": (DiffusionBC, DiffusionBCConfig), "gaussian_bc": (GaussianBC, GaussianBCConfig)}
PATHS_FILE = RESULTS / "pointnav_routes_paths.json"  # the plotted rollouts, for --plot-only


def train(name: str, dataset, steps: int, batch_size: int, seed: int):
    agent_cls, config_cls = AGENTS[name]
    seed_everything(seed)
    config = config_cls(total_steps=steps)
    if name == "diffusion_bc":
        config.ema_start = min(config.ema_start, steps // 10)
    agent = agent_cls.from_dataset(dataset, config)
    start = time.perf_counter()
    Trainer(agent, dataset.sample, TrainConfig(steps=steps, batch_size=batch_size, seed=seed, log_every=max(steps, 1),
                                               progress=False)).fit()
    return agent, time.perf_counter() - start


def pointnav_rollouts(policy, episodes: int, seed: int) -> list[dict]:
    """Episodes with positions, route, goal reached and obstacle hits."""
    env = gym.make(POINTNAV_ID)
    out = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        policy.reset()
        positions, hits, total, done, info = [obs], 0, 0.0, False, {}
        while not done:
            obs, reward, terminated, truncated, info = env.step(policy.act(obs))
            positions.append(obs)
            hits += info["hit_obstacle"]
            total += reward
            done = terminated or truncated
        path = np.asarray(positions)
        out.append({"path": path, "route": episode_route(path), "goal": bool(info["reached_goal"]), "hits": hits,
                    "return": total})
    env.close()
    return out


def summarise(rollouts: list[dict]) -> dict:
    n = len(rollouts)
    return {
        "goal_up": sum(r["goal"] and r["route"] == "up" for r in rollouts) / n,
        "goal_down": sum(r["goal"] and r["route"] == "down" for r in rollouts) / n,
        "goal": sum(r["goal"] for r in rollouts) / n,
        "episodes_with_hit": sum(r["hits"] > 0 for r in rollouts) / n,
        "hits_per_episode": sum(r["hits"] for r in rollouts) / n,
        "mean_return": float(np.mean([r["return"] for r in rollouts])),
    }


def plot_routes(paths: dict[str, list[np.ndarray]], dataset, path: Path) -> None:
    """One panel per source (the dataset's episodes, then each agent's rollouts): the trajectories, the obstacle,
    the goal region and the start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    panels = [("dataset episodes", [dataset.observations[s:e].numpy() for s, e in dataset.episode_bounds()])]
    panels += [(f"{name} rollouts", list(runs)) for name, runs in paths.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), sharex=True, sharey=True)
    for ax, (title, trajectories) in zip(axes, panels, strict=True):
        ax.add_patch(plt.Circle((0, 0), PointNavEnv.OBSTACLE_RADIUS, color="0.6"))
        ax.add_patch(plt.Circle(tuple(PointNavEnv.GOAL), PointNavEnv.GOAL_RADIUS, color="tab:green", alpha=0.5))
        for p in trajectories:
            ax.plot(p[:, 0], p[:, 1], lw=0.7, alpha=0.5, color="tab:blue")
        ax.plot(*PointNavEnv.START, marker="o", color="black", markersize=4, linestyle="none")
        ax.set_title(f"{title} ({len(trajectories)})", fontsize=10)
        ax.set(aspect="equal", xlim=(-1, 1), ylim=(-1, 1), xticks=[-1, -0.5, 0, 0.5, 1], yticks=[-1, -0.5, 0, 0.5, 1])
        ax.set_xlabel("x position")
        ax.tick_params(labelsize=9)
    axes[0].set_ylabel("y position")
    legend = [Patch(color="0.6", label="obstacle (a move into it is cancelled)"),
              Patch(color="tab:green", alpha=0.5, label="goal region"),
              Line2D([], [], marker="o", color="black", linestyle="none", label="start"),
              Line2D([], [], color="tab:blue", label="trajectory")]
    fig.legend(handles=legend, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_pointnav(args) -> None:
    dataset = load_dataset("toy:pointnav")
    results, table = {}, {}
    for name in AGENTS:
        agent, seconds = train(name, dataset, args.steps, args.batch_size, args.seed)
        results[name] = pointnav_rollouts(agent.policy(seed=args.seed), args.episodes, seed=10_000)
        table[name] = {**summarise(results[name]), "train_seconds": round(seconds, 1)}
    print(f"PointNav, {args.steps} steps at batch {args.batch_size}, {args.episodes} episodes")
    print(f"{'agent':14s} {'goal up':>8s} {'goal down':>9s} {'goal':>6s} {'hit ep':>7s} {'hits/ep':>8s} {'return':>7s}")
    for name, row in table.items():
        print(f"{name:14s} {row['goal_up']:8.2f} {row['goal_down']:9.2f} {row['goal']:6.2f} "
              f"{row['episodes_with_hit']:7.2f} {row['hits_per_episode']:8.2f} {row['mean_return']:7.2f}")
    paths = {name: [r["path"] for r in rollouts] for name, rollouts in results.items()}
    (RESULTS / "pointnav_routes.json").write_text(json.dumps(table, indent=2))
    PATHS_FILE.write_text(json.dumps({name: [np.round(p, 3).tolist() for p in runs] for name, runs in paths.items()}))
    plot_routes(paths, dataset, RESULTS / "pointnav_routes.png")


def plot_pointnav_only() -> None:
    """Re-render results/pointnav_routes.png from the rollouts saved by the last ``--task pointnav`` run."""
    if not PATHS_FILE.is_file():
        raise SystemExit(f"{PATHS_FILE} does not exist: run --task pointnav once (it saves the rollouts there)")
    saved = json.loads(PATHS_FILE.read_text())
    paths = {name: [np.asarray(p) for p in runs] for name, runs in saved.items()}
    plot_routes(paths, load_dataset("toy:pointnav"), RESULTS / "pointnav_routes.png")


def run_hopper(args) -> None:
    dataset = load_dataset(args.dataset)
    scores: dict[str, list[float]] = {name: [] for name in AGENTS}
    seconds: dict[str, list[float]] = {name: [] for name in AGENTS}
    for seed in args.seeds:
        for name in AGENTS:
            agent, t = train(name, dataset, args.steps, args.batch_size, seed)
            result = evaluate(agent.policy(seed=seed), dataset, episodes=args.episodes, seed=1000 * seed)
            scores[name].append(result.normalized_mean)
            seconds[name].append(t)
            print(f"seed {seed} {name}: normalised score {result.normalized_mean:.1f} (train {t:.0f} s)",
                  flush=True)
    print(f"\n{dataset.name}: {args.steps} gradient steps at batch {args.batch_size}, {len(args.seeds)} seeds, "
          f"{args.episodes} evaluation episodes per seed")
    print(f"{'agent':14s} {'score':>7s} {'stderr':>7s}  per seed")
    table = {}
    for name, values in scores.items():
        v = np.asarray(values)
        stderr = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
        table[name] = {"mean": float(v.mean()), "stderr": stderr, "seeds": values,
                       "train_seconds": float(np.mean(seconds[name]))}
        print(f"{name:14s} {v.mean():7.1f} {stderr:7.1f}  {', '.join(f'{x:.1f}' for x in values)}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_bc_hopper.json").write_text(json.dumps({"steps": args.steps, "batch_size": args.batch_size,
                                                              "episodes": args.episodes, **table}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("pointnav", "hopper"), default="pointnav")
    parser.add_argument("--steps", type=int, default=None, help="gradient steps (default 10000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--episodes", type=int, default=None, help="evaluation episodes (pointnav 100, hopper 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dataset", default="hopper-medium")
    parser.add_argument("--plot-only", action="store_true",
                        help="--task pointnav: re-render the plot from the saved rollouts, without training")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.plot_only:
        plot_pointnav_only()
    elif args.task == "pointnav":
        args.steps, args.episodes = args.steps or 10_000, args.episodes or 100
        run_pointnav(args)
    else:
        args.steps, args.episodes = args.steps or 10_000, args.episodes or 10
        run_hopper(args)


if __name__ == "__main__":
    main()
