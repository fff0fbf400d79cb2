import pickle
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import diffrl
from diffrl.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_open,
    load_checkpoint,
    nonfinite_tensors,
    payload_digest,
    read_header,
    remove_orphans,
    save_checkpoint,
)
from diffrl.seeding import derive_seed, get_rng_state, preserved_rng_state, seed_everything, set_rng_state


@dataclass
class _Config:
    hidden: int = 64
    solver: str = "ddim"
    out: Path = Path("runs/x")


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3)


def test_roundtrip_converts_numpy_dataclasses_and_paths(tmp_path):
    payload = {
        "weights": OrderedDict(w=torch.arange(6.0).reshape(2, 3)),
        "array": np.array([[1, 2], [3, 4]], dtype=np.int32),
        "scalar": np.float32(0.5),
        "config": _Config(),
        "nested": [1, (2.5, "a", None, True), {"deep": np.arange(3)}],
    }
    path = save_checkpoint(tmp_path / "sub" / "a.pt", payload, kind="diffusion_bc")
    out = load_checkpoint(path, expected_kind="diffusion_bc")
    assert isinstance(out["weights"], OrderedDict) and torch.equal(out["weights"]["w"], payload["weights"]["w"])
    assert out["array"].dtype == torch.int32 and out["array"].tolist() == [[1, 2], [3, 4]]
    assert out["scalar"] == 0.5 and type(out["scalar"]) is float
    assert out["config"] == {"hidden": 64, "solver": "ddim", "out": "runs/x"}
    assert out["nested"][:2] == [1, (2.5, "a", None, True)] and out["nested"][2]["deep"].tolist() == [0, 1, 2]
    header = read_header(path)
    assert header == {"format": "diffrl", "format_version": FORMAT_VERSION, "diffrl_version": diffrl.__version__,
                      "kind": "diffusion_bc", "payload_sha256": payload_digest(out)}
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary files left behind


def test_rng_state_survives_a_checkpoint(tmp_path):
    seed_everything(3)
    _draws()
    save_checkpoint(tmp_path / "rng.pt", {"rng": get_rng_state()}, kind="rng")
    expected = _draws()
    _draws()
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = _draws()
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_preserved_rng_state_and_seeding():
    seed_everything(5)
    first = _draws()
    seed_everything(5)
    with preserved_rng_state():
        _draws()
    second = _draws()
    assert first[:3] == second[:3] and torch.equal(first[3], second[3])
    assert derive_seed(0, 0) != derive_seed(0, 1) != derive_seed(1, 0)
    assert derive_seed(7, 2) == derive_seed(7, 2) and 0 <= derive_seed(7, 2) < 2**63
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(-1)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("keep", [0, 100, -10])
def test_truncated_or_empty_file(tmp_path, keep):
    path = save_checkpoint(tmp_path / "a.pt", {"w": torch.randn(1000)}, kind="qgpo")
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError, match=r"a.pt is not a valid diffrl checkpoint \(corrupt or truncated\)"):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_files_that_are_not_diffrl_checkpoints(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello world\n")
    with pytest.raises(CheckpointError, match="not a diffrl checkpoint \\(not a PyTorch file\\)"):
        load_checkpoint(text)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="no diffrl header"):
        load_checkpoint(plain)
    pickled = tmp_path / "object.pt"
    torch.save({"header": {"format": "diffrl"}, "payload": _Config()}, pickled)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(pickled)
    raw_pickle = tmp_path / "raw.pkl"
    raw_pickle.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="not a diffrl checkpoint"):
        load_checkpoint(raw_pickle)


def test_wrong_kind(tmp_path):
    path = save_checkpoint(tmp_path / "q.pt", {}, kind="qgpo")
    with pytest.raises(CheckpointError, match="q.pt contains a 'qgpo' agent, expected 'diffusion_bc'"):
        load_checkpoint(path, expected_kind="diffusion_bc")


def test_newer_format_version(tmp_path):
    path = tmp_path / "future.pt"
    header = {"format": "diffrl", "format_version": FORMAT_VERSION + 1, "diffrl_version": "9.0.0", "kind": "qgpo"}
    torch.save({"header": header, "payload": {}}, path)
    newer = f"diffrl 9.0.0 in checkpoint format {FORMAT_VERSION + 1}.*upgrade diffrl"
    with pytest.raises(CheckpointError, match=newer):
        load_checkpoint(path)


