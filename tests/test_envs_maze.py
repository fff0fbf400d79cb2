"""Maze2D (envs.maze): shortest grid paths, the waypoint controller, collection in D4RL's layout, evaluation."""

import dataclasses
import importlib.util
import json

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch

from diffrl.cli import main
from envs import evaluate, load_dataset, maze
from envs.maze import MAZES, Maze2DEnv, MazeGrid, WaypointController

needs_robotics = pytest.mark.skipif(importlib.util.find_spec("gymnasium_robotics") is None,
                                    reason="gymnasium-robotics is not installed (pip install 'diffrl[maze]')")

# a detour: from (3, 1) to (3, 3) the only way is up, along the top row and down the right column
GRID = [[1, 1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0, 1],
        [1, 0, 1, 1, 0, 1],
        [1, 0, 1, 0, 0, 1],
        [1, 1, 1, 1, 1, 1]]


def test_shortest_path_on_a_hand_made_grid():
    grid = MazeGrid(GRID)
    path = grid.shortest_path((3, 1), (3, 3))
    assert path == [(3, 1), (2, 1), (1, 1), (1, 2), (1, 3), (1, 4), (2, 4), (3, 4), (3, 3)]
    assert grid.shortest_path((1, 2), (1, 2)) == [(1, 2)]
    # two shortest routes around a block: either has the Manhattan length 4 + 1 cells
    open_grid = MazeGrid([[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 1, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]])
    route = open_grid.shortest_path((1, 1), (3, 3))
    steps = [abs(a[0] - b[0]) + abs(a[1] - b[1]) for a, b in zip(route[:-1], route[1:], strict=True)]
    assert len(route) == 5 and steps == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="wall"):
        grid.shortest_path((0, 0), (1, 1))
    with pytest.raises(ValueError, match="cannot be reached"):
        MazeGrid([[0, 1, 0]]).shortest_path((0, 0), (0, 2))
    with pytest.raises(ValueError, match="rows of 0"):
        MazeGrid([[0, 2]])


def test_cells_and_positions_round_trip():
    grid = MazeGrid(GRID)
    for cell in grid.free_cells:
        xy = grid.cell_xy(cell)
        assert grid.xy_cell(xy) == cell and grid.xy_cell(xy + 0.49) == cell and grid.xy_cell(xy - 0.49) == cell
    np.testing.assert_allclose(grid.cell_xy((0, 0)), [-2.5, 2.0])  # 6 columns, 5 rows, centred on 0


def test_waypoints_follow_the_path_with_d4rls_jitter():
    grid = MazeGrid(GRID)
    controller = WaypointController(grid, rng=np.random.default_rng(0))
    action, solved = controller.act(grid.cell_xy((3, 1)), np.zeros(2), grid.cell_xy((3, 3)) + 0.05)
    path = grid.shortest_path((3, 1), (3, 3))[1:]
    assert controller.goal_cell == (3, 3) and len(controller.waypoints) == len(path) and not solved
    centres = np.stack([grid.cell_xy(c) for c in path])
    offset = np.stack(controller.waypoints) - centres  # D4RL: -U(0, 0.2) on (row, col), i.e. -x and +y
    assert (offset[:-1, 0] <= 0).all() and (offset[:-1, 0] >= -0.2).all()
    assert (offset[:-1, 1] >= 0).all() and (offset[:-1, 1] <= 0.2).all() and np.abs(offset[:-1]).max() > 0.01
    np.testing.assert_array_equal(offset[-1], 0.0)  # the goal cell's centre itself
    # PD towards the first waypoint (straight up from the start), clipped to [-1, 1]
    np.testing.assert_allclose(action, np.clip(10.0 * (controller.waypoints[0] - grid.cell_xy((3, 1))), -1, 1))


