"""Policy evaluation in vectorised Gymnasium envs, and an adapter for stable-baselines3's `evaluate_policy`.

Policy protocol: ``policy.reset()`` (optional) and ``policy.act(obs) -> actions`` with ``obs`` a float32 array
(n, obs_dim) and actions an array or tensor (n, act_dim). A plain callable ``obs -> actions`` also works.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import SyncVectorEnv
from tqdm.auto import tqdm

from envs import d4rl, maze
from envs.datasets import OfflineDataset, normalized_score
from envs.minari_io import make_env

EnvSpec = str | OfflineDataset | gym.Env | Callable[[], gym.Env]


@dataclass
class EvalResult:
    """Per-episode returns and lengths, their mean and standard error, and D4RL-normalised scores if known."""

    returns: np.ndarray
    lengths: np.ndarray
    normalized: np.ndarray | None
    mean: float
    stderr: float
    normalized_mean: float | None
    normalized_stderr: float | None

    @classmethod
    def from_episodes(cls, returns: np.ndarray, lengths: np.ndarray,
                      ref_scores: tuple[float, float] | None) -> EvalResult:
        normalized = normalized_score(returns, *ref_scores) if ref_scores else None
        return cls(returns, lengths, normalized, float(returns.mean()), _stderr(returns),
                   None if normalized is None else float(normalized.mean()),
                   None if normalized is None else _stderr(normalized))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (arrays as lists)."""
        return {
            "returns": self.returns.tolist(), "lengths": self.lengths.tolist(),
            "normalized": None if self.normalized is None else self.normalized.tolist(),
            "mean": self.mean, "stderr": self.stderr,
            "normalized_mean": self.normalized_mean, "normalized_stderr": self.normalized_stderr,
        }


