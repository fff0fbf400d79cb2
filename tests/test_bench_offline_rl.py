"""End-to-end check of the offline-RL benchmark script at a tiny budget on a shared dataset."""

import json
import sys
from pathlib import Path

import pytest

from envs.d4rl import CHECKOUT_DATASETS

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (CHECKOUT_DATASETS / "hopper-medium.hdf5").exists(),
                                reason="shared datasets not present")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    sys.modules.pop("bench_offline_rl", None)
    import bench_offline_rl

    return bench_offline_rl


def test_table_log_append_and_report(bench, tmp_path, capsys):
    common = ["--datasets", "hopper-medium", "--steps", "4", "--eval-episodes", "1", "--out", str(tmp_path),
              "--d3rlpy-python", str(tmp_path / "missing-python")]
    bench.main([*common, "--agents", "diffusion_ql", "qgpo", "td3bc", "--seeds", "0", "--eval-every", "1"])
    out = capsys.readouterr().out
    assert "skipping d3rlpy" in out and "at the end of the budget" in out and "last 3 evaluations" in out
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["agent"] for r in runs) == ["diffusion_ql", "qgpo"]
    by_agent = {r["agent"]: r for r in runs}
    assert by_agent["diffusion_ql"]["config"]["selection"] == "softmax"
    assert by_agent["qgpo"]["config"]["behavior_batch_size"] == 256  # the CPU-budget override
    assert all(r["steps"] == 4 and [p["step"] for p in r["curve"]] == [1, 2, 3, 4] and r["steps_per_sec"] > 0
               for r in runs)
    assert (tmp_path / "offline_rl_curves.png").stat().st_size > 0

    bench.main([*common, "--agents", "diffusion_bc", "--seeds", "1", "--append"])
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["agent"], r["seed"]) for r in runs) == [("diffusion_bc", 1), ("diffusion_ql", 0), ("qgpo", 0)]

    capsys.readouterr()
    bench.main(["--report", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert all(name in out for name in ("diffusion_ql", "qgpo", "diffusion_bc", "steps / s"))
    assert "last 3 evaluations" not in out  # the diffusion_bc run was evaluated once

    with pytest.raises(SystemExit, match="no runs logged"):
        bench.main(["--report", "--out", str(tmp_path / "empty")])