@needs_robotics
def test_mazes_match_point_maze_and_d4rl():
    from gymnasium_robotics.envs.maze.maze_v4 import Maze

    for spec in MAZES.values():
        assert gym.spec(spec.point_maze_id).max_episode_steps == spec.max_episode_steps
        assert gym.spec(spec.env_id).max_episode_steps == spec.max_episode_steps
        grid = MazeGrid(maze.maze_map(spec.name))
        assert grid.is_free(spec.goal_cell)
        robotics = Maze(maze.maze_map(spec.name), 1.0, 0.4)
        for cell in grid.free_cells:
            np.testing.assert_allclose(grid.cell_xy(cell), robotics.cell_rowcol_to_xy(np.array(cell)))
    assert maze.ref_scores("maze2d-medium-v1") == (13.13, 277.39)
    assert maze.ref_scores("diffrl/Maze2D-Large-v0") == (6.7, 273.99)
    np.testing.assert_allclose(maze.eval_goal_state("maze2d-umaze"), [-1.0, 1.0, 0.0, 0.0])


def _drive(env: Maze2DEnv, seed: int, steps: int) -> tuple[int | None, tuple[int, int]]:
    """Steps the noiseless controller needs to solve the evaluation goal from a seeded start (None: never)."""
    obs, _ = env.reset(seed=seed)
    start = env.grid.xy_cell(obs[:2])
    controller = WaypointController(env.grid, rng=np.random.default_rng(seed))
    for t in range(steps):
        action, solved = controller.act(obs[:2], obs[2:], env.goal)
        if solved:
            return t, start
        obs = env.step(action)[0]
    return None, start


@needs_robotics
def test_controller_reaches_the_umaze_goal_from_several_starts():
    env = Maze2DEnv("maze2d-umaze")
    results = [_drive(env, seed, MAZES["maze2d-umaze"].max_episode_steps) for seed in range(8)]
    env.close()
    starts = {start for _, start in results}
    assert len(starts) >= 4 and (3, 1) in starts  # (3, 1): the far end of the U, 6 cells from the goal
    assert all(t is not None for t, _ in results), results


@needs_robotics
def test_goal_switches_on_arrival():
    data, goals, stats = maze.rollout_maze("maze2d-umaze", 3000, seed=3)
    grid = MazeGrid(maze.maze_map("maze2d-umaze"))
    switches = np.flatnonzero(np.any(goals[1:] != goals[:-1], axis=1))
    timeouts = data.timeouts.numpy()
    assert stats.goals_reached == len(switches) - int(timeouts[switches].sum()) > 10
    obs = data.observations.numpy()
    for t in switches[~timeouts[switches]]:  # solved: within 0.1 of the goal cell's centre
        assert np.linalg.norm(obs[t, :2] - grid.cell_xy(grid.xy_cell(goals[t]))) < 0.1
    # each goal is a free cell's centre with U(-0.1, 0.1) noise
    centres = np.stack([grid.cell_xy(grid.xy_cell(g)) for g in goals])
    assert np.abs(goals - centres).max() <= 0.1 and all(grid.is_free(grid.xy_cell(g)) for g in goals)


