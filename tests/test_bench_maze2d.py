"""scripts/bench_maze2d.py end to end at a tiny budget (d3rlpy part only where its venv exists), and the pieces it
evaluates with: the open-loop plan follower and exported TorchScript policies."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_maze2d  # noqa: E402

from envs.maze import PlanFollower  # noqa: E402

needs_robotics = pytest.mark.skipif(importlib.util.find_spec("gymnasium_robotics") is None,
                                    reason="gymnasium-robotics is not installed (pip install 'diffrl[maze]')")
TINY = ["--set", "horizon=16", "--set", "diffusion_steps=8", "--set", "dims=8,16"]


def test_plan_follower_plans_once_and_steers_to_the_next_planned_state():
    calls = []
    plan = np.array([[[0.0, 0.0, 0.0, 0.0], [0.3, -0.2, 0.1, 0.0], [0.5, 0.1, 0.2, 0.4]]])

    def planner(obs):
        calls.append(obs.copy())
        return plan

    follower = PlanFollower(planner)
    obs = np.array([[0.1, 0.1, 0.05, -0.05]])
    # (p_{t+1} - p) + (v_{t+1} - v), then the last position at zero velocity, clipped to [-1, 1]
    np.testing.assert_allclose(follower.act(obs), [[0.3 - 0.1 + 0.1 - 0.05, -0.2 - 0.1 + 0.0 + 0.05]])
    np.testing.assert_allclose(follower.act(obs), [[0.5 - 0.1 + 0.2 - 0.05, 0.1 - 0.1 + 0.4 + 0.05]])
    np.testing.assert_allclose(follower.act(obs), [[0.5 - 0.1 - 0.05, 0.1 - 0.1 + 0.05]])
    np.testing.assert_allclose(follower.act(np.array([[-3.0, 0.0, 0.0, 0.0]])), [[1.0, 0.1]])
    assert len(calls) == 1
    follower.reset()
    follower.act(obs)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="expected"):
        PlanFollower(lambda o: plan).act(np.zeros((2, 4)))


def test_torchscript_policy_acts_on_raw_observations(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    torch.jit.script(net).save(str(tmp_path / "policy.pt"))
    policy = bench_maze2d.TorchScriptPolicy(tmp_path / "policy.pt")
    obs = np.random.default_rng(0).normal(size=(3, 4))
    policy.reset()
    np.testing.assert_allclose(policy.act(obs), net(torch.as_tensor(obs, dtype=torch.float32)).detach().numpy(),
                               rtol=1e-6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    if importlib.util.find_spec("gymnasium_robotics") is None:
        pytest.skip("gymnasium-robotics is not installed")
    from envs import maze

    folder = tmp_path_factory.mktemp("maze_data")
    maze.collect_maze("maze2d-umaze", 800, seed=4, out_dir=folder, formats=("hdf5",))
    return folder


@needs_robotics
def test_bench_end_to_end_is_resumable(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--tasks", "maze2d-umaze", "--methods", "diffuser", "--steps", "3", "--seeds", "0", "1", "--episodes",
            "1", "--data-dir", str(data_dir), "--out", str(out), *TINY]
    bench_maze2d.main(argv)
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["seed"]) for r in runs) == [("controller", 0), ("diffuser", 0), ("diffuser", 1)]
    diffuser = [r for r in runs if r["method"] == "diffuser"]
    assert all(r["config"]["goal"] == [-1.0, 1.0, 0.0, 0.0] and r["config"]["horizon"] == 16 for r in diffuser)
    ref_min, ref_max = 23.85, 161.86
    for r in runs:
        assert len(r["returns"]) == 1 and 0 <= r["return"] <= 300
        assert r["normalized"] == pytest.approx(100 * (r["return"] - ref_min) / (ref_max - ref_min))
    controller = next(r for r in runs if r["method"] == "controller")
    assert controller["return"] > 100  # the controller reaches the goal and stays there
    text = (out / "bench.txt").read_text()
    assert "| maze2d-umaze | Diffuser | 0,1 |" in text and "| maze2d-umaze | waypoint controller | 0 |" in text
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    bench_maze2d.main(argv)  # resumed: nothing left to run, the same runs reported
    assert "0 runs to do, 3 logged" in capsys.readouterr().out
    assert [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()] == runs
    bench_maze2d.main([*argv[:5], "4", *argv[6:]])  # another budget: new runs, the old ones kept in the log
    assert len((out / "runs.jsonl").read_text().splitlines()) == 6


@needs_robotics
def test_bench_d3rlpy_baselines(data_dir, tmp_path):
    if not Path(bench_maze2d.D3RLPY_PYTHON).exists():
        pytest.skip(f"no d3rlpy venv at {bench_maze2d.D3RLPY_PYTHON}")
    out = tmp_path / "out"
    bench_maze2d.main(["--tasks", "maze2d-umaze", "--methods", "iql", "bc", "--steps", "20", "--seeds", "0",
                       "--episodes", "1", "--data-dir", str(data_dir), "--out", str(out)])
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in runs) == ["bc", "controller", "iql"]
    assert all(np.isfinite(r["normalized"]) for r in runs)


def test_missing_dataset_and_bad_override_are_one_line_errors(tmp_path, data_dir):
    with pytest.raises(SystemExit, match=r"maze2d-medium.hdf5 not found; make it with `diffrl collect"):
        bench_maze2d.main(["--tasks", "maze2d-medium", "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="error: --set: .*horizon"):
        bench_maze2d.main(["--tasks", "maze2d-umaze", "--data-dir", str(data_dir), "--out", str(tmp_path),
                           "--set", "horizon=1"])
