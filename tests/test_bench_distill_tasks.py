"""scripts/bench_distill_tasks.py: runs of different budgets are kept in the log and tabled apart."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_distill_tasks  # noqa: E402


def fake_run(seed: int, iterations: int, student: float) -> dict:
    policies = {"teacher": {"normalized": 30.0 + seed, "return": 1000.0, "latency_ms": 1.0, "train_s": 1.0,
                            "calls": 5, "sampler": "DDPM"},
                "progressive-1": {"normalized": student + seed, "return": 900.0, "latency_ms": 0.3, "train_s": 1.0,
                                  "calls": 1, "sampler": "GridDDIM"}}
    return {"task": "hopper-medium", "dataset": "d.hdf5", "dataset_sha": "abc", "teacher_steps": 100,
            "iterations": iterations, "episodes": 2, "batch_size": 8, "seed": seed, "policies": policies}


def test_budgets_get_their_own_rows():
    runs = [fake_run(s, 1000, 20.0) for s in (0, 1)] + [fake_run(s, 2000, 30.0) for s in (0, 1)]
    rows = [r for r in bench_distill_tasks.summary(runs) if r["policy"] == "progressive-1"]
    assert [(r["iterations"], r["seeds"], r["normalized"]) for r in rows] == [(1000, 2, 20.5), (2000, 2, 30.5)]
    assert rows[1]["vs_teacher"] == "within" and rows[0]["vs_teacher"] == "below"
    assert "hopper-medium, 2000 per round" in bench_distill_tasks.markdown(rows)


def test_a_new_budget_keeps_the_runs_of_the_old_one(tmp_path, monkeypatch):
    data = tmp_path / "d.hdf5"
    data.write_bytes(b"not read")
    old = {**fake_run(0, 1000, 20.0), "dataset": str(data),
           "dataset_sha": bench_distill_tasks.file_digest(data)}
    (tmp_path / "runs_hopper-medium.jsonl").write_text(json.dumps(old) + "\n")
    seen = []

    def run_seed(args, seed, dataset, root):
        seen.append((seed, root))
        return {**bench_distill_tasks.settings_of(args), "seed": seed, "policies": old["policies"]}

    monkeypatch.setattr(bench_distill_tasks, "run_seed", run_seed)
    monkeypatch.setattr(bench_distill_tasks, "load_dataset", lambda path: None)
    monkeypatch.setattr(bench_distill_tasks, "plot", lambda rows, path: None)
    argv = ["x", "--task", "hopper-medium", "--dataset", str(data), "--seeds", "0", "--teacher-steps", "100",
            "--iterations", "2000", "--episodes", "2", "--batch-size", "8", "--out", str(tmp_path),
            "--work-dir", str(tmp_path / "work")]
    monkeypatch.setattr(sys, "argv", argv)
    bench_distill_tasks.main()
    logged = [json.loads(line) for line in (tmp_path / "runs_hopper-medium.jsonl").read_text().splitlines()]
    assert sorted(r["iterations"] for r in logged) == [1000, 2000]
    assert seen == [(0, tmp_path / "work")]
    bench_distill_tasks.main()  # the same settings again: nothing left to run
    assert len(seen) == 1
    table = (tmp_path / "tasks.md").read_text()
    assert "1000 per round" in table and "2000 per round" in table
