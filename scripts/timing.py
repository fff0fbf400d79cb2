"""Helpers of the timing benchmarks: median wall time of a call, and a printed report saved as text."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np


def median_us(fn: Callable[[], object], repeats: int, warmup: int = 10) -> float:
    """Median microseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def report(lines: Sequence[str], out: Path) -> None:
    """Print ``lines`` and write them to ``out`` (parent folders created)."""
    text = "\n".join(lines)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
