"""Plot Diffuser plans against what the receding-horizon planner then executed.

``--task pointnav``: a goal-conditioned Diffuser on ``toy:pointnav``; the figure shows the obstacle, the goal, the
executed paths of several episodes and the plans made along the way (the first plan of each episode in bold).

``--task hopper-medium`` (or any D4RL dataset name): a value-guided Diffuser; the figure shows,
per step of one episode, the return model's prediction for the chosen plan against the realised discounted
(penalised) return-to-go from that step, as a time series and a scatter plot.

A model comes from ``--checkpoint`` (a Trainer checkpoint of scripts/train_planner.py with matching settings) or
is trained here for ``--steps`` steps.

    OMP_NUM_THREADS=1 python scripts/plot_plans.py --task pointnav --steps 1500
    OMP_NUM_THREADS=1 python scripts/plot_plans.py --task hopper-medium --steps 2000 --max-episode-steps 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_planners import POINTNAV_GOAL, RESULTS  # noqa: E402
from train_planner import build_planner  # noqa: E402

from agents.planning import PlannerAgent  # noqa: E402
from diffrl.checkpoint import load_checkpoint  # noqa: E402
from diffrl.seeding import seed_everything  # noqa: E402
from diffrl.training import TrainConfig, Trainer  # noqa: E402
from envs import load_dataset, make_env  # noqa: E402
from envs.toy import PointNavEnv  # noqa: E402

POINTNAV_OVERRIDES = ["horizon=32", "dims=32,64", "goal_conditioned=true", "train_value=false", "guide_scale=0",
                      "n_candidates=1", POINTNAV_GOAL]
LOCOMOTION_OVERRIDES = ["horizon=16", "dims=16,32,64", "n_candidates=8"]


def rollout_with_plans(agent: PlannerAgent, env, seed: int, max_steps: int, **overrides) -> dict[str, np.ndarray]:
    """One episode of ``agent.policy``; per step the executed state, the plan (raw units), its value and reward."""
    policy = agent.policy(seed=seed, **overrides)
    obs, _ = env.reset(seed=seed)
    states, plans, values, rewards = [], [], [], []
    for _ in range(max_steps):
        action = policy.act(obs.astype(np.float32))
        plan = policy.actor.last_plan
        states.append(obs)
        plans.append(agent.obs_normalizer.denormalize(plan["states"][0]).numpy())
        if plan["values"] is not None:
            values.append(agent.return_normalizer.denormalize(plan["values"][0]).item())
        obs, reward, terminated, truncated, _ = env.step(action)
        rewards.append(reward)
        if terminated or truncated:
            break
    states.append(obs)
    return {"states": np.asarray(states), "plans": np.asarray(plans), "values": np.asarray(values),
            "rewards": np.asarray(rewards), "terminated": bool(terminated)}


def realised_returns(rewards: np.ndarray, terminated: bool, discount: float, penalty: float) -> np.ndarray:
    """Discounted return-to-go of every step of a rollout, with ``penalty`` on a terminal last step."""
    r = rewards.astype(float).copy()
    if terminated:
        r[-1] += penalty
    out, acc = np.zeros_like(r), 0.0
    for t in range(len(r) - 1, -1, -1):
        acc = r[t] + discount * acc
        out[t] = acc
    return out


def plot_pointnav(agent: PlannerAgent, episodes: int, seed: int, path: Path) -> Path:
    env = make_env("diffrl/PointNav-v0")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.add_patch(plt.Circle((0, 0), PointNavEnv.OBSTACLE_RADIUS, color="0.6", label="obstacle"))
    ax.add_patch(plt.Circle(tuple(PointNavEnv.GOAL), PointNavEnv.GOAL_RADIUS, color="tab:green", alpha=0.4,
                            label="goal"))
    for i in range(episodes):
        run = rollout_with_plans(agent, env, seed + i, 100)
        color = plt.cm.tab10(i % 10)
        for k, plan in enumerate(run["plans"][::3]):
            ax.plot(plan[:, 0], plan[:, 1], "--", color=color, lw=1.5 if k == 0 else 0.6, alpha=1 if k == 0 else 0.4)
        ax.plot(run["states"][:, 0], run["states"][:, 1], "-o", color=color, ms=2, lw=2,
                label=f"episode {i}: {len(run['rewards'])} steps" + (", goal" if run["terminated"] else ""))
    ax.set(xlim=(-1, 1), ylim=(-0.75, 0.75), aspect="equal", title="PointNav: plans (dashed) vs executed (solid)")
    ax.legend(fontsize=7, loc="lower left")
    env.close()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_returns(agent: PlannerAgent, dataset, seed: int, max_steps: int, path: Path) -> Path:
    env = make_env(dataset)
    run = rollout_with_plans(agent, env, seed, max_steps)
    env.close()
    c = agent.config
    realised = realised_returns(run["rewards"], run["terminated"], c.discount, c.termination_penalty)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(run["values"], label="predicted (return model, chosen plan)")
    ax1.plot(realised, label="realised (discounted, to the end of the rollout)")
    ax1.set(xlabel="env step", ylabel="discounted return-to-go", title=f"{dataset.name}: predicted vs realised")
    ax1.legend(fontsize=8)
    ax2.scatter(realised, run["values"], s=6)
    lo, hi = min(realised.min(), run["values"].min()), max(realised.max(), run["values"].max())
    ax2.plot([lo, hi], [lo, hi], "k--", lw=1)
    corr = np.corrcoef(realised, run["values"])[0, 1] if len(realised) > 2 else float("nan")
    ax2.set(xlabel="realised", ylabel="predicted", title=f"correlation {corr:.2f} ({len(realised)} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def load_or_train(task: str, dataset, checkpoint: str | None, steps: int, seed: int) -> PlannerAgent:
    agent = build_planner("diffuser", dataset, POINTNAV_OVERRIDES if task == "pointnav" else LOCOMOTION_OVERRIDES)
    if checkpoint:
        agent.load_state_dict(load_checkpoint(checkpoint, expected_kind=agent.kind)["agent"])
        return agent
    seed_everything(seed)
    Trainer(agent, agent.batch_sampler(dataset), TrainConfig(steps=steps, batch_size=64, seed=seed,
                                                             log_every=max(1, steps // 10))).fit()
    return agent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="pointnav", help="pointnav or a D4RL dataset name")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--max-episode-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    dataset = load_dataset("toy:pointnav" if args.task == "pointnav" else args.task)
    agent = load_or_train(args.task, dataset, args.checkpoint, args.steps, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"plans_{args.task}.png"
    if args.task == "pointnav":
        plot_pointnav(agent, args.episodes, args.seed + 1000, path)
    else:
        plot_returns(agent, dataset, args.seed + 1000, args.max_episode_steps, path)
    print(path)


if __name__ == "__main__":
    main()
