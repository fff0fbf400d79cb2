"""Checkpoint files: atomic writes, a versioned and checksummed header, and loading with
``torch.load(weights_only=True)``.

A checkpoint holds ``{"header": {...}, "payload": {...}}``. The payload may contain only tensors and plain
python values (dict, list, tuple, str, int, float, bool, None); :func:`save_checkpoint` converts numpy
arrays to tensors, numpy scalars to python numbers, dataclasses to dicts and paths to strings, and
rejects anything else, so every file it writes loads without unpickling arbitrary objects. The header holds
a SHA-256 digest of the payload (every tensor's bytes, dtype and shape, and every plain value), which
:func:`load_checkpoint` recomputes: a damaged file is refused, never loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import secrets
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

FORMAT = "diffrl"
FORMAT_VERSION = 2  # 2: the header holds "payload_sha256"
_ZIP_MAGIC = b"PK\x03\x04"
TMP_SUFFIX = ".tmp"
_PLAIN = (torch.Tensor, str, int, float, bool, bytes, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(ValueError):
    """A file that cannot be used as the requested diffrl checkpoint."""


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success flush, fsync and rename it over ``path``.

    Readers see either the old file or the complete new one, never a partial write. The file gets the mode a plain
    ``open()`` gives (0o666 less the umask), like every other file of a run folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temporary(path)
    try:
        with open(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # e.g. a full disk: name the file, which a failed write() does not
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _new_temporary(path: Path) -> tuple[int, Path]:
    """A new, empty file ``.<name>.<random>.tmp`` beside ``path``, opened for writing."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def remove_orphans(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_open` left in ``directory`` when its process was killed."""
    removed = []
    for tmp in Path(directory).glob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


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


def _feed(h: Any, obj: Any) -> None:
    """Add a canonical encoding of a stored payload (types, structure and values) to the hash ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, list | tuple) and not isinstance(obj, torch.Size):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for value in obj:
            _feed(h, value)
    elif isinstance(obj, str | bytes):
        data = obj.encode() if isinstance(obj, str) else obj
        h.update(f"{'S' if isinstance(obj, str) else 'B'}{len(data)};".encode())
        h.update(data)
    elif isinstance(obj, float):
        h.update(f"F{obj.hex()};".encode())
    else:  # None, bool, int, torch.dtype, torch.device, torch.Size
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def payload_digest(payload: Any) -> str:
    """SHA-256 (hex) of a stored payload: equal for a payload and what :func:`load_checkpoint` reads back."""
    h = hashlib.sha256()
    _feed(h, payload)
    return h.hexdigest()


def nonfinite_tensors(tree: Any, where: str = "") -> list[str]:
    """Names (``key.key[i]``) of the floating tensors in a nested dict / list that hold NaN or infinity."""
    if isinstance(tree, torch.Tensor):
        return [where or "tensor"] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        return []
    return [name for key, value in items for name in nonfinite_tensors(value, f"{where}.{key}" if where else str(key))]


def _header(kind: str, payload: Any) -> dict:
    import diffrl  # at call time: the package may still be importing when this module loads

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "diffrl_version": diffrl.__version__, "kind": kind,
            "payload_sha256": payload_digest(payload)}


def save_checkpoint(path: str | os.PathLike, payload: dict, kind: str) -> Path:
    """Atomically write ``payload`` (e.g. an agent's state) with a header naming its ``kind``; returns the path."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"checkpoint kind must be a non-empty string, got {kind!r}")
    if not isinstance(payload, dict):
        raise TypeError(f"checkpoint payload must be a dict, got {type(payload).__name__}")
    stored = to_storable(payload)
    content = {"header": _header(kind, stored), "payload": stored}
    with atomic_open(path) as f:
        torch.save(content, f)
    return Path(path)


def _read(path: Path, map_location: str | torch.device | None, mmap: bool) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" if not path.exists() else f"{path} is not a file")
    with open(path, "rb") as f:
        start = f.read(len(_ZIP_MAGIC))
    if len(start) == len(_ZIP_MAGIC) and start != _ZIP_MAGIC:  # diffrl writes only torch's zip format
        raise CheckpointError(f"{path} is not a diffrl checkpoint (not a PyTorch file)")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path} is not a diffrl checkpoint: it holds python objects that cannot be loaded safely"
            ) from e
        raise CheckpointError(f"{path} is not a valid diffrl checkpoint (corrupt or truncated)") from e
    except Exception as e:  # torch.load raises RuntimeError, EOFError, KeyError, ... on damaged files
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
    """The header ``{"format", "format_version", "diffrl_version", "kind", "payload_sha256"}`` of a checkpoint
    (the payload's checksum is verified by :func:`load_checkpoint`, not here)."""
    return _read(Path(path), map_location="cpu", mmap=True)["header"]


def load_checkpoint(
    path: str | os.PathLike, expected_kind: str | None = None, map_location: str | torch.device | None = "cpu"
) -> dict:
    """The payload of a checkpoint written by :func:`save_checkpoint`, checking its checksum (files of format 1
    have none) and its kind when one is expected."""
    path = Path(path)
    content = _read(path, map_location=map_location, mmap=False)
    header = content["header"]
    if header["format_version"] >= 2 and header.get("payload_sha256") != payload_digest(content["payload"]):
        raise CheckpointError(f"{path} is corrupted: its contents do not match the checksum in its header")
    kind = header.get("kind")
    if expected_kind is not None and kind != expected_kind:
        raise CheckpointError(f"{path} contains a {kind!r} agent, expected {expected_kind!r}")
    return content["payload"]