@needs_robotics
def test_hdf5_and_minari_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    spec = MAZES["maze2d-umaze"]
    monkeypatch.setitem(MAZES, spec.name, dataclasses.replace(spec, max_episode_steps=40))  # force timeouts
    out = maze.collect_maze("maze2d-umaze", 600, seed=1, out_dir=tmp_path)
    assert out["stats"]["transitions"] == 600 and out["stats"]["timeouts"] > 0
    with h5py.File(out["hdf5"]) as f:
        assert set(f) == {"observations", "actions", "rewards", "next_observations", "terminals", "timeouts", "infos"}
        assert f["infos/goal"].shape == (600, 2) and f["infos/goal"].dtype == np.float32
        for key in ("observations", "actions", "rewards", "next_observations"):
            assert f[key].dtype == np.float32
        assert f["terminals"].dtype == f["timeouts"].dtype == np.bool_
        assert f.attrs["env_id"] == "diffrl/Maze2D-UMaze-v0"
        assert (f.attrs["ref_min_score"], f.attrs["ref_max_score"]) == (23.85, 161.86)
        np.testing.assert_allclose(f.attrs["eval_goal"], [-1.0, 1.0])
        timeouts, terminals = f["timeouts"][()], f["terminals"][()]
    assert not terminals.any() and timeouts[-1] and timeouts.sum() == out["stats"]["timeouts"] + 1
    data = load_dataset(out["hdf5"])
    assert (data.obs_dim, data.act_dim, data.env_id, data.name) == (4, 2, "diffrl/Maze2D-UMaze-v0", "maze2d-umaze")
    assert data.n_episodes == timeouts.sum()
    obs, nxt = data.observations.numpy(), data.next_observations.numpy()
    inner = ~timeouts[:-1]
    np.testing.assert_array_equal(nxt[:-1][inner], obs[1:][inner])  # true transitions inside episodes
    assert np.abs(nxt[:-1][~inner] - obs[1:][~inner]).max() > 0.1  # a reset after each timeout
    np.testing.assert_array_equal(data.rewards.numpy(), np.linalg.norm(obs[:, :2] - [-1.0, 1.0], axis=1) <= 0.5)
    assert float(data.actions.abs().max()) <= 1.0
    same = load_dataset(out["minari"])
    for key in ("observations", "actions", "rewards", "next_observations", "terminals"):
        assert torch.equal(getattr(data, key), getattr(same, key)), key
    assert (same.ref_min_score, same.ref_max_score) == (23.85, 161.86)


@needs_robotics
def test_evaluation_on_the_maze_is_d4rl_normalised():
    result = evaluate(maze.ControllerPolicy("maze2d-umaze"), "maze2d-umaze", episodes=2, seed=0)
    assert result.lengths.tolist() == [300, 300] and result.returns.min() > 100
    np.testing.assert_allclose(result.normalized, 100 * (result.returns - 23.85) / (161.86 - 23.85))
    env = Maze2DEnv("maze2d-umaze")
    env.reset(seed=0)
    env._point_maze.point_env.set_state(np.array([-1.0, 1.45]), np.zeros(2))
    assert env.step(np.zeros(2))[1] == 1.0  # within 0.5 of the goal
    env._point_maze.point_env.set_state(np.array([-1.0, 0.0]), np.zeros(2))
    assert env.step(np.zeros(2))[1] == 0.0
    env.close()


@pytest.mark.parametrize("args, message", [
    (["collect", "maze2d-umaze", "--level", "expert"], "--level"),
    (["collect", "--env", "maze2d-umaze", "--transitions", "0"], "n_transitions must be >= 1"),
    (["collect", "maze2d-umaze", "--noise", "-1"], "action noise"),
    (["collect", "maze2d-umaze", "--formats", "csv"], "unknown format"),
    (["collect", "Hopper-v5", "--noise", "0.1"], "--noise applies to maze2d"),
    (["collect"], "needs one environment"),
])
def test_bad_collect_arguments_give_one_line(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as err:
        main([*args, "--out", str(tmp_path)])
    assert err.value.code == 2
    line = capsys.readouterr().err.strip()
    assert message in line and "\n" not in line
    with pytest.raises(ValueError, match="unknown maze"):
        maze.maze_spec("maze2d-tiny")


@needs_robotics
def test_collect_command_writes_a_maze_dataset(tmp_path, capsys):
    main(["collect", "--env", "maze2d-umaze", "--transitions", "200", "--noise", "0", "--formats", "hdf5",
          "--out", str(tmp_path)])
    out = capsys.readouterr().out
    written = json.loads(out[out.index("{"):])
    assert written["stats"]["transitions"] == 200 and set(written) == {"stats", "hdf5"}
    with h5py.File(written["hdf5"]) as f:
        assert f.attrs["action_noise"] == 0.0 and f.attrs["behaviour"].startswith("waypoint controller")
    assert len(load_dataset(written["hdf5"])) == 200