def _stderr(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def _policy_actions(policy: Any, obs: np.ndarray) -> np.ndarray:
    act = policy.act(obs) if hasattr(policy, "act") else policy(obs)
    if isinstance(act, torch.Tensor):
        act = act.detach().cpu().numpy()
    return np.asarray(act, dtype=np.float32)


def _reset_policy(policy: Any) -> None:
    if hasattr(policy, "reset"):
        policy.reset()


def _flat_obs(factory: Callable[[], gym.Env]) -> Callable[[], gym.Env]:
    """Flatten Dict/Tuple observations (same order as datasets loaded from Minari)."""
    def make() -> gym.Env:
        env = factory()
        if isinstance(env.observation_space, gym.spaces.Box):
            return env
        return gym.wrappers.FlattenObservation(env)
    return make


def _resolve_env(env: EnvSpec, max_episode_steps: int | None,
                 trust_env: bool = False) -> tuple[Callable[[], gym.Env], OfflineDataset | None]:
    kwargs = {"max_episode_steps": max_episode_steps} if max_episode_steps else {}
    if isinstance(env, str) and maze.is_maze(env):
        env = maze.maze_spec(env).env_id  # maze2d-umaze -> D4RL's maze2d-v1 evaluation task on PointMaze
    if isinstance(env, (str, OfflineDataset)):
        return (lambda: make_env(env, trust_env, **kwargs)), (env if isinstance(env, OfflineDataset) else None)
    if isinstance(env, gym.Env):
        return (lambda: env), None
    if callable(env):
        return env, None
    raise TypeError(f"env must be an env id, an OfflineDataset, a gymnasium.Env or an env factory, got {type(env)}")


def _check_spaces(env: gym.Env, dataset: OfflineDataset | None) -> None:
    obs_space, act_space = env.observation_space, env.action_space
    env_name = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
    if not isinstance(act_space, gym.spaces.Box):
        raise ValueError(f"env {env_name!r}: only continuous (Box) action spaces are supported, got {act_space}")
    if dataset is None:
        return
    env_obs, env_act = int(np.prod(obs_space.shape)), int(np.prod(act_space.shape))
    if (env_obs, env_act) != (dataset.obs_dim, dataset.act_dim):
        raise ValueError(
            f"shape mismatch: dataset {dataset.name!r} has obs_dim={dataset.obs_dim}, act_dim={dataset.act_dim} "
            f"but env {env_name!r} has observation shape {obs_space.shape}, action shape {act_space.shape}")


def check_env(dataset: OfflineDataset, trust_env: bool = False, env: str | None = None) -> None:
    """Build the evaluation environment (``env``, an id or dataset name; default: the dataset's) once and check
    that its spaces fit the data (before any training)."""
    made = _flat_obs(_resolve_env(dataset if env is None else env, None, trust_env)[0])()
    try:
        _check_spaces(made, dataset)
    finally:
        made.close()


def evaluate(
    policy: Any,
    env: EnvSpec,
    episodes: int = 10,
    seed: int = 0,
    num_envs: int | None = None,
    max_episode_steps: int | None = None,
    progress: bool = False,
    ref_scores: tuple[float, float] | None = None,
    trust_env: bool = False,
) -> EvalResult:
    """Roll out ``policy`` for ``episodes`` episodes and return their returns, lengths and normalised scores.

    ``env``: a Gymnasium id or D4RL/Minari/toy name, an `OfflineDataset` (its env, with a shape check), a
    ``gymnasium.Env`` instance (then one env at a time; it is closed afterwards) or a zero-argument env
    factory. ``num_envs`` envs
    (default ``min(episodes, 10)``) run in a `SyncVectorEnv`; each runs exactly one episode per batch, the
    policy is ``reset()`` before each batch, finished envs are masked (their rows keep the final observation;
    nothing after the end is counted). Episode ``i`` is seeded with ``seed + i``, so results do not depend on
    ``num_envs`` for a deterministic policy. Actions are clipped to the action space. The normalised score
    uses ``ref_scores``, else the dataset's reference scores, else D4RL's for the env's robot or maze. A maze name
    (``maze2d-umaze``, ``-medium``, ``-large``) is D4RL's maze2d-v1 evaluation (`envs.maze`): random start, the
    maze's fixed goal, whose full state ``envs.maze.eval_goal_state(name)`` a goal-conditioned planner is given.
    ``trust_env`` lets a Minari dataset's environment run the entry point the dataset records (see `envs.minari_io`).
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    factory, dataset = _resolve_env(env, max_episode_steps, trust_env)
    n = 1 if isinstance(env, gym.Env) else min(num_envs or min(episodes, 10), episodes)
    vec = SyncVectorEnv([_flat_obs(factory) for _ in range(n)])
    try:
        _check_spaces(vec.envs[0], dataset)
        if ref_scores is None and dataset is not None and dataset.ref_min_score is not None:
            ref_scores = (dataset.ref_min_score, dataset.ref_max_score)
        if ref_scores is None and vec.envs[0].spec is not None:
            ref_scores = d4rl.ref_scores(vec.envs[0].spec.id) or maze.ref_scores(vec.envs[0].spec.id)
        returns, lengths = _rollout(policy, vec, episodes, seed, max_episode_steps, progress)
    finally:
        vec.close()
    return EvalResult.from_episodes(returns, lengths, ref_scores)


def _rollout(policy: Any, vec: SyncVectorEnv, episodes: int, seed: int, max_episode_steps: int | None,
             progress: bool) -> tuple[np.ndarray, np.ndarray]:
    n = vec.num_envs
    space = vec.single_action_space
    returns, lengths = np.zeros(episodes), np.zeros(episodes, dtype=np.int64)
    with tqdm(total=episodes, disable=not progress, desc="evaluate") as bar:
        for first in range(0, episodes, n):
            k = min(n, episodes - first)
            obs, _ = vec.reset(seed=[seed + first + i for i in range(n)])
            obs = obs.astype(np.float32)
            _reset_policy(policy)
            active = np.arange(n) < k
            ret, length = np.zeros(n), np.zeros(n, dtype=np.int64)
            while active.any():
                action = _policy_actions(policy, obs)
                if action.shape != (n, *space.shape):
                    raise ValueError(f"policy.act returned actions of shape {action.shape} for observations of "
                                     f"shape {obs.shape}; expected {(n, *space.shape)}")
                next_obs, reward, terminated, truncated, _ = vec.step(np.clip(action, space.low, space.high))
                ret += np.where(active, reward, 0.0)
                length += active
                done = terminated | truncated
                if max_episode_steps is not None:
                    done |= length >= max_episode_steps
                bar.update(int((active & done).sum()))
                active &= ~done
                keep = active.reshape(-1, *([1] * (obs.ndim - 1)))
                obs = np.where(keep, next_obs.astype(np.float32), obs)
            returns[first:first + k], lengths[first:first + k] = ret[:k], length[:k]
    return returns, lengths


class SB3PolicyAdapter:
    """Wraps a policy (obs -> action protocol) with SB3's ``predict`` so `evaluate_policy` accepts it.

    When some environments start an episode (``episode_start``), only their state is reset: a policy with
    ``reset_envs(mask)`` (``agents.policy.Policy``) clears the observation history and the queued actions of those
    rows and keeps the others'; any other policy is ``reset()`` whenever an environment starts an episode.
    ``deterministic`` is ignored (the policy decides how it samples). A 1-D observation is treated as a single
    unbatched observation.
    """

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def predict(self, observation: np.ndarray, state: Any = None, episode_start: np.ndarray | None = None,
                deterministic: bool = True) -> tuple[np.ndarray, Any]:
        obs = np.asarray(observation, dtype=np.float32)
        single = obs.ndim == 1
        starts = np.zeros(1 if single else len(obs), dtype=bool) if episode_start is None else \
            np.asarray(episode_start, dtype=bool).reshape(-1)
        if starts.any():
            reset_envs = getattr(self.policy, "reset_envs", None)
            if reset_envs is not None:
                reset_envs(starts)
            else:
                _reset_policy(self.policy)
        actions = _policy_actions(self.policy, obs[None] if single else obs)
        return (actions[0] if single else actions), state
