"""Faults and bad input met through the diffrl command: nothing lost, nothing run, no silent NaN.

Each test is named after the item of the hardening list it pins. A refused command exits with status 2 and one
line on stderr that names the file and the problem.
"""

import errno
import json
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from diffrl.checkpoint import load_checkpoint, nonfinite_tensors
from diffrl.cli import main
from diffrl.runlock import LOCK_FILE, RunLock
from envs import load_dataset
from envs.d4rl import write_d4rl_hdf5
from envs.minari_io import write_minari
from envs.toy import POINTNAV_ID, make_pointnav_dataset

TINY = ["hidden=16", "ema_start=0"]


def train_args(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "diffusion_bc", "--dataset", "toy:pointnav", "--steps", str(steps), "--batch-size", "16",
            "--log-every", "5", "--eval-episodes", "0", "--run-dir", str(run_dir), *TINY, *extra]


def refused(capsys, argv: list[str], last_line_only: bool = False) -> str:
    """The one stderr line of a command that must be refused with exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2, f"exit status {info.value.code}: {err}"
    if not last_line_only:
        assert len(err) == 1, err
    assert err[-1].startswith("diffrl: ") and "Traceback" not in err[-1]
    return err[-1]


def tensors(payload) -> dict[str, torch.Tensor]:
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, list | tuple):
            for i, v in enumerate(obj):
                walk(f"{prefix}[{i}]", v)
        elif isinstance(obj, torch.Tensor):
            flat[prefix] = obj

    walk("", payload)
    return flat


def assert_same_tensors(a, b) -> None:
    a, b = tensors(a), tensors(b)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def minari_metadata(dataset_id: str) -> Path:
    from minari.storage.datasets_root_dir import get_dataset_path

    return get_dataset_path(dataset_id) / "data" / "metadata.json"


def pointnav_minari(dataset_id: str) -> Path:
    write_minari(make_pointnav_dataset(n_episodes=4, seed=0), dataset_id)
    return minari_metadata(dataset_id)


# ------------------------------------------------------------------------------------------------- 1


def test_1_a_minari_datasets_entry_point_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    meta_path = pointnav_minari("test/pointnav/evil-v0")
    meta = json.loads(meta_path.read_text())
    for key in ("env_spec", "eval_env_spec"):
        if meta.get(key):
            spec = json.loads(meta[key])
            spec.update(id="Evil-v0", entry_point="os:system", kwargs={"command": f"touch {marker}"})
            meta[key] = json.dumps(spec)
    meta_path.write_text(json.dumps(meta))
    run = tmp_path / "run"
    line = refused(capsys, ["train", "diffusion_bc", "--dataset", "test/pointnav/evil-v0", "--steps", "5",
                            "--eval-episodes", "1", "--run-dir", str(run), *TINY])
    assert "'Evil-v0', which is not a registered Gymnasium id" in line and "--trust-dataset-env" in line
    assert not marker.exists() and not run.exists()


def test_1_a_registered_id_is_built_from_the_registry_not_the_dataset(tmp_path):
    from envs import make_env
    from envs.toy import PointNavEnv

    meta_path = pointnav_minari("test/pointnav/entry-v0")
    meta = json.loads(meta_path.read_text())
    spec = json.loads(meta["env_spec"])
    spec["entry_point"] = "os:system"  # the id stays a registered one
    meta["env_spec"] = json.dumps(spec)
    meta.pop("eval_env_spec", None)
    meta_path.write_text(json.dumps(meta))
    env = make_env(load_dataset("test/pointnav/entry-v0"))
    assert isinstance(env.unwrapped, PointNavEnv) and env.spec.id == POINTNAV_ID


def test_1_a_dataset_without_spaces_is_refused_unless_trusted(tmp_path, capsys):
    meta_path = pointnav_minari("test/pointnav/nospace-v0")
    meta = json.loads(meta_path.read_text())
    del meta["observation_space"]  # Minari would then make the recorded env to learn its spaces
    meta_path.write_text(json.dumps(meta))
    line = refused(capsys, ["train", "diffusion_bc", "--dataset", "test/pointnav/nospace-v0", "--steps", "5",
                            "--run-dir", str(tmp_path / "run"), *TINY])
    assert "records no observation or action space" in line and "--trust-dataset-env" in line
    assert len(load_dataset("test/pointnav/nospace-v0", trust_env=True)) > 0  # registered id: safe to trust


# ------------------------------------------------------------------------------------------------- 2


def test_2_overwrite_starts_from_an_empty_folder(tmp_path, capsys):
    run = tmp_path / "run"
    main(train_args(run, 40, "--checkpoint-every", "10"))
    main(train_args(run, 20, "--checkpoint-every", "10", "--overwrite"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.pt", "step_0000010.pt",
                                                                       "step_0000020.pt"]
    assert len(list((run / "tb").iterdir())) == 1
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 20
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    line = refused(capsys, train_args(other, 5, "--overwrite"))
    assert "deletes only diffrl run folders" in line and (other / "thesis.tex").read_text() == "keep me"


# ------------------------------------------------------------------------------------------------- 3


def test_3_non_finite_settings_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert "DiffusionBCConfig.lr must be finite, got inf" in refused(capsys, train_args(run, 5, "lr=inf"))
    assert "must be finite" in refused(capsys, train_args(run, 5, "lr=nan"))
    assert not run.exists()


def test_3_divergence_stops_with_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"  # the first update makes the weights huge, the second one's loss is NaN
    line = refused(capsys, train_args(run, 40, "--checkpoint-every", "1", "lr=1e30"), last_line_only=True)
    assert "training stopped at step 2" in line and "non-finite loss or gradient norm" in line
    assert "last good checkpoint is " + str(run / "checkpoints" / "step_0000001.pt") in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.pt", "step_0000001.pt"]
    assert not nonfinite_tensors(load_checkpoint(run / "checkpoints" / "latest.pt")["agent"])
    assert not (run / "policy.pt").exists()
    run = tmp_path / "overflow"  # here the first update itself overflows the weights: nothing is saved
    line = refused(capsys, train_args(run, 40, "--checkpoint-every", "1", "lr=1e38"), last_line_only=True)
    assert "not saving the checkpoint of step 1: the agent state holds NaN/inf in actor." in line
    assert not (run / "checkpoints").exists()


def test_3_skip_mode_leaves_non_finite_updates_out(tmp_path):
    run = tmp_path / "run"
    main(train_args(run, 10, "--checkpoint-every", "10", "--on-nonfinite", "skip", "lr=1e30"))
    payload = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert not nonfinite_tensors(payload["agent"])
    skipped = [r["train/skipped_updates"] for r in payload["history"] if "train/skipped_updates" in r]
    assert skipped == [4.0, 5.0]  # every update after the first diverged and was left out
    assert (run / "policy.pt").is_file()


# ------------------------------------------------------------------------------------------------- 4


def test_4_resume_uses_the_newest_valid_step_file(tmp_path, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    main(train_args(full, 40, "--checkpoint-every", "10"))
    main(train_args(split, 30, "--checkpoint-every", "10"))
    checkpoints = split / "checkpoints"
    (checkpoints / "latest.pt").unlink()
    damaged = checkpoints / "step_0000030.pt"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    capsys.readouterr()
    main(["train", "--resume", str(split), "--steps", "40"])
    assert "skipping a damaged checkpoint" in capsys.readouterr().err
    assert_same_tensors(load_checkpoint(full / "policy.pt"), load_checkpoint(split / "policy.pt"))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest.pt", "step_0000020.pt", "step_0000030.pt",
                                                             "step_0000030.pt.damaged", "step_0000040.pt"]


def test_4_resume_refuses_when_no_checkpoint_is_usable(tmp_path, capsys):
    run = tmp_path / "run"
    main(train_args(run, 20, "--checkpoint-every", "10"))
    for path in (run / "checkpoints").iterdir():
        path.write_bytes(b"PK\x03\x04 truncated")
    line = refused(capsys, ["train", "--resume", str(run)])
    assert f"no usable checkpoint in {run / 'checkpoints'}" in line
    assert all(p.read_bytes() == b"PK\x03\x04 truncated" for p in (run / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------------------- 6


def test_6_flipped_bytes_in_a_policy_file_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    main(train_args(run, 10))
    policy = run / "policy.pt"
    weights = max(tensors(load_checkpoint(policy)).values(), key=torch.Tensor.numel)
    data = bytearray(policy.read_bytes())
    start = data.index(weights.numpy().tobytes()[:32])
    for i in range(start, start + 64):
        data[i] ^= 0x5A
    policy.write_bytes(bytes(data))
    line = refused(capsys, ["eval", str(policy), "--env", POINTNAV_ID, "--episodes", "1"])
    assert f"{policy} is corrupted: its contents do not match the checksum" in line


# ------------------------------------------------------------------------------------------------- 7


@pytest.mark.parametrize("bad", [["--steps", "-5"], ["--batch-size", "0"], ["--log-every", "0"],
                                 ["--checkpoint-every", "-1"]])
def test_7_invalid_settings_create_nothing(tmp_path, capsys, bad):
    run = tmp_path / "run"
    line = refused(capsys, [*train_args(run, 5), *bad])
    assert "TrainConfig." in line and "must be >=" in line
    assert not run.exists()
    main(train_args(run, 5))  # the same folder is free for a correct run
    assert (run / "policy.pt").is_file()


# ------------------------------------------------------------------------------------------------- 8


def test_8_an_empty_dataset_is_refused(tmp_path, capsys):
    path = tmp_path / "empty.hdf5"
    with h5py.File(path, "w") as f:
        for key, shape in (("observations", (0, 3)), ("actions", (0, 2)), ("rewards", (0,)), ("terminals", (0,))):
            f.create_dataset(key, data=np.zeros(shape, dtype=np.float32))
    line = refused(capsys, ["train", "diffusion_bc", "--dataset", str(path), "--run-dir", str(tmp_path / "run")])
    assert f"{path}: the dataset holds no transitions" in line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------- 9


def test_9_resume_keeps_the_run_exact_and_finds_moved_data(tmp_path, capsys, monkeypatch):
    data = make_pointnav_dataset(n_episodes=20, seed=0)
    work = tmp_path / "work"
    work.mkdir()
    write_d4rl_hdf5(work / "nav.hdf5", data)
    monkeypatch.chdir(work)
    run = tmp_path / "run"
    args = ["train", "diffusion_bc", "--dataset", "nav.hdf5", "--batch-size", "16", "--log-every", "5",
            "--eval-episodes", "0", "--checkpoint-every", "10", *TINY]
    main([*args, "--steps", "40", "--run-dir", str(tmp_path / "full")])
    main([*args, "--steps", "20", "--run-dir", str(run)])
    assert json.loads((run / "config.json").read_text())["dataset"] == str(work / "nav.hdf5")
    for change, shown in ((["hidden=32"], "hidden 16 -> 32"), (["--batch-size", "32"], "batch_size 16 -> 32"),
                          (["--seed", "3"], "seed 0 -> 3")):
        line = refused(capsys, ["train", "--resume", str(run), *change])
        assert "cannot change" in line and shown in line
    write_d4rl_hdf5(tmp_path / "other.hdf5", make_pointnav_dataset(n_episodes=20, seed=1))
    line = refused(capsys, ["train", "--resume", str(run), "--dataset", str(tmp_path / "other.hdf5")])
    assert "does not hold the data" in line
    moved = tmp_path / "moved"
    moved.mkdir()
    (work / "nav.hdf5").rename(moved / "nav.hdf5")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    main(["train", "--resume", str(run), "--steps", "40", "--dataset", str(moved / "nav.hdf5"), "hidden=16"])
    out = capsys.readouterr().out
    assert "resume: steps 20 -> 40" in out and "(content checked)" in out
    assert json.loads((run / "config.json").read_text())["dataset"] == str(moved / "nav.hdf5")
    assert_same_tensors(load_checkpoint(tmp_path / "full" / "policy.pt"), load_checkpoint(run / "policy.pt"))


def test_9_settings_that_keep_the_updates_are_applied_and_printed(tmp_path, capsys):
    run = tmp_path / "run"
    main(train_args(run, 10, "--checkpoint-every", "10"))
    capsys.readouterr()
    main(["train", "--resume", str(run), "--steps", "20", "--log-every", "2", "--precision", "bf16"])
    out = capsys.readouterr().out
    assert "resume: steps 10 -> 20 (the updates stay exact)" in out and "resume: log_every 5 -> 2" in out
    assert "resume: precision fp32 -> bf16 (warning: the resumed run is not bit-identical" in out
    assert json.loads((run / "config.json").read_text())["train"]["precision"] == "bf16"


# ------------------------------------------------------------------------------------------------- 10


def test_10_permission_and_folder_errors_are_one_line(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "Not a directory" in refused(capsys, train_args(afile / "run", 5))
    assert "is a file, not a folder" in refused(capsys, train_args(afile, 5))

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    line = refused(capsys, train_args(tmp_path / "locked" / "run", 5))
    assert "Permission denied" in line and "locked" in line


def test_10_a_full_disk_names_the_file_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    main(train_args(run, 10, "--checkpoint-every", "10"))
    import diffrl.checkpoint

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diffrl.checkpoint.os, "fsync", full)
    line = refused(capsys, ["train", "--resume", str(run), "--steps", "20"])
    assert f"cannot write {run / 'config.json'}: No space left on device" in line
    assert not list(run.rglob("*.tmp"))


def test_10_a_truncated_minari_file_is_one_line(tmp_path, capsys):
    meta = pointnav_minari("test/pointnav/cut-v0")
    data_file = meta.parent / "main_data.hdf5"
    data_file.write_bytes(data_file.read_bytes()[:2000])
    line = refused(capsys, ["train", "diffusion_bc", "--dataset", "test/pointnav/cut-v0",
                            "--run-dir", str(tmp_path / "run")])
    assert "test/pointnav/cut-v0" in line


def test_10_a_broken_config_json_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    main(train_args(run, 10, "--checkpoint-every", "10"))
    config = run / "config.json"
    spec = json.loads(config.read_text())
    for broken in ({**spec, "train": {**spec["train"], "steps": "many"}}, {**spec, "agent_config": [1, 2]},
                   {**spec, "eval_episodes": None}, [spec]):
        config.write_text(json.dumps(broken))
        line = refused(capsys, ["train", "--resume", str(run)])
        assert f"{config} is not a valid run config" in line
    config.write_text("{not json")
    assert f"{config} is not a valid run config" in refused(capsys, ["train", "--resume", str(run)])


def test_10_string_observations_are_one_line(tmp_path, capsys):
    path = tmp_path / "strings.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=np.array([["a", "b"], ["c", "d"]], dtype="S1"))
        f.create_dataset("actions", data=np.zeros((2, 2), dtype=np.float32))
        f.create_dataset("rewards", data=np.zeros(2, dtype=np.float32))
        f.create_dataset("terminals", data=np.zeros(2, dtype=bool))
    line = refused(capsys, ["train", "diffusion_bc", "--dataset", str(path), "--run-dir", str(tmp_path / "run")])
    assert f"{path}: field 'observations' must hold numbers" in line


def test_10_weights_of_the_wrong_shape_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    main(train_args(run, 10, "--checkpoint-every", "10"))
    config = run / "config.json"
    spec = json.loads(config.read_text())
    config.write_text(json.dumps({**spec, "agent_config": {**spec["agent_config"], "hidden": 24}}))
    checkpoint = run / "checkpoints" / "step_0000010.pt"
    line = refused(capsys, ["eval", str(checkpoint), "--env", POINTNAV_ID, "--episodes", "1"])
    assert f"{checkpoint} does not fit the agent" in line and "size mismatch" in line
    line = refused(capsys, ["train", "--resume", str(run), "--steps", "20"])
    assert "does not fit this agent" in line


def test_10_bad_thread_count_is_one_line(capsys):
    assert "--threads must be >= 1, got -2" in refused(capsys, ["--threads", "-2", "list"])


# ------------------------------------------------------------------------------------------------- 11


def test_11_dataset_and_env_dimensions_are_checked_before_training(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "wide.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=rng.normal(size=(50, 3)).astype(np.float32))
        f.create_dataset("actions", data=rng.uniform(-1, 1, (50, 2)).astype(np.float32))
        f.create_dataset("rewards", data=np.zeros(50, dtype=np.float32))
        f.create_dataset("terminals", data=np.zeros(50, dtype=bool))
        f.attrs["env_id"] = POINTNAV_ID
    run = tmp_path / "run"
    line = refused(capsys, ["train", "diffusion_bc", "--dataset", str(path), "--steps", "5", "--run-dir", str(run),
                            *TINY])
    assert "shape mismatch" in line and "obs_dim=3" in line
    assert not run.exists()


# ------------------------------------------------------------------------------------------------- 12


def test_12_orphan_temporary_files_are_removed_on_resume(tmp_path):
    run = tmp_path / "run"
    main(train_args(run, 10, "--checkpoint-every", "10"))
    orphans = [run / "checkpoints" / ".step_0000020.pt.k1ll3d.tmp", run / "checkpoints" / ".latest.pt.tmp",
               run / ".config.json.x9.tmp", run / ".policy.pt.q2.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"partial")
    main(["train", "--resume", str(run), "--steps", "20"])
    assert not list(run.rglob("*.tmp"))


# ------------------------------------------------------------------------------------------------- 13


def test_13_a_run_folder_in_use_is_locked(tmp_path, capsys):
    run = tmp_path / "run"
    main(train_args(run, 10, "--checkpoint-every", "10"))
    assert not (run / LOCK_FILE).exists()  # released at the end of the run
    with RunLock(run):
        assert (run / LOCK_FILE).read_text().strip() == str(os.getpid())
        line = refused(capsys, ["train", "--resume", str(run), "--steps", "20"])
        assert f"run folder {run} is in use by process {os.getpid()}" in line
        assert "is in use" in refused(capsys, train_args(run, 10, "--overwrite"))
    assert (run / "policy.pt").is_file()  # the refused --overwrite deleted nothing
    (run / LOCK_FILE).write_text("999999\n")  # left by a killed process: the OS released its lock
    main(["train", "--resume", str(run), "--steps", "20"])
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 20


# ------------------------------------------------------------------------------------------------- 14


def test_14_clear_messages_for_odd_files_and_folders(tmp_path, capsys, recwarn):
    run = tmp_path / "run"
    main(train_args(run, 10, "--checkpoint-every", "10"))
    for path in (run / "checkpoints").iterdir():
        path.unlink()
    (run / "checkpoints" / "latest.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    assert "(not a PyTorch file)" in refused(capsys, ["train", "--resume", str(run)])

    assert f"{tmp_path} is a directory, not a dataset file" in refused(
        capsys, ["train", "diffusion_bc", "--dataset", str(tmp_path), "--run-dir", str(tmp_path / "r")])

    grouped = tmp_path / "grouped.hdf5"
    with h5py.File(grouped, "w") as f:
        f.create_group("observations").create_dataset("x", data=np.zeros((3, 2)))
    assert "'observations' is an HDF5 group, expected an array" in refused(
        capsys, ["train", "diffusion_bc", "--dataset", str(grouped), "--run-dir", str(tmp_path / "r")])

    meta = minari_metadata("test/pointnav/partial-v0")
    meta.parent.mkdir(parents=True)  # a download cut short: data/ without metadata.json
    line = refused(capsys, ["train", "diffusion_bc", "--dataset", "test/pointnav/partial-v0",
                            "--run-dir", str(tmp_path / "r")])
    assert "'test/pointnav/partial-v0'" in line and "is incomplete: it has no data/metadata.json" in line

    recwarn.clear()
    main(["list"])  # the broken folder is not reported by commands that do not use it
    assert not [w for w in recwarn if "Misconfigured" in str(w.message)]


def test_14_config_json_is_replaced_atomically(tmp_path):
    run = tmp_path / "run"
    main(train_args(run, 10, "--checkpoint-every", "10"))
    before = (run / "config.json").stat().st_ino
    main(["train", "--resume", str(run), "--steps", "20"])
    assert (run / "config.json").stat().st_ino != before  # a new file renamed over the old one
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 20


# ------------------------------------------------------------------------------------------------- proof


def test_twenty_kill_9s_then_resume_end_bit_identical_without_stray_files(tmp_path):
    import torch.utils.tensorboard  # noqa: F401  (what a run imports is imported here, not in every child)

    import agents  # noqa: F401

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # the first optimiser imports torch._dynamo
    steps = 300
    args = ["train", "diffusion_bc", "--dataset", "toy:pointnav", "--steps", str(steps), "--batch-size", "16",
            "--log-every", "3", "--checkpoint-every", "3", "--eval-episodes", "0", *TINY]
    fork = mp.get_context("fork")

    def start(*extra: str):
        process = fork.Process(target=main, args=([*args, *extra],))
        process.start()
        return process

    def timed(*extra: str) -> float:
        begun = time.perf_counter()
        process = start(*extra)
        process.join()
        assert process.exitcode == 0
        return time.perf_counter() - begun

    def newest_step(run: Path) -> int:
        return max((int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("step_*.pt")), default=0)

    startup = timed("--run-dir", str(tmp_path / "one-step"), "--steps", "1")
    window = (timed("--run-dir", str(tmp_path / "full")) - startup) / 20
    run, rng = tmp_path / "killed", random.Random(0)
    for attempt in range(20):
        if (run / "config.json").is_file():
            process = start("--resume", str(run))
        else:  # killed before it wrote its config: nothing to resume, start again
            process = start("--run-dir", str(run))
        # Killed at a random time during start-up, an update or a checkpoint, and at the latest once the run has
        # checkpointed past its share of the budget, so a machine that runs faster than when timed still kills
        # every attempt before the end.
        deadline = time.perf_counter() + rng.uniform(startup / 2, startup + window)
        while time.perf_counter() < deadline and newest_step(run) < (attempt + 1) * steps // 25:
            time.sleep(0.002)
        assert process.is_alive(), f"the run ended (exit status {process.exitcode}) before it was killed"
        os.kill(process.pid, signal.SIGKILL)
        process.join()
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["step"] > 0 and not (run / "policy.pt").exists()
    final = start("--resume", str(run))
    final.join()
    assert final.exitcode == 0

    full = tmp_path / "full"
    assert_same_tensors(load_checkpoint(full / "policy.pt"), load_checkpoint(run / "policy.pt"))
    a, b = load_checkpoint(full / "checkpoints" / "latest.pt"), load_checkpoint(run / "checkpoints" / "latest.pt")
    assert_same_tensors(a["agent"], b["agent"])
    assert a["history"] == b["history"] and a["step"] == b["step"] == steps
    names = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
    expected = {"config.json", "policy.pt", "checkpoints/latest.pt",
                *(f"checkpoints/step_{s:07d}.pt" for s in (steps - 6, steps - 3, steps))}
    assert {n for n in names if not n.startswith("tb/events.out.tfevents.")} == expected
