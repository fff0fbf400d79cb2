"""Checkpoint files: atomic writes, a versioned header, and loading with ``torch.load(weights_only=True)``.

A checkpoint holds ``{"header": {...}, "payload": {...}}``. The payload may contain only tensors and plain
python values (dict, list, tuple, str, int, float, bool, None); :func:`save_checkpoint` converts numpy
arrays to tensors, numpy scalars to python numbers, dataclasses to dicts and paths to strings, and
rejects anything else, so every file it writes loads without unpickling arbitrary objects.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

FORMAT = "diffrl"
FORMAT_VERSION = 1
_ZIP_MAGIC = b"PK\x03\x04"
_PLAIN = (torch.Tensor, str, int, float, bool, bytes, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(ValueError):
    """A file that cannot be used as the requested diffrl checkpoint."""


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success flush, fsync and rename it over ``path``.

    Readers see either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def to_storable(obj: Any, where: str = "payload") -> Any:
    """``obj`` with numpy values, dataclasses and paths converted to types ``weights_only`` loading accepts."""
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"{where} is a numpy array of python objects, which a checkpoint cannot hold")
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_storable(getattr(obj, f.name), f"{where}.{f.name}") for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        out = {to_storable(k, where): to_storable(v, f"{where}[{k!r}]") for k, v in obj.items()}
        return OrderedDict(out) if isinstance(obj, OrderedDict) else out
    if isinstance(obj, list | tuple):
        out = [to_storable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return out if isinstance(obj, list) else tuple(out)
    raise TypeError(
        f"{where} has type {type(obj).__name__}; checkpoints hold only tensors, numpy arrays and plain python "
        "values (dict, list, tuple, str, int, float, bool, None)"
    )


def _header(kind: str) -> dict:
    import diffrl  # at call time: the package may still be importing when this module loads

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "diffrl_version": diffrl.__version__, "kind": kind}


def save_checkpoint(path: str | os.PathLike, payload: dict, kind: str) -> Path:
    """Atomically write ``payload`` (e.g. an agent's state) with a header naming its ``kind``; returns the path."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"checkpoint kind must be a non-empty string, got {kind!r}")
    if not isinstance(payload, dict):
        raise TypeError(f"checkpoint payload must be a dict, got {type(payload).__name__}")
    content = {"header": _header(kind), "payload": to_storable(payload)}
    with atomic_open(path) as f:
        torch.save(content, f)
    return Path(path)


def _read(path: Path, map_location: str | torch.device | None, mmap: bool) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path} is not a diffrl checkpoint: it holds python objects that cannot be loaded safely"
            ) from e
        raise CheckpointError(f"{path} is not a valid diffrl checkpoint (corrupt or truncated)") from e
    except Exception as e:  # torch.load raises RuntimeError, EOFError, KeyError, ... on damaged files
        with open(path, "rb") as f:
            start = f.read(len(_ZIP_MAGIC))
        if start and not _ZIP_MAGIC.startswith(start[:4]):
            raise CheckpointError(f"{path} is not a diffrl checkpoint (not a PyTorch file)") from e
        raise CheckpointError(f"{path} is not a valid diffrl checkpoint (corrupt or truncated)") from e
    header = content.get("header") if isinstance(content, dict) else None
    if not isinstance(header, dict) or header.get("format") != FORMAT or "payload" not in content:
        raise CheckpointError(f"{path} is not a diffrl checkpoint (no diffrl header)")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        import diffrl

        raise CheckpointError(
            f"{path} was written by diffrl {header.get('diffrl_version')} in checkpoint format {version}; "
            f"diffrl {diffrl.__version__} reads formats up to {FORMAT_VERSION}: upgrade diffrl to load it"
        )
    return content


def read_header(path: str | os.PathLike) -> dict:
    """The header ``{"format", "format_version", "diffrl_version", "kind"}`` of a checkpoint, after validation."""
    return _read(Path(path), map_location="cpu", mmap=True)["header"]


def load_checkpoint(
    path: str | os.PathLike, expected_kind: str | None = None, map_location: str | torch.device | None = "cpu"
) -> dict:
    """The payload of a checkpoint written by :func:`save_checkpoint`, checking its kind when one is expected."""
    path = Path(path)
    content = _read(path, map_location=map_location, mmap=False)
    kind = content["header"].get("kind")
    if expected_kind is not None and kind != expected_kind:
        raise CheckpointError(f"{path} contains a {kind!r} agent, expected {expected_kind!r}")
    return content["payload"]
