"""Maze2D as D4RL made it, on gymnasium-robotics PointMaze (``PointMaze_UMaze-v3``, ``_Medium-v3``, ``_Large-v3``).

Collection follows D4RL's ``scripts/generation/generate_maze2d_datasets.py`` and ``d4rl/pointmaze``: one continuing
stream; a waypoint controller (PD control, gains 10 and -1, towards the next cell centre of a shortest grid path to the
goal cell, intermediate centres moved by U(0, 0.2) per axis towards a smaller row and column) drives the ball; when it
has solved its goal (within 0.1 of the goal cell's centre) a new goal is drawn uniformly among the free cells with
U(-0.1, 0.1) noise; Gaussian action noise of std 0.5 (D4RL's ``--noisy``) is added before clipping to [-1, 1]. A goal
not solved within the maze's ``max_episode_steps`` is a timeout; only then is the environment reset. Rewards are D4RL's
sparse relabelling (``relabel_maze2d_rewards.py``): 1 where the observed position lies within 0.5 of the maze's fixed
evaluation goal, else 0 (row t looks at observation t, as the relabelling does; the environment's own reward looks at
the position after the step, as D4RL's env does); terminals are all False.

Differences from D4RL, by necessity or choice: coordinates are gymnasium-robotics' (cell centres at
``(col + 0.5 - W / 2, H / 2 - row - 0.5)``, D4RL used ``(row, col)``); shortest paths come from breadth-first search
(D4RL ran Q-iteration on the grid; both give shortest paths); D4RL's loop kept the pre-step observation after a goal
switch, here every row is a true transition; at a timeout D4RL switched the goal without a reset.

Evaluation (``diffrl/Maze2D-<UMaze|Medium|Large>-v0``) is D4RL's maze2d-v1 task: start in a uniformly drawn free cell
(position noise U(-0.1, 0.1), velocity noise N(0, 0.1^2)), the goal fixed at the maze's ``G`` cell centre (umaze row 1
col 1, medium row 6 col 6, large row 7 col 9), reward 1 per step within 0.5 of it, no termination, episodes of
300 / 600 / 800 steps, scores normalised with D4RL's maze2d-v1 reference returns (``d4rl/infos.py``).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np

from envs import d4rl
from envs.datasets import OfflineDataset

Cell = tuple[int, int]
FORMATS = ("hdf5", "minari")
GOAL_RADIUS = 0.5  # D4RL's sparse reward radius
ACTION_NOISE = 0.5  # std of D4RL's --noisy Gaussian action noise


@dataclass(frozen=True)
class MazeSpec:
    """One Maze2D task: its PointMaze map, D4RL's evaluation goal cell, episode length and reference returns."""

    name: str
    point_maze_id: str
    env_id: str
    goal_cell: Cell
    max_episode_steps: int
    ref_min_score: float
    ref_max_score: float


#: D4RL maze2d-v1 (``d4rl/pointmaze/__init__.py`` and ``d4rl/infos.py``): goal cell of the ``G`` in each map,
#: max_episode_steps and REF_MIN_SCORE / REF_MAX_SCORE.
MAZES: dict[str, MazeSpec] = {s.name: s for s in (
    MazeSpec("maze2d-umaze", "PointMaze_UMaze-v3", "diffrl/Maze2D-UMaze-v0", (1, 1), 300, 23.85, 161.86),
    MazeSpec("maze2d-medium", "PointMaze_Medium-v3", "diffrl/Maze2D-Medium-v0", (6, 6), 600, 13.13, 277.39),
    MazeSpec("maze2d-large", "PointMaze_Large-v3", "diffrl/Maze2D-Large-v0", (7, 9), 800, 6.7, 273.99),
)}


def maze_spec(name: str) -> MazeSpec:
    """The task for a maze name (``maze2d-umaze``, with or without ``-v1``/``.hdf5``) or its env id."""
    key = Path(str(name)).name.removesuffix(".hdf5").lower()
    key = key.rsplit("-v", 1)[0] if key.rsplit("-v", 1)[-1].isdigit() else key
    for spec in MAZES.values():
        if key == spec.name or name == spec.env_id:
            return spec
    raise ValueError(f"unknown maze {name!r}; choose from {', '.join(MAZES)}")


