"""Samplers compared at equal network-evaluation budgets: accuracy against a closed form, and latency.

Accuracy: every solver samples a 2-D mixture of four Gaussians (std 0.3 at (+-1, +-1)) through its exact denoiser,
from one shared prior draw, and is scored by the sliced 2-Wasserstein distance to the exact mixture (quantiles by
bisection) and by its mean and covariance errors. Two rows give the Monte Carlo resolution of these scores:
``iid-exact`` scores exact samples of the same size, ``ode-limit`` a fine (200-step DPM-Solver++ 3) solve from the
same prior draw, the value every deterministic solver tends to as its budget grows.
Latency: wall time of one ``solver.sample`` call with a 3x256 ResidualMLP denoiser (random weights, 2-D samples)
at batch 1 and batch 256, best of ``--repeats`` runs (the least disturbed by other processes).

    OMP_NUM_THREADS=1 python scripts/bench_solvers.py            # table, results/bench_solvers.{csv,png}
    OMP_NUM_THREADS=1 python scripts/bench_solvers.py --nfe 10 20 --samples 50000 --schedule ddpm-linear
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import matplotlib
import torch

from diffrl.analytic import ExactDenoiser, GaussianMixture, sliced_wasserstein
from diffrl.model import DiffusionModel
from diffrl.nets.mlp import ResidualMLP
from diffrl.schedules import SCHEDULES, make_schedule
from diffrl.solvers import DPMSolverPP, Solver, solver_variants

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SOLVERS: dict[str, Solver] = solver_variants()
FIELDS = ["solver", "nfe", "steps", "sw2", "mean_err", "cov_err", "ms_batch1", "ms_batch256"]


def four_modes() -> GaussianMixture:
    means = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]], dtype=torch.float64)
    return GaussianMixture(means, torch.full((2,), 0.3, dtype=torch.float64))


def steps_for(solver: Solver, nfe: int) -> int:
    """The most grid points whose run stays within ``nfe`` network evaluations."""
    return (nfe - 1) // solver.calls_per_step + 1


def accuracy(samples: torch.Tensor, mixture: GaussianMixture) -> dict[str, float]:
    x = samples.double()
    return {"sw2": sliced_wasserstein(x, mixture), "mean_err": float((x.mean(0) - mixture.mean()).norm()),
            "cov_err": float((torch.cov(x.T) - mixture.covariance()).norm())}


def latency_ms(solver: Solver, model: DiffusionModel, batch: int, steps: int, repeats: int) -> float:
    x_T = torch.randn(batch, 2, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    solver.sample(model, x_T, steps=steps, generator=gen)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        solver.sample(model, x_T, steps=steps, generator=gen)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def run(args: argparse.Namespace) -> list[dict]:
    schedule = make_schedule(args.schedule)
    mixture = four_modes()
    exact = DiffusionModel(ExactDenoiser(mixture, schedule), schedule, "eps")
    torch.manual_seed(0)
    net = DiffusionModel(ResidualMLP(2, hidden=256, depth=3).eval(), schedule, "eps")
    x_T = schedule.prior((args.samples, 2), generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    limit = DPMSolverPP(3).sample(exact, x_T, steps=200)
    iid = mixture.sample(args.samples, torch.Generator().manual_seed(args.seed + 1))
    rows = [{"solver": "iid-exact", "nfe": 0, "steps": 0, **accuracy(iid, mixture)},
            {"solver": "ode-limit", "nfe": 200, "steps": 200, **accuracy(limit, mixture)}]
    for name, solver in SOLVERS.items():
        for nfe in args.nfe:
            steps = steps_for(solver, nfe)
            if steps < 2:
                continue
            out = solver.sample(exact, x_T, steps=steps, generator=torch.Generator().manual_seed(args.seed + 2))
            row = {"solver": name, "nfe": solver.nfe(steps), "steps": steps, **accuracy(out, mixture)}
            for batch in (1, 256):
                row[f"ms_batch{batch}"] = latency_ms(solver, net, batch, steps, args.repeats)
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    cells = [f"{row['solver']:>15}", f"{row['nfe']:>4}", f"{row['steps']:>5}"]
    cells += [f"{row[k]:>9.4f}" for k in ("sw2", "mean_err", "cov_err")]
    cells += [f"{row[k]:>11.2f}" if k in row else f"{'':>11}" for k in ("ms_batch1", "ms_batch256")]
    return " ".join(cells)


def plot(rows: list[dict], path: Path, floors: dict[str, float]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab20")
    for i, name in enumerate(SOLVERS):
        mine = [r for r in rows if r["solver"] == name]
        nfe = [r["nfe"] for r in mine]
        axes[0].loglog(nfe, [r["sw2"] for r in mine], "o-", label=name, color=colors(i))
        axes[1].loglog(nfe, [r["ms_batch256"] for r in mine], "o-", label=name, color=colors(i))
    for (label, value), style in zip(floors.items(), (":", "--"), strict=True):
        axes[0].axhline(value, color="k", ls=style, label=label)
    axes[0].set(xlabel="network evaluations", ylabel="sliced W2 to the exact mixture", title="accuracy")
    axes[1].set(xlabel="network evaluations", ylabel="ms per sample call (batch 256)", title="latency, 3x256 MLP")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50, 100], help="network-evaluation budgets")
    parser.add_argument("--samples", type=int, default=20_000, help="samples per accuracy run")
    parser.add_argument("--schedule", default="vp-sde", choices=sorted(SCHEDULES))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per latency cell (best reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"schedule {args.schedule}, {args.samples} samples, budgets {args.nfe}")
    print(" ".join(f"{h:>{w}}" for h, w in zip(FIELDS, (15, 4, 5, 9, 9, 9, 11, 11), strict=True)))
    rows = run(args)
    floors = rows[:2]
    for row in floors:
        print(format_row(row))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench_solvers.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows[2:], args.out / "bench_solvers.png", {row["solver"]: row["sw2"] for row in floors})
    print(f"wrote {args.out / 'bench_solvers.csv'} and {args.out / 'bench_solvers.png'}")


if __name__ == "__main__":
    main()
