"""Behaviour datasets from a stable-baselines3 SAC agent trained online, written as D4RL HDF5 and/or Minari.

Levels (as in D4RL): ``random`` = uniform actions; ``medium`` = the saved SAC snapshot whose deterministic
evaluation return is closest to half the final one; ``medium-replay`` = SAC's replay buffer up to that snapshot;
``expert`` = the final SAC policy; ``medium-expert`` = medium rollouts followed by expert rollouts. Rollouts
sample actions stochastically from the policy.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback

from envs import d4rl
from envs.datasets import OfflineDataset, concatenate
from envs.evaluation import evaluate
from envs.minari_io import make_env, write_minari

LEVELS = ("random", "medium", "medium-replay", "expert", "medium-expert")
FORMATS = ("hdf5", "minari")


@dataclass
class _Snapshot:
    step: int  # environment steps taken when saved (= replay buffer size)
    actor: dict
    eval_return: float = float("nan")


class _SnapshotCallback(BaseCallback):
    """Keeps a copy of the actor weights every ``every`` environment steps."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every, self.snapshots = every, []

    def _on_step(self) -> bool:
        if self.num_timesteps % self.every == 0:
            self.snapshots.append(_Snapshot(self.num_timesteps, copy.deepcopy(self.model.actor.state_dict())))
        return True


class _SB3Actor:
    """SB3 model as a policy (protocol of `envs.evaluation`)."""

    def __init__(self, model: SAC, deterministic: bool) -> None:
        self.model, self.deterministic = model, deterministic

    def reset(self) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.model.predict(obs, deterministic=self.deterministic)[0]


def rollout_dataset(env_id: str, act: Callable[[np.ndarray], np.ndarray], n_transitions: int, seed: int,
                    name: str) -> OfflineDataset:
    """``n_transitions`` steps of ``act(obs (1, d)) -> (1, a)`` in fresh episodes; the last one is cut (timeout)."""
    env = make_env(env_id)
    fields: dict[str, list] = {k: [] for k in ("obs", "act", "rew", "next", "term", "tout")}
    obs, _ = env.reset(seed=seed)
    episode = 0
    for _ in range(n_transitions):
        action = np.asarray(act(obs[None]), dtype=np.float32).reshape(env.action_space.shape)
        nxt, reward, terminated, truncated, _ = env.step(action)
        for k, v in zip(fields, (obs, action, reward, nxt, terminated, truncated), strict=True):
            fields[k].append(v)
        obs = nxt
        if terminated or truncated:
            episode += 1
            obs, _ = env.reset(seed=seed + episode)
    env.close()
    fields["tout"][-1] = not fields["term"][-1]
    a = {k: np.asarray(v) for k, v in fields.items()}
    ref = d4rl.ref_scores(env_id) or (None, None)
    return OfflineDataset(a["obs"], a["act"], a["rew"], a["next"], a["term"], a["tout"], name=name, env_id=env_id,
                          ref_min_score=ref[0], ref_max_score=ref[1])


def _replay_dataset(model: SAC, size: int, env_id: str, name: str) -> OfflineDataset:
    """The first ``size`` transitions of SAC's replay buffer (env 0), actions mapped back to the env's range."""
    rb = model.replay_buffer
    dones, timeouts = rb.dones[:size, 0].astype(bool), rb.timeouts[:size, 0].astype(bool)
    actions = model.policy.unscale_action(rb.actions[:size, 0])
    ref = d4rl.ref_scores(env_id) or (None, None)
    return OfflineDataset(rb.observations[:size, 0], actions, rb.rewards[:size, 0], rb.next_observations[:size, 0],
                          dones & ~timeouts, timeouts, name=name, env_id=env_id,
                          ref_min_score=ref[0], ref_max_score=ref[1])


