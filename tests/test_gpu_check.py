"""scripts/gpu_check.py runs every agent the same way on any device; here on the CPU at a tiny budget."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def test_gpu_check_runs_every_agent_in_both_precisions_on_cpu(tmp_path):
    small = ["horizon=16", "dims=[8,16]", "hidden=16", "critic_hidden=16", "n_candidates=2", "sampling_steps=2",
             "inverse_dynamics_hidden=16", "energy_hidden=16"]
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--dataset", "toy:pointnav", "--steps", "2",
           "--eval-steps", "2", "--ddpo-epochs", "1", "--ddpo-batch", "4", "--ddpo-sample-steps", "3", "--out",
           str(tmp_path)] + [a for item in small for a in ("--override", item)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1",
                                                                                   "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    agents = {r["agent"] for r in rows if r["agent"] != "d3rlpy_td3bc"}
    assert len(agents) == 9 and "ddpo" in agents and {r["precision"] for r in rows} >= {"fp32", "bf16"}
    assert all(r["steps_per_s"] > 0 for r in rows)
    assert "steps/s" in (tmp_path / "gpu_check.txt").read_text()
