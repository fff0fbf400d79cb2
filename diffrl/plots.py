"""Plots people would rather see than read: learning curves of a run folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def plot_learning_curve(run_dir: str | Path, out: str | Path | None = None, episodes: int | None = None) -> Path | None:
    """Plot the evaluation score (D4RL-normalised if available, else the return) against gradient steps: the
    periodic evaluations of ``eval.csv`` with a band of one standard error over their ``episodes`` episodes, and the
    final policy's evaluation from ``final_eval.json``. Returns the image path (None when there is nothing to plot).
    """
    run_dir = Path(run_dir)
    rows = []
    if (run_dir / "eval.csv").is_file():
        with (run_dir / "eval.csv").open() as f:
            rows = list(csv.DictReader(f))
    final = json.loads((run_dir / "final_eval.json").read_text()) if (run_dir / "final_eval.json").is_file() else None
    first = rows[0] if rows else final or {}
    key = next((k for k in ("normalized_mean", "mean") if first.get(k) not in (None, "")), None)
    if key is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    err_key = key.replace("mean", "stderr")
    per_eval = f"{episodes} episodes" if episodes else "the episodes"
    fig, ax = plt.subplots(figsize=(6, 4))
    if rows:
        steps = [float(r["step"]) for r in rows]
        mean = [float(r[key]) for r in rows]
        err = [float(r.get(err_key) or 0.0) for r in rows]
        ax.plot(steps, mean, marker="o", label="periodic evaluation (mean)")
        ax.fill_between(steps, [m - e for m, e in zip(mean, err, strict=True)],
                        [m + e for m, e in zip(mean, err, strict=True)], alpha=0.25,
                        label=f"± 1 standard error over {per_eval}")
    if final is not None:
        ax.errorbar([final["step"]], [final[key]], yerr=[final.get(err_key) or 0.0], marker="*", markersize=12,
                    color="tab:red", capsize=4, linestyle="none",
                    label=f"final policy ± 1 s.e. ({len(final['returns'])} episodes)")
    ax.set_xlabel("gradient steps")
    ax.set_ylabel("D4RL-normalised score" if key == "normalized_mean" else "episode return")
    ax.set_title(f"{run_dir.name}\nevery evaluation runs the same episodes (same environment seeds)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "learning_curve.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
