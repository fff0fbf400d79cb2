"""Run a policy as a fixed-rate controller in a Gymnasium env and report its timing.

Each tick reads the observation, calls ``policy.act`` and steps the env, then sleeps until the next tick. A tick
whose work ends after its deadline (start + period) counts as a deadline miss; the next tick then starts at once.
Reports the achieved rate and the mean, p99 and worst-case ``act`` latency.

    OMP_NUM_THREADS=1 python scripts/control_loop.py --env pointnav --rate 50 --seconds 10
    OMP_NUM_THREADS=1 python scripts/control_loop.py --env hopper --policy runs/.../policy.pt --rate 50
Without ``--policy`` a tiny DiffusionBC is trained on the env's dataset first (a few hundred steps).
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
import torch

from agents import DiffusionBC, DiffusionBCConfig
from agents.policy import Policy, load_policy
from diffrl.training import TrainConfig, Trainer
from envs.datasets import load_dataset
from envs.toy import POINTNAV_ID

ENVS = {"pointnav": (POINTNAV_ID, "toy:pointnav"), "hopper": ("Hopper-v5", "hopper-medium")}


def tiny_policy(dataset_spec: str, steps: int, solver: str, solver_steps: int) -> Policy:
    dataset = load_dataset(dataset_spec)
    agent = DiffusionBC.from_dataset(dataset, DiffusionBCConfig(ema_start=0))
    Trainer(agent, dataset.sample, TrainConfig(steps=steps, batch_size=256, log_every=steps, progress=False)).fit()
    return agent.policy(seed=0, solver=solver, steps=solver_steps)


def run(policy: Policy, env: gym.Env, rate: float, ticks: int, seed: int) -> dict:
    period = 1.0 / rate
    latencies, misses, episodes = np.empty(ticks), 0, 1
    obs, _ = env.reset(seed=seed)
    policy.reset()
    start = deadline = time.perf_counter()
    for i in range(ticks):
        deadline += period
        t0 = time.perf_counter()
        action = policy.act(obs)
        latencies[i] = time.perf_counter() - t0
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset()
            policy.reset()
            episodes += 1
        now = time.perf_counter()
        if now > deadline:
            misses += 1
            deadline = now  # start the next tick at once rather than bursting to catch up
        else:
            time.sleep(deadline - now)
    elapsed = time.perf_counter() - start
    us = latencies * 1e6
    return {"ticks": ticks, "target_hz": rate, "achieved_hz": ticks / elapsed, "episodes": episodes,
            "act_mean_us": us.mean(), "act_p99_us": np.percentile(us, 99), "act_max_us": us.max(),
            "deadline_misses": misses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", choices=sorted(ENVS), default="pointnav")
    parser.add_argument("--policy", default=None, help="a policy saved with Policy.save; default: train a tiny one")
    parser.add_argument("--rate", type=float, default=50.0, help="control rate in Hz")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--train-steps", type=int, default=500)
    parser.add_argument("--solver", default="ddpm")
    parser.add_argument("--steps", type=int, default=5, help="solver steps of the tiny policy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    env_id, dataset_spec = ENVS[args.env]
    policy = load_policy(args.policy) if args.policy else tiny_policy(dataset_spec, args.train_steps, args.solver,
                                                                        args.steps)
    env = gym.make(env_id)
    report = run(policy, env, args.rate, int(args.seconds * args.rate), args.seed)
    env.close()
    print(f"{args.env} at {report['target_hz']:.0f} Hz for {report['ticks']} ticks ({report['episodes']} episodes): "
          f"achieved {report['achieved_hz']:.1f} Hz")
    print(f"act latency: mean {report['act_mean_us']:.0f} us, p99 {report['act_p99_us']:.0f} us, "
          f"worst {report['act_max_us']:.0f} us; deadline misses: {report['deadline_misses']}")


if __name__ == "__main__":
    main()
