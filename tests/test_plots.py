"""Plots read without the code: labelled learning curves, and the benchmark plots redrawn from their saved points."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np

from diffrl.plots import plot_learning_curve

ROOT = Path(__file__).resolve().parent.parent


def script(monkeypatch, name: str):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def test_learning_curve_labels_the_band_and_the_final_evaluation(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    (tmp_path / "eval.csv").write_text("step,mean,stderr\n10,1.0,0.5\n20,2.0,0.4\n")
    (tmp_path / "final_eval.json").write_text(json.dumps({"step": 20, "mean": 2.0, "stderr": 0.4,
                                                          "returns": [1.6, 2.4], "normalized_mean": None}))
    labels = []
    monkeypatch.setattr(plt, "close", lambda fig: labels.extend(t.get_text() for t in fig.axes[0].get_legend().texts))
    assert plot_learning_curve(tmp_path, episodes=2) == tmp_path / "learning_curve.png"
    assert labels == ["periodic evaluation (mean)", "± 1 standard error over 2 episodes",
                      "final policy ± 1 s.e. (2 episodes)"]


def test_pointnav_routes_redraw_from_the_saved_rollouts(tmp_path, monkeypatch):
    bench = script(monkeypatch, "bench_bc")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "PATHS_FILE", tmp_path / "pointnav_routes_paths.json")
    path = np.stack([np.linspace(-0.8, 0.8, 20), 0.4 * np.sin(np.linspace(0, np.pi, 20))], axis=1)
    bench.PATHS_FILE.write_text(json.dumps({"diffusion_bc": [path.tolist()], "gaussian_bc": [(-path).tolist()]}))
    bench.plot_pointnav_only()
    assert (tmp_path / "pointnav_routes.png").stat().st_size > 10_000


def test_toy_bandit_samples_round_trip_and_redraw(tmp_path, monkeypatch):
    bench = script(monkeypatch, "bench_toy_bandits")
    points = np.random.default_rng(0).uniform(-1, 1, (1000, 2))
    extras = {"8gaussians": {"data": points, "dql": points, "qgpo": {s: points for s in bench.SCALES}}}
    bench.save_samples(extras, tmp_path / bench.SAMPLES_FILE)
    loaded = bench.load_samples(tmp_path / bench.SAMPLES_FILE)
    assert set(loaded["8gaussians"]["qgpo"]) == set(bench.SCALES) and len(loaded["8gaussians"]["dql"]) == bench.PLOTTED
    bench.main(["--plot-only", "--out", str(tmp_path)])
    assert (tmp_path / "toy_bandits.png").stat().st_size > 10_000
