"""Few-step students against the solvers of their teacher, on a closed form.

The teacher is the exact denoiser of a 2-D mixture of four Gaussians (std 0.3 at (+-1, +-1)) under the VP-SDE;
students are 3x256 residual MLPs trained by ``diffrl.distillation`` on draws of the mixture: progressive
distillation from a 64-step DDIM teacher (v prediction, one round per halving, rows for every round from 8 calls
down to 1) and consistency distillation and training (N = 18). Every sampler starts from one shared prior draw and
is scored by the sliced 2-Wasserstein distance to the exact mixture (``iid-exact``: the Monte Carlo floor).

    OMP_NUM_THREADS=1 python scripts/bench_distill.py      # table in results/distill/bench_distill.{csv,md}
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from diffrl.analytic import ExactDenoiser, GaussianMixture, sliced_wasserstein
from diffrl.distillation import DistillConfig, make_distiller
from diffrl.model import DiffusionModel
from diffrl.nets.mlp import ResidualMLP
from diffrl.schedules import VPSDE
from diffrl.solvers import DDIM, DPMSolverPP, make_solver

FIELDS = ["sampler", "nfe", "sw2", "train_s"]


def four_modes() -> GaussianMixture:
    means = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]], dtype=torch.float64)
    return GaussianMixture(means, torch.full((2,), 0.3, dtype=torch.float64))


def student(schedule: VPSDE, prediction: str) -> DiffusionModel:
    return DiffusionModel(ResidualMLP(2, hidden=256, depth=3), schedule, prediction)


def train(distiller, iterations: int, batch: int, seed: int) -> float:
    """Run ``iterations`` updates; returns the wall time in seconds."""
    sample = distiller.batch_sampler()
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(iterations):
        distiller.update(sample(batch, gen))
    return time.perf_counter() - start


def score(model: DiffusionModel, solver, steps: int, x_T: torch.Tensor, mixture: GaussianMixture) -> float:
    with torch.no_grad():
        out = solver.sample(model, x_T, steps=steps, generator=torch.Generator().manual_seed(1))
    return sliced_wasserstein(out.double(), mixture)


def run(args: argparse.Namespace) -> list[dict]:
    schedule, mixture = VPSDE(), four_modes()
    teacher = DiffusionModel(ExactDenoiser(mixture, schedule), schedule, "eps")
    x_T = schedule.prior((args.samples, 2), generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    data = {"x0": mixture.sample(args.pool, torch.Generator().manual_seed(args.seed + 1)).float(),
            "cond": torch.zeros(args.pool, 0)}
    rows = [{"sampler": "iid-exact", "nfe": 0, "train_s": 0.0,
             "sw2": sliced_wasserstein(mixture.sample(args.samples, torch.Generator().manual_seed(7)), mixture)}]
    for nfe in (1, 2, 3, 5, 10, 20, 50):
        rows.append({"sampler": "ddim", "nfe": nfe, "train_s": 0.0, "sw2": score(teacher, DDIM(), nfe, x_T, mixture)})
        if nfe > 1:
            rows.append({"sampler": "dpm-solver++(2M)", "nfe": nfe, "train_s": 0.0,
                         "sw2": score(teacher, DPMSolverPP(2), nfe, x_T, mixture)})
    x_T32 = x_T.float()
    torch.manual_seed(args.seed)
    config = DistillConfig(method="progressive", steps=1, teacher_steps=64, iterations=args.iterations)
    progressive = make_distiller(teacher, config, data, student(schedule, "v"))
    grids = progressive.grids
    elapsed = 0.0
    for r in range(len(progressive.keep)):
        elapsed += train(progressive, args.iterations, args.batch, args.seed + 10 + r)
        times = grids[r + 1][:-1]
        if len(times) <= 8:
            rows.append({"sampler": "progressive", "nfe": len(times), "train_s": elapsed,
                         "sw2": score(progressive.student, make_solver("ddim-grid", times=times.tolist()), len(times),
                                      x_T32, mixture)})
        print(rows[-1], flush=True)
    for method in ("consistency", "consistency-training"):
        torch.manual_seed(args.seed)
        config = DistillConfig(method=method, steps=1, scales=18, iterations=args.consistency_iterations)
        distiller = make_distiller(teacher, config, data, student(schedule, "x0"))
        elapsed = train(distiller, args.consistency_iterations, args.batch, args.seed + 20)
        for steps in (1, 2, 3):
            sampling = DistillConfig(method=method, steps=steps, scales=18)
            distiller.config = sampling
            plan = distiller.sampling()
            rows.append({"sampler": method, "nfe": steps, "train_s": elapsed,
                         "sw2": score(distiller.student, make_solver(plan["solver"], **plan["solver_kwargs"]), steps,
                                      x_T32, mixture)})
            print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| sampler | network calls | sliced W2 | training (s) |", "|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['nfe']} | {r['sw2']:.4f} | {r['train_s']:.0f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=1000, help="progressive updates per round")
    parser.add_argument("--consistency-iterations", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=20_000, help="samples per score")
    parser.add_argument("--pool", type=int, default=100_000, help="mixture draws the students train on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/distill"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench_distill.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    (args.out / "bench_distill.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