def train_sac(env_id: str, train_steps: int, seed: int, snapshots: int = 10, eval_episodes: int = 5,
              progress: bool = False) -> tuple[SAC, list[_Snapshot]]:
    """Train SAC online, keeping ``snapshots`` evaluated actor copies (the last one is the final policy)."""
    env = make_env(env_id)
    model = SAC("MlpPolicy", env, seed=seed, buffer_size=train_steps + 1,
                learning_starts=min(1000, max(train_steps // 10, 1)), verbose=0)
    callback = _SnapshotCallback(max(train_steps // snapshots, 1))
    model.learn(train_steps, callback=callback, progress_bar=progress)
    final = model.actor.state_dict()
    snaps = callback.snapshots
    if not snaps or snaps[-1].step != model.num_timesteps:
        snaps.append(_Snapshot(model.num_timesteps, copy.deepcopy(final)))
    policy = _SB3Actor(model, deterministic=True)
    for i, snap in enumerate(snaps):
        model.actor.load_state_dict(snap.actor)
        snap.eval_return = evaluate(policy, env_id, episodes=eval_episodes, seed=seed + 10_000 * (i + 1)).mean
    model.actor.load_state_dict(final)
    env.close()
    return model, snaps


def _medium_index(snaps: list[_Snapshot]) -> int:
    """Snapshot (excluding the final one when possible) whose return is closest to half the final return."""
    target = snaps[-1].eval_return / 2
    candidates = snaps[:-1] or snaps
    return int(np.argmin([abs(s.eval_return - target) for s in candidates]))


def collect(
    env_id: str,
    level: str | Sequence[str] = "medium",
    n_transitions: int = 100_000,
    train_steps: int = 150_000,
    seed: int = 0,
    out_dir: str | os.PathLike = "datasets",
    formats: Sequence[str] = FORMATS,
    snapshots: int = 10,
    eval_episodes: int = 5,
    progress: bool = False,
) -> dict[str, dict[str, str]]:
    """Collect behaviour data for one or several ``level``s of ``env_id`` (SAC is trained once if needed).

    Writes ``<out_dir>/<robot>-<level>.hdf5`` (D4RL layout, attrs env_id, D4RL reference scores when known,
    behaviour) and/or the Minari dataset ``diffrl/<robot>/<level>-v0`` in Minari's local storage (replaced if
    it exists). Returns ``{level: {"hdf5": path, "minari": dataset_id}}``.
    """
    levels = [level] if isinstance(level, str) else list(level)
    for lv in levels:
        if lv not in LEVELS:
            raise ValueError(f"unknown level {lv!r}; choose from {LEVELS}")
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    if env_id not in gym.registry:
        raise ValueError(f"unknown Gymnasium env id {env_id!r}")
    robot = env_id.split("/")[-1].split("-v")[0].lower()
    model = snaps = None
    if any(lv != "random" for lv in levels):
        model, snaps = train_sac(env_id, train_steps, seed, snapshots, eval_episodes, progress)

    rollouts: dict[str, OfflineDataset] = {}

    def policy_rollout(kind: str) -> OfflineDataset:
        """Stochastic rollouts of the medium or final ("expert") snapshot, made once and seeded."""
        if kind not in rollouts:
            offset = 1_000_000 if kind == "medium" else 2_000_000
            model.actor.load_state_dict(snaps[_medium_index(snaps)].actor if kind == "medium" else snaps[-1].actor)
            torch.manual_seed(seed + offset)  # SB3 samples stochastic actions from torch's global generator
            rollouts[kind] = rollout_dataset(env_id, _SB3Actor(model, deterministic=False).act, n_transitions,
                                             seed + offset, f"{robot}-{kind}")
        return rollouts[kind]

    out: dict[str, dict[str, str]] = {}
    for lv in levels:
        name = f"{robot}-{lv}"
        if lv == "random":
            space = make_env(env_id).action_space
            space.seed(seed)
            data = rollout_dataset(env_id, lambda obs, s=space: s.sample()[None], n_transitions, seed, name)
        elif lv == "medium-replay":
            data = _replay_dataset(model, snaps[_medium_index(snaps)].step, env_id, name)
        elif lv == "medium-expert":
            data = concatenate([policy_rollout("medium"), policy_rollout("expert")], name=name)
        else:
            data = policy_rollout(lv)
        out[lv] = _write(data, lv, robot, out_dir, formats)
    return out


def _write(data: OfflineDataset, level: str, robot: str, out_dir: str | os.PathLike,
           formats: Sequence[str]) -> dict[str, str]:
    written = {}
    if "hdf5" in formats:
        path = Path(out_dir) / f"{data.name}.hdf5"
        d4rl.write_d4rl_hdf5(path, data, behaviour=level)
        written["hdf5"] = str(path)
    if "minari" in formats:
        dataset_id = f"diffrl/{robot}/{level}-v0"
        write_minari(data, dataset_id, replace=True, algorithm_name=f"SAC ({level})", author="diffrl",
                     description=f"{level} behaviour data for {data.env_id} collected with envs.collect")
        written["minari"] = dataset_id
    return written
