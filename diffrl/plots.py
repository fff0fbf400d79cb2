"""Plots people would rather see than read: learning curves of a run folder."""

from __future__ import annotations

import csv
from pathlib import Path


def plot_learning_curve(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Plot evaluation score (normalised if available, else return) against gradient steps from ``eval.csv``."""
    run_dir = Path(run_dir)
    table = run_dir / "eval.csv"
    if not table.is_file():
        return None
    with table.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    key = next((k for k in ("normalized_mean", "mean") if rows[0].get(k) not in (None, "")), None)
    if key is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [float(r["step"]) for r in rows]
    mean = [float(r[key]) for r in rows]
    err_key = key.replace("mean", "stderr")
    err = [float(r.get(err_key) or 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(steps, mean, marker="o")
    ax.fill_between(steps, [m - e for m, e in zip(mean, err, strict=True)],
                    [m + e for m, e in zip(mean, err, strict=True)], alpha=0.25)
    ax.set_xlabel("gradient steps")
    ax.set_ylabel("normalised score" if key == "normalized_mean" else "return")
    ax.set_title(run_dir.name, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "learning_curve.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