def is_maze(name: str) -> bool:
    try:
        maze_spec(name)
    except ValueError:
        return False
    return True


def ref_scores(name_or_env_id: str | None) -> tuple[float, float] | None:
    """D4RL's maze2d-v1 ``(ref_min, ref_max)`` for a maze name or env id, or None."""
    if not name_or_env_id or not is_maze(name_or_env_id):
        return None
    spec = maze_spec(name_or_env_id)
    return spec.ref_min_score, spec.ref_max_score


def _robotics() -> None:
    """Register gymnasium-robotics' environments (PointMaze), or say how to install it."""
    try:
        import gymnasium_robotics
    except ImportError as e:
        raise ImportError("Maze2D needs gymnasium-robotics: pip install 'diffrl[maze]'") from e
    gym.register_envs(gymnasium_robotics)


def maze_map(name: str) -> list[list[int]]:
    """The PointMaze map of a maze (rows of 1 = wall, 0 = free), from its gymnasium-robotics registration."""
    _robotics()
    return [[int(c) for c in row] for row in gym.spec(maze_spec(name).point_maze_id).kwargs["maze_map"]]


class MazeGrid:
    """A maze map with gymnasium-robotics' cell <-> position convention (cells of size 1, map centred on 0)."""

    def __init__(self, grid: Sequence[Sequence[int]]) -> None:
        self.grid = np.asarray(grid, dtype=np.int64)
        if self.grid.ndim != 2 or not np.isin(self.grid, (0, 1)).all():
            raise ValueError("a maze grid is a rectangular list of rows of 0 (free) and 1 (wall)")
        self.rows, self.cols = self.grid.shape
        self.free_cells: list[Cell] = [(int(r), int(c)) for r, c in zip(*np.nonzero(self.grid == 0), strict=True)]

    def is_free(self, cell: Cell) -> bool:
        r, c = cell
        return 0 <= r < self.rows and 0 <= c < self.cols and self.grid[r, c] == 0

    def cell_xy(self, cell: Cell) -> np.ndarray:
        """Centre of a cell."""
        return np.array([cell[1] + 0.5 - self.cols / 2, self.rows / 2 - cell[0] - 0.5])

    def xy_cell(self, xy: np.ndarray) -> Cell:
        """The cell holding a position."""
        return int(np.floor(self.rows / 2 - xy[1])), int(np.floor(xy[0] + self.cols / 2))

    def shortest_path(self, start: Cell, goal: Cell) -> list[Cell]:
        """Cells of a shortest 4-connected path from ``start`` to ``goal``, both included (breadth-first search)."""
        for label, cell in (("start", start), ("goal", goal)):
            if not self.is_free(cell):
                raise ValueError(f"{label} cell {cell} is a wall or outside the {self.rows}x{self.cols} maze")
        parent: dict[Cell, Cell | None] = {start: None}
        queue = deque([start])
        while queue:
            cell = queue.popleft()
            if cell == goal:
                path = [cell]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1]
            r, c = cell
            for nxt in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if nxt not in parent and self.is_free(nxt):
                    parent[nxt] = cell
                    queue.append(nxt)
        raise ValueError(f"goal cell {goal} cannot be reached from {start}")


