"""Per-task presets: task names from dataset names, the order defaults -> preset -> overrides, and the CLI."""

import json
from pathlib import Path

import pytest

from agents.diffusion_bc import DiffusionBC, DiffusionBCConfig
from agents.presets import Preset, apply_preset, task_name
from diffrl.cli import main


@pytest.mark.parametrize("name", ["hopper-medium-replay-v2", "hopper-medium-replay.hdf5", "Hopper-Medium-Replay",
                                  "/data/d4rl/hopper-medium-replay-v2.hdf5", "mujoco/hopper/medium-replay-v0",
                                  "../shared/datasets/hopper-medium-replay.hdf5"])
def test_task_name_strips_version_suffix_and_folder(name):
    assert task_name(name) == "hopper-medium-replay"


def test_apply_preset_sets_the_row_and_says_so():
    table = {"hopper-medium": Preset({"hidden": 64, "lr": 1e-3}, "paper table 9")}
    config, line = apply_preset(DiffusionBCConfig(), table, "hopper-medium-v2")
    assert (config.hidden, config.lr) == (64, 1e-3) and "paper table 9" in line and "hopper-medium" in line
    config, line = apply_preset(DiffusionBCConfig(), table, "walker2d-medium-v2")
    assert config == DiffusionBCConfig() and "none" in line
    with pytest.raises(ValueError, match="unknown fields"):
        apply_preset(DiffusionBCConfig(), {"x": Preset({"nope": 1}, "s")}, "x")


def test_cli_applies_preset_then_overrides_and_fills_the_lr_horizon(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(DiffusionBC, "presets", {"pointnav": Preset({"hidden": 24, "depth": 2}, "test table")})
    monkeypatch.setattr(DiffusionBC, "default_batch_size", 32)
    main(["train", "diffusion_bc", "--dataset", "toy:pointnav", "--steps", "3", "--eval-episodes", "0",
          "--run-dir", str(tmp_path / "run"), "depth=1", "lr_schedule=cosine", "--device", "cpu", "--precision",
          "bf16"])
    assert "preset: pointnav" in capsys.readouterr().out
    spec = json.loads((tmp_path / "run" / "config.json").read_text())
    assert spec["agent_config"]["hidden"] == 24 and spec["agent_config"]["depth"] == 1  # override wins
    assert spec["agent_config"]["total_steps"] == 3  # the schedule's horizon follows --steps
    assert spec["train"]["batch_size"] == 32 and spec["train"]["device"] == "cpu"
    assert spec["train"]["precision"] == "bf16"


def test_diffusion_ql_preset_of_the_task_reaches_config_json(tmp_path, capsys):
    data = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hopper-medium-replay.hdf5"
    main(["train", "diffusion_ql", "--dataset", str(data), "--steps", "1", "--batch-size", "8", "--eval-episodes", "0",
          "--run-dir", str(tmp_path / "run"), "n_candidates=2", "max_grad_norm=3.5"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("preset:"))
    assert "hopper-medium-replay" in line and "main.py" in line
    agent_config = json.loads((tmp_path / "run" / "config.json").read_text())["agent_config"]
    assert agent_config["eta"] == 1.0 and agent_config["max_grad_norm"] == 3.5  # preset row, then the override
    main(["train", "diffusion_ql", "--dataset", str(data), "--steps", "1", "--batch-size", "8", "--eval-episodes", "0",
          "--run-dir", str(tmp_path / "run2"), "n_candidates=2"])
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["agent_config"]["max_grad_norm"] == 4.0
