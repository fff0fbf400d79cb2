"""Collect a Maze2D dataset (envs.maze, D4RL's protocol) and report it: dataset statistics, the waypoint
controller's D4RL-normalised score on the evaluation task with and without the collection noise, and a plot of the
first positions over the maze.

Example: python scripts/report_maze_data.py maze2d-umaze --transitions 1000000 --out /work/maze_data
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from envs import evaluate, load_dataset  # noqa: E402
from envs.maze import ACTION_NOISE, MAZES, ControllerPolicy, MazeGrid, collect_maze, maze_map  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results" / "maze2d"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plot(name: str, observations: np.ndarray, path: Path, steps: int) -> None:
    grid = MazeGrid(maze_map(name))
    fig, ax = plt.subplots(figsize=(6, 6 * grid.rows / grid.cols + 0.4))
    for r in range(grid.rows):
        for c in range(grid.cols):
            if not grid.is_free((r, c)):
                x, y = grid.cell_xy((r, c))
                ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, color="0.3"))
    xy = observations[:steps, :2]
    ax.plot(xy[:, 0], xy[:, 1], lw=0.3, alpha=0.6, label=f"first {len(xy):,} positions")
    goal = grid.cell_xy(MAZES[name].goal_cell)
    ax.add_patch(plt.Circle(tuple(goal), 0.5, color="tab:green", alpha=0.35, label="evaluation goal (r = 0.5)"))
    ax.set(xlim=(-grid.cols / 2, grid.cols / 2), ylim=(-grid.rows / 2, grid.rows / 2), aspect="equal",
           xlabel="x", ylabel="y", title=f"{name}: waypoint controller, noise std {ACTION_NOISE}")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("maze", choices=sorted(MAZES))
    parser.add_argument("--transitions", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="datasets", help="folder for the HDF5 file")
    parser.add_argument("--formats", nargs="+", default=["hdf5", "minari"])
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--plot-steps", type=int, default=20_000)
    args = parser.parse_args()
    written = collect_maze(args.maze, args.transitions, seed=args.seed, out_dir=args.out, formats=args.formats,
                           progress=True)
    stats = written["stats"]
    spec = MAZES[args.maze]
    lines = [f"# {args.maze}: D4RL maze2d-v1 protocol on gymnasium-robotics {spec.point_maze_id}", "",
             f"collection: seed {args.seed}, action noise std {ACTION_NOISE}, one CPU thread", "",
             "| transitions | goals reached | steps per goal | timeouts | steps within 0.5 of the eval goal | "
             "collection time (s) |", "|---|---|---|---|---|---|",
             f"| {stats['transitions']:,} | {stats['goals_reached']:,} | "
             f"{stats['transitions'] / max(stats['goals_reached'], 1):.1f} | {stats['timeouts']} | "
             f"{stats['reward_steps']:,} ({100 * stats['reward_steps'] / stats['transitions']:.1f}%) | "
             f"{stats['seconds']:.0f} |", "",
             f"Waypoint controller on the evaluation task ({args.eval_episodes} episodes of {spec.max_episode_steps} "
             f"steps, seeds 0-{args.eval_episodes - 1}; D4RL reference returns {spec.ref_min_score} / "
             f"{spec.ref_max_score}):", "",
             "| action noise std | return | normalised score |", "|---|---|---|"]
    scores = {}
    for noise in (0.0, ACTION_NOISE):
        result = evaluate(ControllerPolicy(args.maze, noise=noise, seed=args.seed), args.maze,
                          episodes=args.eval_episodes, seed=0)
        scores[noise] = result.to_dict()
        lines.append(f"| {noise} | {result.mean:.1f} ± {result.stderr:.1f} | "
                     f"{result.normalized_mean:.1f} ± {result.normalized_stderr:.1f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    _atomic_write(RESULTS / f"{args.maze}.txt", "\n".join(lines) + "\n")
    _atomic_write(RESULTS / f"{args.maze}.json", json.dumps({"written": written, "controller": scores}, indent=2))
    if "hdf5" in written:
        _plot(args.maze, load_dataset(written["hdf5"]).observations.numpy(), RESULTS / f"{args.maze}.png",
              args.plot_steps)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