class WaypointController:
    """D4RL's waypoint controller: PD control towards the next waypoint of a shortest grid path to the goal cell.

    ``action = p_gain * (waypoint - position) + d_gain * velocity``, clipped to [-1, 1]. A waypoint is passed, and the
    goal solved, within ``solve_thresh`` of it while the position moved less than ``vel_thresh`` in the last step (D4RL
    measures that "speed" as the step's displacement). Intermediate waypoints are cell centres moved by U(0, ``jitter``)
    per axis towards the smaller row and column (D4RL's ``-U(0, 0.2)`` in its (row, col) frame), the last one the goal
    cell's centre; the path is replanned whenever the goal changes cell.
    """

    def __init__(self, grid: MazeGrid, p_gain: float = 10.0, d_gain: float = -1.0, solve_thresh: float = 0.1,
                 vel_thresh: float = 0.1, jitter: float = 0.2, rng: np.random.Generator | None = None) -> None:
        self.grid, self.p_gain, self.d_gain = grid, p_gain, d_gain
        self.solve_thresh, self.vel_thresh, self.jitter = solve_thresh, vel_thresh, jitter
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.reset()

    def reset(self) -> None:
        """Forget the goal and its path (the next call plans from the current position)."""
        self.goal_cell: Cell | None = None
        self.waypoints: list[np.ndarray] = []
        self._index = 0
        self._previous = np.zeros(2)

    def _plan(self, position: np.ndarray, goal_cell: Cell) -> None:
        start = self.grid.xy_cell(position)
        path = self.grid.shortest_path(start, goal_cell)[1:] or [goal_cell]
        shift = np.array([-1.0, 1.0]) * self.jitter  # D4RL's -U(0, jitter) on (row, col) is (-x, +y) here
        self.waypoints = [self.grid.cell_xy(c) + (self.rng.uniform(size=2) * shift if i < len(path) - 1 else 0)
                          for i, c in enumerate(path)]
        self.goal_cell, self._index, self._previous = goal_cell, 0, self.grid.cell_xy(start)

    def act(self, position: np.ndarray, velocity: np.ndarray, goal: np.ndarray) -> tuple[np.ndarray, bool]:
        """The action at ``position`` / ``velocity`` towards ``goal`` (a position), and whether the goal is solved."""
        goal_cell = self.grid.xy_cell(goal)
        if goal_cell != self.goal_cell:
            self._plan(position, goal_cell)
        target = self.grid.cell_xy(goal_cell)
        slow = np.linalg.norm(self._previous - position) < self.vel_thresh
        solved = bool(np.linalg.norm(position - target) < self.solve_thresh and slow)
        waypoint = target if solved else self.waypoints[self._index]
        action = self.p_gain * (waypoint - position) + self.d_gain * velocity
        if not solved and slow and np.linalg.norm(position - waypoint) < self.solve_thresh:
            self._index = min(self._index + 1, len(self.waypoints) - 1)
        self._previous = np.array(position, dtype=np.float64)
        return np.clip(action, -1.0, 1.0), solved


class ControllerPolicy:
    """Waypoint controllers as a batched policy (``envs.evaluation`` protocol) towards a fixed goal position, with
    Gaussian action noise of std ``noise``; one controller per row, re-made by ``reset()``."""

    def __init__(self, name: str, goal: np.ndarray | None = None, noise: float = 0.0, seed: int = 0) -> None:
        self.grid = MazeGrid(maze_map(name))
        self.goal = eval_goal_state(name)[:2] if goal is None else np.asarray(goal, dtype=np.float64)
        self.noise, self.rng = noise, np.random.default_rng(seed)
        self.controllers: list[WaypointController] = []

    def reset(self) -> None:
        self.controllers = []

    def act(self, obs: np.ndarray) -> np.ndarray:
        while len(self.controllers) < len(obs):
            self.controllers.append(WaypointController(self.grid, rng=self.rng))
        actions = np.stack([c.act(o[:2], o[2:], self.goal)[0] for c, o in zip(self.controllers, obs, strict=False)])
        return np.clip(actions + self.rng.normal(0.0, self.noise, actions.shape), -1.0, 1.0)


class PlanFollower:
    """Open-loop execution of a state plan, as Diffuser's official ``scripts/plan_maze2d.py`` runs Maze2D: one plan per
    episode from the first observation, then ``action = (p_{t+1} - p) + (v_{t+1} - v)`` towards the plan's next state
    (after its end, the last planned position at zero velocity), clipped to [-1, 1]. ``planner(obs (B, 4))`` returns
    the planned raw states (B, H, 4); ``reset()`` forgets the plans (``envs.evaluation`` protocol)."""

    def __init__(self, planner: Callable[[np.ndarray], np.ndarray]) -> None:
        self.planner = planner
        self.reset()

    def reset(self) -> None:
        self.plans: np.ndarray | None = None
        self.t = 0

    def act(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64)
        if self.plans is None:
            self.plans = np.asarray(self.planner(obs), dtype=np.float64)
            if self.plans.ndim != 3 or self.plans.shape[0] != len(obs) or self.plans.shape[2] != obs.shape[1]:
                raise ValueError(f"the planner returned states of shape {self.plans.shape}; expected "
                                 f"({len(obs)}, horizon, {obs.shape[1]})")
        self.t += 1
        target = self.plans[:, min(self.t, self.plans.shape[1] - 1)].copy()
        if self.t >= self.plans.shape[1]:
            target[:, 2:] = 0.0
        return np.clip(target[:, :2] - obs[:, :2] + target[:, 2:] - obs[:, 2:], -1.0, 1.0)