def test_unstorable_payload_names_the_entry_and_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match=r"payload\['agent'\]\['fn'\] has type function"):
        save_checkpoint(tmp_path / "a.pt", {"agent": {"fn": lambda x: x}}, kind="x")
    with pytest.raises(ValueError, match="kind must be a non-empty string"):
        save_checkpoint(tmp_path / "a.pt", {}, kind="")
    assert list(tmp_path.iterdir()) == []


def test_atomic_open_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    with atomic_open(path, "w") as f:
        f.write("old")
    with pytest.raises(RuntimeError), atomic_open(path, "w") as f:
        f.write("partial new content")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def _flip_tensor_bytes(path: Path, needle: bytes, count: int = 64) -> None:
    """Flip ``count`` bytes inside the stored bytes of the tensor that starts with ``needle``."""
    data = bytearray(path.read_bytes())
    start = data.index(needle)
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_refused_by_the_checksum(tmp_path):
    weights = torch.arange(256, dtype=torch.float32) + 0.5
    path = save_checkpoint(tmp_path / "a.pt", {"w": weights, "bf16": weights.bfloat16(), "n": 3}, kind="policy")
    assert torch.equal(load_checkpoint(path)["w"], weights)
    _flip_tensor_bytes(path, weights.numpy().tobytes()[:16])
    with pytest.raises(CheckpointError, match="a.pt is corrupted: its contents do not match the checksum"):
        load_checkpoint(path)


def test_digest_covers_types_structure_and_values():
    base = {"a": [1, 2.0, (True, None)], "t": torch.zeros(2), "s": "x"}
    variants = [{**base, "a": [1, 2, (True, None)]}, {**base, "a": [1, 2.0, [True, None]]},
                {**base, "t": torch.zeros(2, dtype=torch.float64)}, {**base, "t": torch.zeros(1, 2)},
                {**base, "s": "y"}, {"t": base["t"], "a": base["a"], "s": "x"}]
    digests = {payload_digest(v) for v in variants}
    assert len(digests) == len(variants) and payload_digest(base) not in digests
    assert payload_digest(base) == payload_digest({"a": [1, 2.0, (True, None)], "t": torch.zeros(2), "s": "x"})


def test_format_1_files_without_a_checksum_still_load(tmp_path):
    path = tmp_path / "old.pt"
    header = {"format": "diffrl", "format_version": 1, "diffrl_version": "0.1.0", "kind": "qgpo"}
    torch.save({"header": header, "payload": {"w": torch.ones(2)}}, path)
    assert torch.equal(load_checkpoint(path, expected_kind="qgpo")["w"], torch.ones(2))


def test_random_bytes_are_not_a_pytorch_file(tmp_path):
    path = tmp_path / "latest.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=r"latest.pt is not a diffrl checkpoint \(not a PyTorch file\)"):
        load_checkpoint(path)


def test_remove_orphans_deletes_only_temporaries_of_atomic_writes(tmp_path):
    keep = tmp_path / "step_0000010.pt"
    keep.write_bytes(b"x")
    (tmp_path / ".step_0000020.pt.abc123.tmp").write_bytes(b"partial")
    (tmp_path / ".latest.pt.tmp").write_bytes(b"link")
    (tmp_path / "notes.tmp").write_text("a user's file, not hidden")
    removed = remove_orphans(tmp_path)
    assert sorted(p.name for p in removed) == [".latest.pt.tmp", ".step_0000020.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp", "step_0000010.pt"]


def test_atomic_open_names_the_file_when_the_disk_is_full(tmp_path, monkeypatch):
    import errno
    import os

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"cannot write .*f.bin: No space left on device"), \
            atomic_open(tmp_path / "f.bin") as f:
        f.write(b"data")
    assert list(tmp_path.iterdir()) == []


def test_nonfinite_tensors_names_the_entries():
    tree = {"net": {"w": torch.tensor([1.0, float("nan")]), "b": torch.zeros(2)},
            "moments": [torch.ones(1), torch.tensor([float("inf")])], "steps": torch.tensor([3])}
    assert nonfinite_tensors(tree) == ["net.w", "moments.1"]
    assert nonfinite_tensors({"w": torch.ones(3)}) == []
