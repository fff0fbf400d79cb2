"""QGPO's energy guidance and Diffusion-QL on the 2-D toy bandits (known reward, multimodal behaviour data).

Per bandit and seed, one QGPO and one Diffusion-QL agent are trained for the same number of gradient steps. Reported
(mean and standard error over seeds):

- QGPO at each guidance scale: mean reward of the samples, support distance (median distance from a sample to the
  nearest dataset action), and the mean distance to the behaviour sample drawn from the same noise (scale 0), which
  goes to 0 with the scale.
- Diffusion-QL: mean reward of the actor's own samples and of max-Q selection over candidates, support distance,
  and the share of samples in the best mode (within 0.3 of the reward peak).

Samples per scale are plotted to ``results/toy_bandits.png`` (the plotted points go to
``results/toy_bandits_samples.json``, from which ``--plot-only`` re-renders the plot); numbers go to
``results/toy_bandits.json``.

    OMP_NUM_THREADS=1 python scripts/bench_toy_bandits.py                      # 8gaussians, 3 seeds, 2000 steps
    OMP_NUM_THREADS=1 python scripts/bench_toy_bandits.py --bandits 8gaussians swissroll --steps 3000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_log import mean_se  # noqa: E402

from agents.diffusion_ql import DiffusionQL, DiffusionQLConfig
from agents.qgpo import QGPO, QGPOConfig
from envs import load_dataset
from envs.toy import get_bandit

RESULTS = Path(__file__).resolve().parent.parent / "results"
SCALES = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
BEST_MODE_RADIUS = 0.3
N_SAMPLES = 1000
PLOTTED = 800  # samples drawn per panel
SAMPLES_FILE = "toy_bandits_samples.json"  # the plotted samples, for --plot-only


def qgpo_config(steps: int) -> QGPOConfig:
    """Small networks; beta = 20 so that exp(beta r) separates the best mode; the behaviour model trains alone for
    the first 3/4 of the budget on batches of 256, then 8 supports per state are drawn with 5 solver steps."""
    return QGPOConfig(hidden=32, critic_hidden=128, energy_hidden=128, behavior_lr=1e-3, behavior_batch_size=256,
                      n_support=8, support_steps=5, beta=20.0, behavior_steps=3 * steps // 4, total_steps=steps)


def dql_config(steps: int) -> DiffusionQLConfig:
    return DiffusionQLConfig(hidden=128, depth=3, critic_hidden=128, critic_depth=2, lr=1e-3, critic_lr=1e-3,
                             lr_schedule="constant", ema_start=steps // 5, n_candidates=16)


def fit(agent, dataset, steps: int, batch_size: int, seed: int) -> float:
    """``steps`` updates on uniform batches; returns the wall time."""
    g = torch.Generator().manual_seed(seed)
    sample = agent.batch_sampler(dataset) if hasattr(agent, "batch_sampler") else dataset.sample
    start = time.perf_counter()
    for _ in range(steps):
        agent.update(sample(batch_size, g))
    return time.perf_counter() - start


def support_distance(actions: np.ndarray, data: torch.Tensor) -> float:
    return float(torch.cdist(torch.as_tensor(actions), data).min(1).values.median())


def run_one(name: str, seed: int, steps: int, batch_size: int) -> tuple[dict, dict]:
    dataset = load_dataset(f"toy:bandit-{name}", n=10_000, seed=seed)
    bandit = get_bandit(name)
    obs = np.zeros((N_SAMPLES, 1), dtype=np.float32)
    torch.manual_seed(seed)
    qgpo = QGPO.from_dataset(dataset, qgpo_config(steps))
    qgpo_time = fit(qgpo, dataset, steps, batch_size, seed)
    samples = {s: qgpo.policy(seed=seed, guidance_scale=s).act(obs) for s in SCALES}
    behaviour = samples[0.0]
    qgpo_rows = {s: {"reward": float(bandit.reward(a).mean()), "support": support_distance(a, dataset.actions),
                     "to_behaviour": float(np.linalg.norm(a - behaviour, axis=1).mean())} for s, a in samples.items()}
    torch.manual_seed(seed)
    dql = DiffusionQL.from_dataset(dataset, dql_config(steps))
    dql_time = fit(dql, dataset, steps, batch_size, seed)
    own, best = dql.policy(seed=seed, selection="none").act(obs), dql.policy(seed=seed, selection="max").act(obs)
    in_best = np.linalg.norm(own - np.asarray(bandit.best_action), axis=1) < BEST_MODE_RADIUS
    dql_row = {"reward": float(bandit.reward(own).mean()), "reward_max_q": float(bandit.reward(best).mean()),
               "support": support_distance(own, dataset.actions), "best_mode_share": float(in_best.mean()),
               "qgpo_seconds": qgpo_time, "dql_seconds": dql_time}
    data_reward = dataset.rewards.mean().item()
    extras = {"data": dataset.actions.numpy(), "qgpo": samples, "dql": own}
    return {"qgpo": qgpo_rows, "dql": dql_row, "data_reward": data_reward}, extras


def fmt(values: list[float]) -> str:
    m, se = mean_se(values)
    return f"{m:6.3f} ± {se:5.3f}"


def report(name: str, runs: list[dict]) -> dict:
    print(f"\n== {name}: behaviour data mean reward {fmt([r['data_reward'] for r in runs])}")
    print(f"{'QGPO scale':>10} | {'reward':>15} | {'support dist':>15} | {'dist to behaviour':>17}")
    summary: dict = {"qgpo": {}, "dql": {}}
    for s in SCALES:
        cols = {k: [r["qgpo"][s][k] for r in runs] for k in ("reward", "support", "to_behaviour")}
        summary["qgpo"][str(s)] = {k: mean_se(v) for k, v in cols.items()}
        print(f"{s:>10} | {fmt(cols['reward'])} | {fmt(cols['support'])} | {fmt(cols['to_behaviour']):>17}")
    cols = {k: [r["dql"][k] for r in runs] for k in runs[0]["dql"]}
    summary["dql"] = {k: mean_se(v) for k, v in cols.items()}
    print(f"Diffusion-QL actor: reward {fmt(cols['reward'])}, with max-Q selection {fmt(cols['reward_max_q'])}, "
          f"support dist {fmt(cols['support'])}, share in best mode {fmt(cols['best_mode_share'])}")
    print(f"training time per run: QGPO {fmt(cols['qgpo_seconds'])} s, Diffusion-QL {fmt(cols['dql_seconds'])} s")
    return summary


def plot(all_extras: dict[str, dict], path: Path) -> None:
    """Per bandit (row): the behaviour data, QGPO's samples at each guidance scale and Diffusion-QL's samples in the
    2-D action plane, with the reward peak marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    names = list(all_extras)
    cols = len(SCALES) + 2
    fig, axes = plt.subplots(len(names), cols, figsize=(2.2 * cols, 2.4 * len(names) + 0.4), squeeze=False,
                             sharex=True, sharey=True)
    for row, name in enumerate(names):
        ex, best = all_extras[name], get_bandit(name).best_action
        panels = [("data", ex["data"]), *((f"QGPO s={s}", ex["qgpo"][s]) for s in SCALES), ("Diffusion-QL", ex["dql"])]
        for ax, (title, pts) in zip(axes[row], panels, strict=True):
            pts = np.asarray(pts)
            ax.scatter(pts[:PLOTTED, 0], pts[:PLOTTED, 1], s=1.5, alpha=0.5)
            ax.scatter([best[0]], [best[1]], marker="*", s=60, c="red")
            ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), xticks=[-1, 0, 1], yticks=[-1, 0, 1], aspect="equal")
            ax.tick_params(labelsize=7)
            ax.set_title(title if row == 0 else "", fontsize=8)
            if row == len(names) - 1:
                ax.set_xlabel("action a[0]", fontsize=8)
        axes[row][0].set_ylabel(f"{name}\naction a[1]", fontsize=8)
    legend = [Line2D([], [], marker="o", markersize=3, color="tab:blue", alpha=0.6, linestyle="none",
                     label=f"action samples ({PLOTTED} per panel)"),
              Line2D([], [], marker="*", markersize=9, color="red", linestyle="none",
                     label="best action (peak of the reward)")]
    fig.legend(handles=legend, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / (2.4 * len(names) + 0.4), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_samples(all_extras: dict[str, dict], path: Path) -> None:
    """The plotted points (rounded), for ``--plot-only``."""
    def points(x) -> list:
        return np.round(np.asarray(x)[:PLOTTED], 3).tolist()

    saved = {name: {"data": points(ex["data"]), "dql": points(ex["dql"]),
                    "qgpo": {str(s): points(a) for s, a in ex["qgpo"].items()}} for name, ex in all_extras.items()}
    path.write_text(json.dumps(saved))


def load_samples(path: Path) -> dict[str, dict]:
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: run the benchmark once (it saves the plotted samples there)")
    saved = json.loads(path.read_text())
    return {name: {**ex, "qgpo": {float(s): a for s, a in ex["qgpo"].items()}} for name, ex in saved.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandits", nargs="+", default=["8gaussians"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000, help="gradient steps per agent (same for both)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot-only", action="store_true",
                        help="re-render toy_bandits.png from the samples saved by the last run, without training")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.plot_only:
        plot(load_samples(args.out / SAMPLES_FILE), args.out / "toy_bandits.png")
        return
    print(f"budget: {args.steps} gradient steps per agent, batch {args.batch_size}, seeds {args.seeds}")
    results, extras = {}, {}
    for name in args.bandits:
        runs = []
        for seed in args.seeds:
            run, ex = run_one(name, seed, args.steps, args.batch_size)
            runs.append(run)
            extras.setdefault(name, ex)
        results[name] = report(name, runs)
    plot(extras, args.out / "toy_bandits.png")
    save_samples(extras, args.out / SAMPLES_FILE)
    meta = {"steps": args.steps, "batch_size": args.batch_size, "seeds": args.seeds, "scales": list(SCALES)}
    (args.out / "toy_bandits.json").write_text(json.dumps({"settings": meta, "results": results}, indent=1))
    print(f"\nplots: {args.out / 'toy_bandits.png'}; numbers: {args.out / 'toy_bandits.json'}")


if __name__ == "__main__":
    main()
