"""A benchmark's run log: one JSON line per finished run, written as each run ends, so partial results survive."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np


def mean_se(values: Sequence[float], single: float = 0.0) -> tuple[float, float]:
    """Mean and standard error over runs (``single`` as the error of one run)."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), (float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else single)


def file_digest(path: Path) -> str:
    """The first 16 hex digits of the SHA-256 of a file: tells runs on a remade dataset from runs on the old one."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def read_runs(path: Path) -> list[dict]:
    """The runs logged at ``path`` (none when it does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_logged(calls: Sequence[tuple[Callable[..., dict], tuple]], path: Path, processes: int,
               kept: Sequence[dict] = (), on_result: Callable[[dict], Any] | None = None) -> list[dict]:
    """Run ``fn(*args)`` for each call in a pool of ``processes`` and log to ``path``: first ``kept`` (earlier runs
    to keep), then each result as it ends. Returns kept + results, in the order they were logged."""
    runs = list(kept)
    with ProcessPoolExecutor(processes) as pool, open(path, "w") as log:
        log.writelines(json.dumps(r) + "\n" for r in runs)
        log.flush()
        for future in as_completed([pool.submit(fn, *args) for fn, args in calls]):
            runs.append(future.result())
            log.write(json.dumps(runs[-1]) + "\n")
            log.flush()
            if on_result is not None:
                on_result(runs[-1])
    return runs