class Maze2DEnv(gym.Env):
    """D4RL's maze2d-v1 task on a gymnasium-robotics PointMaze: observation ``[x, y, vx, vy]``, sparse reward 1 within
    0.5 of the goal (by default the maze's fixed evaluation goal; ``set_goal`` moves it), no termination."""

    metadata = {"render_modes": []}

    def __init__(self, maze: str = "maze2d-umaze") -> None:
        self.spec_maze = maze_spec(maze)
        _robotics()
        self._point_maze = gym.make(self.spec_maze.point_maze_id, continuing_task=True, reset_target=False).unwrapped
        self.grid = MazeGrid(maze_map(maze))
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float64)
        self.action_space = self._point_maze.action_space
        self.eval_goal = self.grid.cell_xy(self.spec_maze.goal_cell)
        self.goal = self.eval_goal.copy()

    def set_goal(self, goal: np.ndarray) -> None:
        self.goal = np.asarray(goal, dtype=np.float64).copy()
        self._point_maze.goal = self.goal.copy()
        self._point_maze.update_target_site_pos()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        """Start in a uniformly drawn free cell (D4RL's position and velocity noise); goal ``options["goal"]`` or the
        evaluation goal."""
        super().reset(seed=seed)
        self._point_maze.reset(seed=None if seed is None else int(self.np_random.integers(2**31)))
        cell = self.grid.free_cells[int(self.np_random.integers(len(self.grid.free_cells)))]
        qpos = self.grid.cell_xy(cell) + self.np_random.uniform(-0.1, 0.1, size=2)
        self._point_maze.point_env.set_state(qpos, self.np_random.normal(0.0, 0.1, size=2))
        self.set_goal(self.eval_goal if options is None or options.get("goal") is None else options["goal"])
        return self._observation(), {"goal": self.goal.copy()}

    def _observation(self) -> np.ndarray:
        data = self._point_maze.point_env.data
        return np.concatenate([data.qpos, data.qvel]).astype(np.float64)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self._point_maze.point_env.step(np.asarray(action, dtype=np.float64))
        obs = self._observation()
        reached = bool(np.linalg.norm(obs[:2] - self.goal) <= GOAL_RADIUS)
        return obs, float(reached), False, False, {"goal": self.goal.copy(), "success": reached}

    def close(self) -> None:
        self._point_maze.close()


for _spec in MAZES.values():
    if _spec.env_id not in gym.registry:
        gym.register(_spec.env_id, entry_point="envs.maze:Maze2DEnv", kwargs={"maze": _spec.name},
                     max_episode_steps=_spec.max_episode_steps)


def eval_goal_state(name: str) -> np.ndarray:
    """The evaluation goal as a full state ``[x, y, 0, 0]`` (what Diffuser's maze2d planning inpaints at its last
    step), in gymnasium-robotics coordinates."""
    return np.concatenate([MazeGrid(maze_map(name)).cell_xy(maze_spec(name).goal_cell), [0.0, 0.0]])


@dataclass
class MazeStats:
    """What a collection run produced."""

    transitions: int
    goals_reached: int
    timeouts: int
    reward_steps: int
    seconds: float


