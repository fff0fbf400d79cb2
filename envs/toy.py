"""Small tasks that run in seconds: 2-D multimodal bandits and a two-route point-mass navigation env.

Bandits (``load_dataset("toy:bandit-<name>")``): a single constant observation, one-step episodes, 2-D actions in
[-1, 1]^2 drawn from a multimodal behaviour distribution, and a known reward ``r(a) = exp(-|a - a*|^2 / (2 s^2))``
with ``s = 0.3`` peaking at a documented in-support action ``a*`` (`Bandit.best_action`):

- ``8gaussians``: 8 Gaussian modes (std 0.05) on the circle of radius 0.8; best mode (0.8, 0).
- ``rings``: two rings of radius 0.4 and 0.8 (radial std 0.03); best (0.8, 0) on the outer ring.
- ``swissroll``: a 2-D spiral; best at its outer end (0, 0.9).
- ``moons``: two interleaved half circles; best at the top of the upper moon (-0.3, 0.45).

PointNav (``"diffrl/PointNav-v0"``, ``load_dataset("toy:pointnav")``): see `PointNavEnv`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from envs.datasets import OfflineDataset

ArrayLike = np.ndarray | torch.Tensor
REWARD_SCALE = 0.3


# --------------------------------------------------------------------------------------------- bandits
def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    angle = 2 * np.pi * rng.integers(0, 8, n) / 8
    return 0.8 * np.stack([np.cos(angle), np.sin(angle)], 1) + 0.05 * rng.standard_normal((n, 2))


def _rings(n: int, rng: np.random.Generator) -> np.ndarray:
    radius = np.where(rng.random(n) < 0.5, 0.4, 0.8) + 0.03 * rng.standard_normal(n)
    angle = rng.uniform(0, 2 * np.pi, n)
    return radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)


SWISSROLL_T = (1.5 * np.pi, 4.5 * np.pi)


def _swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    t = rng.uniform(*SWISSROLL_T, n)
    spiral = 0.9 * (t / SWISSROLL_T[1])[:, None] * np.stack([np.cos(t), np.sin(t)], 1)
    return spiral + 0.02 * rng.standard_normal((n, 2))


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    t = rng.uniform(0, np.pi, n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(t), 1 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    return 0.6 * np.stack([x - 0.5, y - 0.25], 1) + 0.03 * rng.standard_normal((n, 2))


@dataclass(frozen=True)
class Bandit:
    """A 2-D continuous bandit: behaviour sampler and a reward peaked at ``best_action``."""

    name: str
    sampler: Callable[[int, np.random.Generator], np.ndarray]
    best_action: tuple[float, float]

    def sample_actions(self, n: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
        """``n`` behaviour actions, float32 (n, 2), clipped to [-1, 1]."""
        rng = np.random.default_rng(rng)
        return np.clip(self.sampler(n, rng), -1.0, 1.0).astype(np.float32)

    def reward(self, actions: ArrayLike) -> ArrayLike:
        """``exp(-|a - a*|^2 / (2 * 0.3^2))`` for actions of shape (..., 2); numpy or torch in, same type out."""
        if isinstance(actions, torch.Tensor):
            best = torch.tensor(self.best_action, dtype=actions.dtype, device=actions.device)
            return torch.exp(-((actions - best) ** 2).sum(-1) / (2 * REWARD_SCALE**2))
        a = np.asarray(actions)
        return np.exp(-((a - np.asarray(self.best_action, dtype=a.dtype)) ** 2).sum(-1) / (2 * REWARD_SCALE**2))


BANDITS: dict[str, Bandit] = {
    b.name: b for b in (
        Bandit("8gaussians", _eight_gaussians, (0.8, 0.0)),
        Bandit("rings", _rings, (0.8, 0.0)),
        Bandit("swissroll", _swissroll, (0.0, 0.9)),
        Bandit("moons", _moons, (-0.3, 0.45)),
    )
}


def get_bandit(name: str) -> Bandit:
    key = name.removeprefix("toy:").removeprefix("bandit-")
    if key not in BANDITS:
        raise ValueError(f"unknown toy bandit {name!r}; available: {sorted(BANDITS)}")
    return BANDITS[key]


def bandit_reward_fn(name: str) -> Callable[[ArrayLike], ArrayLike]:
    """The known reward function ``r(a)`` of the bandit ``name`` (``"8gaussians"`` or ``"bandit-8gaussians"``)."""
    return get_bandit(name).reward


def make_bandit_dataset(name: str, n: int = 10_000, seed: int = 0) -> OfflineDataset:
    """One-step episodes: constant observation 0 (dim 1), behaviour action, reward ``r(a)``, terminal."""
    bandit = get_bandit(name)
    actions = bandit.sample_actions(n, seed)
    obs = np.zeros((n, 1), dtype=np.float32)
    return OfflineDataset(obs, actions, bandit.reward(actions), obs, np.ones(n, dtype=bool),
                          name=f"toy:bandit-{bandit.name}", source=f"toy:bandit-{bandit.name}")


# --------------------------------------------------------------------------------------------- point nav
class PointNavEnv(gym.Env):
    """2-D point mass moving from near (-0.8, 0) to a goal at (0.8, 0) around a disc obstacle at the origin.

    Observation: position (x, y) in [-1, 1]^2. Action: velocity in [-1, 1]^2, moving ``max_step`` per unit.
    A move that would enter the obstacle (radius 0.3) is cancelled (the point stays) and ``hit_obstacle`` is
    set with a penalty of 0.1. Reward = 10 * (decrease in distance to goal) - 0.01 per step, + 5 on reaching
    the goal (distance < 0.1), which terminates the episode. Going above or below the obstacle is equally good.
    """

    metadata = {"render_modes": []}
    START = np.array([-0.8, 0.0])
    GOAL = np.array([0.8, 0.0])
    OBSTACLE_RADIUS = 0.3
    GOAL_RADIUS = 0.1

    def __init__(self, max_step: float = 0.1, start_noise: float = 0.05) -> None:
        self.max_step, self.start_noise = max_step, start_noise
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._pos = self.START.copy()

    def _obs(self) -> np.ndarray:
        return self._pos.astype(np.float32)

    def _dist(self) -> float:
        return float(np.linalg.norm(self._pos - self.GOAL))

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._pos = self.START + self.np_random.uniform(-self.start_noise, self.start_noise, 2)
        return self._obs(), {"hit_obstacle": False, "reached_goal": False}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0)
        before = self._dist()
        new = np.clip(self._pos + self.max_step * a, -1.0, 1.0)
        hit = bool(np.linalg.norm(new) < self.OBSTACLE_RADIUS)
        if not hit:
            self._pos = new
        after = self._dist()
        reached = after < self.GOAL_RADIUS
        reward = 10.0 * (before - after) - 0.01 - 0.1 * hit + 5.0 * reached
        return self._obs(), float(reward), reached, False, {"hit_obstacle": hit, "reached_goal": reached}


POINTNAV_ID = "diffrl/PointNav-v0"
POINTNAV_MAX_STEPS = 100
if POINTNAV_ID not in gym.registry:
    gym.register(POINTNAV_ID, entry_point="envs.toy:PointNavEnv", max_episode_steps=POINTNAV_MAX_STEPS)

ROUTES = ("up", "down")


class PointNavExpert:
    """Scripted expert: heads for a waypoint above (``"up"``) or below (``"down"``) the obstacle until the straight
    line to the goal clears the obstacle, then for the goal.

    Follows the policy protocol (``reset()``, ``act(obs (n, 2)) -> (n, 2)``); Gaussian action noise ``noise``.
    """

    WAYPOINT_Y = 0.45
    CLEARANCE = 0.05

    def __init__(self, route: str = "up", noise: float = 0.0, seed: int | None = None, max_step: float = 0.1) -> None:
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        self.waypoint = np.array([0.0, self.WAYPOINT_Y if route == "up" else -self.WAYPOINT_Y])
        self.noise, self.max_step, self.rng = noise, max_step, np.random.default_rng(seed)

    def reset(self) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        pos = np.atleast_2d(np.asarray(obs, dtype=np.float64))[:, :2]
        to_goal = PointNavEnv.GOAL - pos
        t = np.clip(-(pos * to_goal).sum(-1) / (to_goal**2).sum(-1).clip(1e-12), 0.0, 1.0)
        clear = np.linalg.norm(pos + t[:, None] * to_goal, axis=-1) > PointNavEnv.OBSTACLE_RADIUS + self.CLEARANCE
        target = np.where(clear[:, None], PointNavEnv.GOAL, self.waypoint)
        delta = (target - pos) / self.max_step
        action = delta / np.maximum(np.abs(delta).max(-1, keepdims=True), 1.0)
        action = action + self.noise * self.rng.standard_normal(action.shape)
        return np.clip(action, -1.0, 1.0).astype(np.float32)


def episode_route(observations: ArrayLike) -> str | None:
    """Which side of the obstacle a trajectory of positions (T, >=2) passed: ``"up"``, ``"down"`` or None."""
    pos = np.asarray(observations.cpu() if isinstance(observations, torch.Tensor) else observations)[:, :2]
    near = np.abs(pos[:, 0]) < PointNavEnv.OBSTACLE_RADIUS
    if not near.any():
        return None
    return "up" if pos[near, 1].mean() > 0 else "down"


def dataset_routes(dataset: OfflineDataset) -> list[str | None]:
    """`episode_route` of every episode of a PointNav dataset."""
    obs = dataset.observations.numpy()
    return [episode_route(obs[s:e]) for s, e in dataset.episode_bounds()]


def make_pointnav_dataset(n_episodes: int = 200, seed: int = 0, noise: float = 0.3) -> OfflineDataset:
    """Scripted-expert PointNav data: even episodes go above the obstacle, odd ones below; action noise ``noise``."""
    env = gym.make(POINTNAV_ID)
    fields: dict[str, list] = {k: [] for k in ("obs", "act", "rew", "next", "term", "tout")}
    for ep in range(n_episodes):
        expert = PointNavExpert(ROUTES[ep % 2], noise=noise, seed=seed * 100_003 + ep)
        obs, _ = env.reset(seed=seed * 100_003 + ep)
        done = False
        while not done:
            action = expert.act(obs)[0]
            nxt, reward, terminated, truncated, _ = env.step(action)
            for k, v in zip(fields, (obs, action, reward, nxt, terminated, truncated), strict=True):
                fields[k].append(v)
            obs, done = nxt, terminated or truncated
    env.close()
    arrays = {k: np.asarray(v) for k, v in fields.items()}
    return OfflineDataset(arrays["obs"], arrays["act"], arrays["rew"], arrays["next"], arrays["term"],
                          arrays["tout"], name="toy:pointnav", env_id=POINTNAV_ID, source="toy:pointnav")


def known_names() -> list[str]:
    return ["toy:pointnav"] + [f"toy:bandit-{name}" for name in BANDITS]


def load_toy(name: str, **kw: Any) -> OfflineDataset:
    """``"pointnav"`` (kw: n_episodes, seed, noise) or ``"bandit-<variant>"`` (kw: n, seed)."""
    if name == "pointnav":
        return make_pointnav_dataset(**kw)
    if name.startswith("bandit-") and name[len("bandit-"):] in BANDITS:
        return make_bandit_dataset(name, **kw)
    close = difflib.get_close_matches(f"toy:{name}", known_names(), n=3, cutoff=0.4)
    raise ValueError(f"unknown toy dataset 'toy:{name}'; available: {known_names()}"
                     + (f". Did you mean: {', '.join(close)}?" if close else ""))
