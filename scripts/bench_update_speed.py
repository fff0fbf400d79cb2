"""Update throughput of agents from two source trees of diffrl, measured in one run, alternating between them.

    python scripts/bench_update_speed.py --trees /tmp/diffrl-before . --agents diffusion_bc diffusion_ql

Each (tree, agent) pair is timed in a fresh single-threaded subprocess that imports diffrl from that tree: the
agent's default config (the same for both trees unless an agent's defaults changed between them), batch 256 on
the given dataset, ``--warmup`` untimed updates, then ``--updates`` timed ones. Rounds alternate the trees so that
a busy machine slows both alike; the table gives the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys, time
sys.path.insert(0, {tree!r})
import torch
torch.set_num_threads(1)
from agents import AGENTS
from envs import load_dataset
config_cls, agent_cls = AGENTS[{agent!r}]
config = config_cls()
if getattr(config, "total_steps", 0) is None:
    import dataclasses
    config = dataclasses.replace(config, total_steps=10**6)
data = load_dataset({dataset!r})
torch.manual_seed(0)
agent = agent_cls.from_dataset(data, config)
sample = agent.batch_sampler(data) if hasattr(agent, "batch_sampler") else data.sample
gen = torch.Generator().manual_seed(0)
for _ in range({warmup}):
    agent.update(sample(256, gen))
start = time.perf_counter()
for _ in range({updates}):
    metrics = agent.update(sample(256, gen))
{{k: float(v) for k, v in metrics.items()}}
print(json.dumps({{"updates_per_s": {updates} / (time.perf_counter() - start)}}))
"""


def measure(tree: str, agent: str, dataset: str, warmup: int, updates: int) -> float:
    code = PROBE.format(tree=str(Path(tree).resolve()), agent=agent, dataset=dataset, warmup=warmup, updates=updates)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(tree).resolve())}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tree, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{tree} / {agent} failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["updates_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs=2, required=True, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--agents", nargs="+", default=["diffusion_bc", "diffusion_ql", "idql"])
    default_data = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hopper-medium.hdf5"
    parser.add_argument("--dataset", default=str(default_data))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--out", type=Path, help="write the table here too")
    args = parser.parse_args()
    speeds = {(t, a): [] for t in args.trees for a in args.agents}
    for _ in range(args.rounds):
        for agent in args.agents:
            for tree in args.trees:
                speeds[tree, agent].append(measure(tree, agent, args.dataset, args.warmup, args.updates))
    before, after = args.trees
    lines = [f"updates/s at batch 256, 1 thread, median of {args.rounds} alternating rounds "
             f"({args.updates} timed updates each)", f"{'agent':<18} {'before':>8} {'after':>8} {'after/before':>12}"]
    for agent in args.agents:
        b, a = statistics.median(speeds[before, agent]), statistics.median(speeds[after, agent])
        lines.append(f"{agent:<18} {b:>8.1f} {a:>8.1f} {a / b:>12.2f}")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