def rollout_maze(name: str, n_transitions: int, seed: int = 0, noise: float = ACTION_NOISE,
                 progress: bool = False) -> tuple[OfflineDataset, np.ndarray, MazeStats]:
    """``n_transitions`` steps of the waypoint controller in the continuing task: the dataset (D4RL's sparse rewards
    towards the evaluation goal), the controller's goal at each step (N, 2) and the run's statistics."""
    spec = maze_spec(name)
    if n_transitions < 1:
        raise ValueError(f"n_transitions must be >= 1, got {n_transitions}")
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"action noise must be a finite std >= 0, got {noise}")
    from tqdm.auto import tqdm

    start = time.perf_counter()
    env = Maze2DEnv(spec.name)
    rng = np.random.default_rng(seed)
    controller = WaypointController(env.grid, rng=rng)
    cells = env.grid.free_cells

    def new_goal() -> np.ndarray:  # D4RL's set_target: a free cell with U(-0.1, 0.1) noise
        return env.grid.cell_xy(cells[int(rng.integers(len(cells)))]) + rng.uniform(-0.1, 0.1, size=2)

    observations, next_observations = np.empty((n_transitions, 4)), np.empty((n_transitions, 4))
    actions, goals = np.empty((n_transitions, 2)), np.empty((n_transitions, 2))
    timeouts = np.zeros(n_transitions, dtype=bool)
    obs, _ = env.reset(seed=seed, options={"goal": new_goal()})
    since_goal = goals_reached = 0
    for t in tqdm(range(n_transitions), disable=not progress, desc=spec.name, mininterval=1.0):
        action, solved = controller.act(obs[:2], obs[2:], env.goal)
        if noise:
            action = action + rng.normal(0.0, noise, size=2)
        action = np.clip(action, -1.0, 1.0)
        since_goal += 1
        nxt = env.step(action)[0]
        observations[t], next_observations[t], actions[t], goals[t] = obs, nxt, action, env.goal
        obs = nxt
        if solved:
            goals_reached += 1
            env.set_goal(new_goal())
            since_goal = 0
        elif since_goal >= spec.max_episode_steps:
            timeouts[t] = True
            obs, _ = env.reset(seed=int(rng.integers(2**31)), options={"goal": new_goal()})
            controller.reset()
            since_goal = 0
    env.close()
    rewards = (np.linalg.norm(observations[:, :2] - env.eval_goal, axis=1) <= GOAL_RADIUS).astype(np.float32)
    data = OfflineDataset(observations, actions, rewards, next_observations, np.zeros(n_transitions, bool), timeouts,
                          name=spec.name, env_id=spec.env_id, ref_min_score=spec.ref_min_score,
                          ref_max_score=spec.ref_max_score)
    stats = MazeStats(n_transitions, goals_reached, int(timeouts.sum()), int(rewards.sum()),
                      time.perf_counter() - start)
    return data, goals.astype(np.float32), stats


def write_maze_hdf5(path: str | os.PathLike, data: OfflineDataset, goals: np.ndarray, **attrs: Any) -> Path:
    """D4RL-layout file with ``infos/goal`` and the evaluation goal as attribute ``eval_goal``, written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        d4rl.write_d4rl_hdf5(tmp, data, eval_goal=eval_goal_state(data.name)[:2], **attrs)
        with h5py.File(tmp, "a") as f:
            f.create_dataset("infos/goal", data=goals)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def collect_maze(name: str, n_transitions: int = 1_000_000, seed: int = 0, noise: float = ACTION_NOISE,
                 out_dir: str | os.PathLike = "datasets", formats: Sequence[str] = FORMATS,
                 progress: bool = False) -> dict[str, Any]:
    """Collect a Maze2D dataset and write ``<out_dir>/<name>.hdf5`` and/or the Minari dataset
    ``diffrl/maze2d/<maze>-v0`` (replaced if it exists; it has no ``infos/goal``). Returns the paths and statistics."""
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    data, goals, stats = rollout_maze(name, n_transitions, seed, noise, progress)
    behaviour = f"waypoint controller, action noise std {noise}"
    written: dict[str, Any] = {"stats": vars(stats)}
    if "hdf5" in formats:
        written["hdf5"] = str(write_maze_hdf5(Path(out_dir) / f"{data.name}.hdf5", data, goals, behaviour=behaviour,
                                              seed=seed, action_noise=noise))
    if "minari" in formats:
        from envs.minari_io import write_minari

        dataset_id = f"diffrl/maze2d/{data.name.removeprefix('maze2d-')}-v0"
        write_minari(data, dataset_id, replace=True, algorithm_name=behaviour, author="diffrl",
                     description=f"{data.name} (D4RL maze2d-v1 protocol) collected with envs.maze")
        written["minari"] = dataset_id
    return written
