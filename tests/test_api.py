"""The Python entry (diffrl.make / fit / resume): the same run folder as the CLI, resume, data-derived config values,
TensorBoard contents of a short run, line progress in logs, one file mode for the whole run folder."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch

import diffrl
from diffrl.checkpoint import load_checkpoint
from diffrl.cli import main
from envs import OfflineDataset, load_dataset
from envs.toy import POINTNAV_ID

TINY = {"hidden": 32, "ema_start": 0}


def tensors(payload, prefix="") -> dict[str, torch.Tensor]:
    if isinstance(payload, torch.Tensor):
        return {prefix: payload}
    if isinstance(payload, dict):
        return {k: v for key, value in payload.items() for k, v in tensors(value, f"{prefix}.{key}").items()}
    return {}


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(load_checkpoint(a)), tensors(load_checkpoint(b))
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def files(run_dir: Path) -> set[str]:
    """Relative paths of a run folder's files, TensorBoard event files by their folder only."""
    return {"tb/<events>" if p.parent.name == "tb" else str(p.relative_to(run_dir))
            for p in run_dir.rglob("*") if p.is_file()}


def fit_pointnav(run_dir: Path, steps: int, **kw) -> diffrl.Run:
    return diffrl.make("diffusion_bc", "toy:pointnav", batch_size=64, **TINY).fit(
        steps=steps, eval_episodes=2, log_every=10, run_dir=run_dir, **kw)


def test_python_entry_and_cli_write_the_same_run_folder(tmp_path):
    cli, api = tmp_path / "cli", tmp_path / "api"
    main(["train", "diffusion_bc", "--dataset", "toy:pointnav", "--steps", "40", "--batch-size", "64",
          "--eval-every", "20", "--eval-episodes", "2", "--log-every", "10", "--run-dir", str(cli),
          "hidden=32", "ema_start=0"])
    run = fit_pointnav(api, 40, eval_every=20)
    assert files(cli) == files(api) == {
        "config.json", "eval.csv", "eval.json", "final_eval.json", "policy.pt", "learning_curve.png", "tb/<events>",
        "checkpoints/latest.pt", "checkpoints/step_0000024.pt", "checkpoints/step_0000032.pt",
        "checkpoints/step_0000040.pt"}
    for name in ("config.json", "eval.json", "final_eval.json"):
        assert json.loads((cli / name).read_text()) == json.loads((api / name).read_text()), name
    assert_same_tensors(cli / "policy.pt", api / "policy.pt")
    assert run.run_dir == api and run.policy_path == api / "policy.pt"
    assert run.final == json.loads((api / "final_eval.json").read_text()) and run.score == run.final["mean"]
    assert [e["step"] for e in run.evaluations] == [20, 40]
    assert run.policy(seed=0).act([-0.8, 0.0]).shape == (2,)


def test_resume_from_python_continues_exactly_and_refuses_changes(tmp_path, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    fit_pointnav(full, 40)
    fit_pointnav(split, 20)
    with pytest.raises(ValueError, match="cannot change hidden 32 -> 16; seed 0 -> 1"):
        diffrl.resume(split, config={"hidden": 16}, seed=1)
    with pytest.raises(ValueError, match="no setting 'eval_evry'. Did you mean 'eval_every'"):
        diffrl.resume(split, eval_evry=5)
    capsys.readouterr()
    run = diffrl.resume(split, steps=40, eval_episodes=3)
    out = capsys.readouterr().out
    assert "resume: steps 20 -> 40 (the updates stay exact)" in out and "resume: eval_episodes 2 -> 3" in out
    assert_same_tensors(full / "policy.pt", run.policy_path)
    assert len(run.final["returns"]) == 3


def test_config_json_holds_the_config_the_built_agent_derived_from_the_data(tmp_path):
    small = {"hidden": 16, "depth": 1, "critic_hidden": 16, "n_candidates": 4}
    experiment = diffrl.make("idql", "toy:bandit-8gaussians", batch_size=32, **small)
    assert experiment.config.reward_scale == 1.0  # the factor needs the data: from_dataset computes it
    experiment.fit(steps=4, run_dir=tmp_path / "run")
    scale = experiment.agent.config.reward_scale
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["agent_config"]
    assert scale != 1.0 and saved["reward_scale"] == scale
    diffrl.resume(tmp_path / "run", steps=8)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["agent_config"] == saved


def test_a_short_run_logs_training_scalars_and_the_final_evaluation(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run = diffrl.make("diffusion_bc", "toy:pointnav", batch_size=32, **TINY).fit(
        steps=300, eval_every=100, eval_episodes=2, run_dir=run_dir)
    err = capsys.readouterr().err
    assert "\r" not in err  # stderr is not a terminal here: lines, no redrawn bar
    assert [line.split("(")[1].split(")")[0] for line in err.splitlines() if line.startswith("train: step")] == \
        [f"{p}%" for p in range(5, 101, 5)]
    assert json.loads((run_dir / "config.json").read_text())["train"]["log_every"] == 15  # 300 // 20
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(15, 301, 15))
    assert [e.step for e in events.Scalars("eval/mean")] == [100, 200, 300]
    (final,) = events.Scalars("final/mean")
    assert final.step == 300 and final.value == pytest.approx(run.final["mean"])
    # final and periodic evaluations run the same episodes: the final policy scores as the last periodic point
    assert events.Scalars("eval/mean")[-1].value == pytest.approx(final.value)
    assert (run_dir / "learning_curve.png").is_file()


def test_every_file_of_a_run_folder_gets_the_same_mode(tmp_path):
    run_dir = tmp_path / "run"
    fit_pointnav(run_dir, 20, eval_every=10, checkpoint_every=5)
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(p.relative_to(run_dir)): stat.S_IMODE(p.stat().st_mode) for p in run_dir.rglob("*") if p.is_file()}
    assert {"eval.csv", "policy.pt", "config.json", "checkpoints/latest.pt"} <= modes.keys()
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_an_in_memory_dataset_with_another_evaluation_env(tmp_path):
    pointnav = load_dataset("toy:pointnav")
    data = OfflineDataset(pointnav.observations, pointnav.actions, pointnav.rewards,
                          terminals=pointnav.terminals, timeouts=pointnav.timeouts, name="my-nav")
    experiment = diffrl.make("diffusion_bc", data, batch_size=32, **TINY)
    with pytest.raises(ValueError, match="shape mismatch"):
        experiment.fit(steps=5, eval_env="Hopper-v5", run_dir=tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()
    run = experiment.fit(steps=5, eval_env=POINTNAV_ID, eval_episodes=2, run_dir=tmp_path / "run")
    spec = json.loads((tmp_path / "run" / "config.json").read_text())
    assert spec["dataset"] == "my-nav" and spec["eval_env"] == POINTNAV_ID and len(run.final["returns"]) == 2
    with pytest.raises(ValueError, match="unknown dataset 'my-nav'"):
        diffrl.resume(tmp_path / "run", steps=10)
    assert diffrl.resume(tmp_path / "run", steps=10, dataset=data).final["step"] == 10


def test_describe_lists_fields_and_the_preset():
    text = diffrl.describe("diffusion_ql", dataset="hopper-medium-replay-v2")
    assert "eta" in text and "float" in text and "weight of the normalised Q term" in text
    assert "preset: hopper-medium-replay (" in text
    with pytest.raises(ValueError, match="unknown agent 'difusion_ql'.*diffusion_ql"):
        diffrl.make("difusion_ql", "toy:pointnav")
