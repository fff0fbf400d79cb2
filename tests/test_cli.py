"""The diffrl command end to end on the embedded toy dataset, with tiny budgets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffrl.checkpoint import load_checkpoint
from diffrl.cli import main

TINY = ["hidden=32", "ema_start=0"]


def train(run_dir: Path, steps: int, *extra: str) -> None:
    main(["train", "diffusion_bc", "--dataset", "toy:pointnav", "--steps", str(steps), "--batch-size", "64",
          "--eval-every", "0", "--eval-episodes", "2", "--log-every", "10", "--run-dir", str(run_dir), *TINY, *extra])


def policy_tensors(run_dir: Path) -> dict:
    payload = load_checkpoint(run_dir / "policy.pt")
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, torch.Tensor):
            flat[prefix] = obj

    walk("", payload)
    return flat


def test_list_shows_agents_solvers_and_datasets(capsys):
    main(["list"])
    out = capsys.readouterr().out
    for name in ("diffusion_ql", "qgpo", "diffuser", "dpm-solver++", "vp-sde", "toy:", "pointnav"):
        assert name in out


def test_unknown_agent_and_field_suggest_close_names(tmp_path):
    with pytest.raises(SystemExit, match="diffusion_ql"):
        main(["train", "diffusion_qll", "--dataset", "toy:pointnav"])
    with pytest.raises(SystemExit, match="hidden"):
        main(["train", "diffusion_bc", "--dataset", "toy:pointnav", "--run-dir", str(tmp_path / "r"), "hiden=3"])
    with pytest.raises(SystemExit, match="pointnav"):
        main(["train", "diffusion_bc", "--dataset", "toy:pointnvm", "--run-dir", str(tmp_path / "r2")])


def test_train_writes_run_folder_and_never_overwrites(tmp_path):
    run = tmp_path / "run"
    train(run, 40, "--eval-every", "20")
    for name in ("config.json", "eval.csv", "eval.json", "final_eval.json", "policy.pt", "learning_curve.png"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    config = json.loads((run / "config.json").read_text())
    assert config["agent"] == "diffusion_bc" and config["agent_config"]["hidden"] == 32
    assert config["train"]["steps"] == 40
    with pytest.raises(SystemExit, match="already exists"):
        train(run, 40)


def test_resume_continues_exactly(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    train(full, 60)
    train(split, 30)
    with pytest.raises(SystemExit, match="cannot change steps 5 -> 7"):  # the sampler's steps, not --steps
        main(["train", "--resume", str(split), "--steps", "60", "steps=7"])
    main(["train", "--resume", str(split), "--steps", "60", "steps=5"])
    a, b = policy_tensors(full), policy_tensors(split)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_eval_command_on_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    train(run, 20)
    capsys.readouterr()
    out_file = tmp_path / "eval.json"
    main(["eval", str(run), "--episodes", "2", "--seeds", "0,1", "--output", str(out_file)])
    results = json.loads(out_file.read_text())
    assert [r["seed"] for r in results] == [0, 1]
    assert all(len(r["returns"]) == 2 for r in results)
    again = json.loads(capsys.readouterr().out)
    assert again == results  # deterministic by seed


@pytest.mark.slow
def test_eval_of_checkpoints_in_parallel_workers_matches_sequential(tmp_path, capsys):
    run = tmp_path / "run"
    train(run, 20, "--checkpoint-every", "10")
    checkpoint = run / "checkpoints" / "step_0000010.pt"
    capsys.readouterr()
    main(["eval", str(checkpoint), str(run), "--episodes", "2", "--seeds", "0,1"])
    sequential = json.loads(capsys.readouterr().out)
    main(["eval", str(checkpoint), str(run), "--episodes", "2", "--seeds", "0,1", "--workers", "2"])
    parallel = json.loads(capsys.readouterr().out)
    assert parallel == sequential
    assert sequential[0]["returns"] != sequential[2]["returns"]  # step 10 and the final policy differ


def test_eval_rejects_a_checkpoint_of_another_agent(tmp_path):
    run = tmp_path / "run"
    train(run, 10, "--checkpoint-every", "10")
    spec = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**spec, "agent": "gaussian_bc", "agent_config": {}}))
    with pytest.raises(SystemExit, match="diffusion_bc"):
        main(["eval", str(run / "checkpoints" / "step_0000010.pt"), "--episodes", "1"])


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun binds its own rendezvous store on a port the OS picks, so no port can be taken meanwhile
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "diffrl",
           "train", "diffusion_bc", "--dataset", "toy:pointnav", "--steps", "20", "--batch-size", "32",
           "--eval-episodes", "0", "--run-dir", str(run), *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "policy.pt").is_file()
    assert len(list((run / "tb").iterdir())) == 1  # only rank 0 logs


@pytest.mark.slow
def test_collect_writes_loadable_datasets(tmp_path, capsys):
    from envs import load_dataset

    main(["collect", "Hopper-v5", "--level", "random,medium", "--transitions", "300", "--train-steps", "200",
          "--out", str(tmp_path), "--formats", "hdf5,minari"])
    out = capsys.readouterr().out
    paths = json.loads(out[out.index("{"):])  # after the progress bar
    assert set(paths) == {"random", "medium"}
    for level in paths:
        from_hdf5, from_minari = load_dataset(paths[level]["hdf5"]), load_dataset(paths[level]["minari"])
        assert len(from_hdf5) == len(from_minari) == 300
        assert from_hdf5.env_id == "Hopper-v5" and from_hdf5.obs_dim == 11
        assert torch.equal(from_hdf5.actions, from_minari.actions)


def test_train_help_lists_every_field_of_every_agent(capsys):
    import dataclasses

    from agents import AGENTS
    from agents.field_help import field_help
    from diffrl.api import _value_text

    for kind, (config_cls, _) in AGENTS.items():
        main(["train", kind, "--help"])
        out = capsys.readouterr().out
        assert "--dataset" in out and f"{kind} settings ({config_cls.__name__}" in out
        rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and len(line.split()) > 3}
        defaults = config_cls()
        for field in dataclasses.fields(config_cls):
            meaning = field_help(kind, field.name)
            assert meaning, f"{kind}.{field.name} has no one-line meaning in agents/field_help.py"
            line = rows[field.name]
            assert f"  {_value_text(getattr(defaults, field.name))}  " in line and line.endswith(meaning), line


def test_help_and_list_show_the_preset_of_a_dataset(capsys):
    main(["train", "diffusion_ql", "--dataset", "hopper-medium-replay-v2", "--help"])
    help_text = capsys.readouterr().out
    assert "preset: hopper-medium-replay (" in help_text and "source:" in help_text
    main(["list", "diffusion_ql", "--dataset", "hopper-medium-replay-v2"])
    listed = capsys.readouterr().out
    assert listed.strip() and listed.strip() in help_text
    main(["list", "gaussian_bc", "--dataset", "hopper-medium-v2"])
    assert "preset: none for task 'hopper-medium'" in capsys.readouterr().out
