"""PushT (the ``gym-pusht`` package): a scripted expert, demonstration datasets and evaluation by coverage.

The package ships only mouse teleoperation, so demonstrations come from :class:`PushTExpert`, a privileged planner
that reads the simulator's bodies. It repeats one primitive until the episode ends: choose a push by simulating
candidates on a private copy of the scene (contact points spread over the T's outline; push directions along the
inward normal and tilted by ``tilt`` degrees either way, also by half of that near the goal; each pushed for up to
``push_steps`` steps at a speed that shrinks with the remaining error; the candidate and push length with the lowest
pose error win), walk to the push's start around the block (out of a circle that holds the T, along it, then in
along the contact's normal), push, repeat. The pose error is the mean distance of the T's eight outline corners to
the goal's. On env seeds 0..109 it succeeds in 96% of episodes (about 1-2 s each on one core).

Observations: ``"state"`` (agent x, y, block x, y, angle; 5-d) or ``"image"`` (96x96 RGB images stored as uint8
(C, H, W) next to the agent position, the layout of ``agents.diffusion_policy`` with ``cameras=("image",)``).
Actions are the agent's target positions in [0, 512]^2; the reward is the package's (coverage / 0.95, clipped).
An episode succeeds when the coverage of the goal exceeds 0.95 (the environment then terminates); evaluations report
the success rate and the mean of each episode's maximum coverage, as Chi et al. 2023 do.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from envs import d4rl
from envs.datasets import OfflineDataset, SequenceDataset

ENV_ID = "gym_pusht/PushT-v0"
MAX_STEPS = 300
SUCCESS_COVERAGE = 0.95
OBS_TYPES = ("state", "image")
AGENT_RADIUS = 15.0
#: Outline of the T in its body frame (scale 30, as the package's ``add_tee``), counter-clockwise.
T_OUTLINE = np.array([(-60, 0), (60, 0), (60, 30), (15, 30), (15, 120), (-15, 120), (-15, 30), (-60, 30)], float)
T_COG = np.array([0.0, 45.0])


def _require() -> Any:
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    try:
        import gym_pusht  # noqa: F401
        from gym_pusht.envs.pusht import PushTEnv
    except ImportError as err:
        raise ImportError("PushT needs the gym-pusht package: pip install 'diffrl[pusht]'") from err
    return PushTEnv


def make_env(obs_type: str = "state") -> Any:
    """The raw PushT environment (no time limit wrapper; episodes are cut at ``MAX_STEPS`` here)."""
    if obs_type not in OBS_TYPES:
        raise ValueError(f"obs_type must be one of {OBS_TYPES}, got {obs_type!r}")
    return _require()(obs_type="state" if obs_type == "state" else "pixels_agent_pos")


def _rot(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def outline(pose: np.ndarray) -> np.ndarray:
    """World corners (8, 2) of the T at ``pose`` = (x, y, angle) of its body."""
    return T_OUTLINE @ _rot(pose[2]).T + pose[:2]


GOAL_POSE = np.array([256.0, 256.0, math.pi / 4])
GOAL_OUTLINE = outline(GOAL_POSE)


def pose_error(pose: np.ndarray) -> float:
    """Mean distance (pixels) of the T's outline corners at ``pose`` to those at the goal."""
    return float(np.linalg.norm(outline(pose) - GOAL_OUTLINE, axis=1).mean())


def _seg_dist(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of each point (N, 2) to the segment a-b."""
    d = b - a
    t = np.clip(((points - a) @ d) / max(float(d @ d), 1e-12), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[:, None] * d), axis=1)


def _inside(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule: which points (N, 2) lie inside the polygon (M, 2)."""
    x, y = points[:, 0:1], points[:, 1:2]
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    crosses = ((y1 > y) != (y2 > y)) & (x < (x2 - x1) * (y - y1) / np.where(y2 == y1, 1e-12, y2 - y1) + x1)
    return crosses.sum(axis=1) % 2 == 1


def clearance(points: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Signed distance of points (N, 2) to the T's outline ``corners`` (negative inside)."""
    d = np.min([_seg_dist(points, corners[i], corners[(i + 1) % len(corners)]) for i in range(len(corners))], axis=0)
    return np.where(_inside(points, corners), -d, d)


def _path_clear(a: np.ndarray, b: np.ndarray, corners: np.ndarray, margin: float) -> bool:
    n = max(2, int(np.linalg.norm(b - a) / 4.0) + 1)
    points = a + np.linspace(0.0, 1.0, n)[:, None] * (b - a)
    return bool(clearance(points, corners).min() > margin)


class _Sim:
    """A private copy of the scene for look-ahead: set bodies, step the package's PD control without rendering."""

    def __init__(self) -> None:
        self.env = make_env("state")
        self.env.reset(seed=0)

    def set(self, agent: np.ndarray, pose: np.ndarray) -> None:
        """The agent at rest at ``agent``, the block at rest at ``pose``."""
        e = self.env
        e.agent.position, e.agent.velocity = (float(agent[0]), float(agent[1])), (0.0, 0.0)
        e.block.position = (float(pose[0]), float(pose[1]))
        e.block.angle = float(pose[2])
        e.block.velocity, e.block.angular_velocity = (0.0, 0.0), 0.0

    def step(self, target: np.ndarray) -> None:
        e = self.env
        tx, ty = float(target[0]), float(target[1])
        for _ in range(int(1 / (e.dt * e.control_hz))):
            vx, vy = e.agent.velocity
            px, py = e.agent.position
            e.agent.velocity = (vx + (e.k_p * (tx - px) - e.k_v * vx) * e.dt,
                                vy + (e.k_p * (ty - py) - e.k_v * vy) * e.dt)
            e.space.step(e.dt)

    def pose(self) -> np.ndarray:
        b = self.env.block
        return np.array([b.position[0], b.position[1], b.angle])


def bodies(env: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(agent position, agent velocity, block pose) read from a PushT environment (wrapped or not)."""
    e = env.unwrapped
    return (np.array(e.agent.position), np.array(e.agent.velocity),
            np.array([e.block.position[0], e.block.position[1], e.block.angle]))


@dataclass
class Push:
    """One primitive: the path to the push's start, then the push's targets; ``error`` is the predicted pose error."""

    approach: list[np.ndarray]
    push: list[np.ndarray]
    error: float


class PushTExpert:
    """Sampling-based pushing planner with privileged access to the simulator (see the module docstring).

    ``act(env)`` returns the next target position; it replans a push whenever the last one has been executed.
    ``noise`` (pixels) perturbs each chosen push's targets, for more varied demonstrations.
    """

    def __init__(self, tilt: float = 30.0, push_steps: int = 10, gap: float = 3.0, travel_speed: float = 25.0,
                 noise: float = 0.0, seed: int = 0) -> None:
        self.tilt, self.push_steps, self.gap, self.travel_speed = tilt, push_steps, gap, travel_speed
        self.noise, self.rng = noise, np.random.default_rng(seed)
        self.sim = _Sim()
        edges = []
        for i in range(len(T_OUTLINE)):
            a, b = T_OUTLINE[i], T_OUTLINE[(i + 1) % len(T_OUTLINE)]
            d = b - a
            length = float(np.linalg.norm(d))
            normal = np.array([d[1], -d[0]]) / length
            for t in (np.arange(max(2, round(length / 12))) + 0.5) / max(2, round(length / 12)):
                edges.append((a + t * d, normal))
        self.contacts = np.array([c for c, _ in edges])  # body frame
        self.normals = np.array([n for _, n in edges])
        self.queue: list[np.ndarray] = []

    def reset(self) -> None:
        self.queue = []

    def plan(self, agent: np.ndarray, pose: np.ndarray) -> Push:
        """The best push from the current bodies and the path to it."""
        rot = _rot(pose[2])
        corners = outline(pose)
        contacts = self.contacts @ rot.T + pose[:2]
        normals = self.normals @ rot.T
        starts = contacts + normals * (AGENT_RADIUS + self.gap)
        ok = (clearance(starts, corners) > AGENT_RADIUS + 0.5) & (starts >= 20).all(1) & (starts <= 492).all(1)
        error0 = pose_error(pose)
        speed = float(np.clip(0.3 * error0, 1.0, 20.0))
        fine = error0 < 10  # near the goal: finer push directions
        tilts = (-1.0, -0.5, 0.0, 0.5, 1.0) if fine else (-1.0, 0.0, 1.0)
        best: Push | None = None
        for i in np.flatnonzero(ok):
            for tilt in tilts:
                direction = -normals[i] @ _rot(math.radians(tilt * self.tilt)).T
                self.sim.set(starts[i], pose)
                targets = []
                for k in range(1, self.push_steps + 1):
                    targets.append(starts[i] + direction * speed * k)
                    self.sim.step(targets[-1])
                    err = pose_error(self.sim.pose())
                    if best is None or err < best.error:
                        best = Push([starts[i]], list(targets), err)
        if best is None:  # nowhere to push from: step towards the middle of the table
            return Push([], [np.array([256.0, 256.0])], error0)
        best.approach = self.route(agent, best.approach[0], pose, corners)
        return best

    def route(self, agent: np.ndarray, start: np.ndarray, pose: np.ndarray, corners: np.ndarray) -> list[np.ndarray]:
        """Waypoints from ``agent`` to the push's ``start``: straight if clear, else out, around the T, in."""
        margin = AGENT_RADIUS + 2.0
        if _path_clear(agent, start, corners, margin):
            return [start]
        cog = pose[:2] + _rot(pose[2]) @ T_COG
        radius = float(np.linalg.norm(T_OUTLINE - T_COG, axis=1).max()) + AGENT_RADIUS + 12.0
        # out: the direction closest to radial whose path to the circle is clear
        radial = math.atan2(*(agent - cog)[::-1])
        out = None
        for offset in sorted(np.linspace(-math.pi, math.pi, 24, endpoint=False), key=abs):
            u = np.array([math.cos(radial + offset), math.sin(radial + offset)])
            rel = agent - cog
            # distance along u to reach the circle from inside (or 10 px when already outside)
            b, c = float(rel @ u), float(rel @ rel) - radius**2
            length = max(-b + math.sqrt(max(b * b - c, 0.0)), 10.0)
            point = agent + u * length
            if _path_clear(agent, point, corners, AGENT_RADIUS):
                out = point
                break
        if out is None:
            out = agent
        # in: from the circle along the push start's outward direction
        rel = start - cog
        normal = start - _nearest_on_outline(start, corners)
        normal = normal / max(float(np.linalg.norm(normal)), 1e-9)
        b, c = float(rel @ normal), float(rel @ rel) - radius**2
        entry = start + normal * max(-b + math.sqrt(max(b * b - c, 0.0)), 0.0)
        a0, a1 = math.atan2(*(out - cog)[::-1]), math.atan2(*(entry - cog)[::-1])
        delta = (a1 - a0 + math.pi) % (2 * math.pi) - math.pi
        n = max(1, int(abs(delta) / math.radians(20)))
        arc = [cog + radius * np.array([math.cos(a0 + delta * j / n), math.sin(a0 + delta * j / n)])
               for j in range(1, n)]
        return [np.clip(p, 15.0, 497.0) for p in [out, *arc, entry]] + [start]

    def _densify(self, points: list[np.ndarray], origin: np.ndarray) -> list[np.ndarray]:
        """Targets at most ``travel_speed`` apart along the polyline, the last ones slower, the end held once."""
        out, here = [], origin
        for i, p in enumerate(points):
            speed = self.travel_speed if i < len(points) - 1 else self.travel_speed / 2
            n = max(1, int(math.ceil(np.linalg.norm(p - here) / speed)))
            out += [here + (p - here) * (k / n) for k in range(1, n + 1)]
            here = p
        return out + [points[-1]] if points else out

    def act(self, env: Any) -> np.ndarray:
        """The next target position for the PushT environment ``env``."""
        if not self.queue:
            agent, _, pose = bodies(env)
            push = self.plan(agent, pose)
            push_targets = push.push
            if self.noise > 0:
                push_targets = [t + self.rng.normal(0.0, self.noise, 2) for t in push_targets]
            self.queue = self._densify(push.approach, agent) + push_targets
        return np.clip(self.queue.pop(0), 0.0, 512.0).astype(np.float32)


def _nearest_on_outline(point: np.ndarray, corners: np.ndarray) -> np.ndarray:
    best, best_d = corners[0], math.inf
    for i in range(len(corners)):
        a, b = corners[i], corners[(i + 1) % len(corners)]
        d = b - a
        t = float(np.clip((point - a) @ d / float(d @ d), 0.0, 1.0))
        q = a + t * d
        dist = float(np.linalg.norm(point - q))
        if dist < best_d:
            best, best_d = q, dist
    return best


# ------------------------------------------------------------------------------------------------ demonstrations
@dataclass
class Demos:
    """Demonstrations: the state dataset (5-d observations), and with images (N, 3, 96, 96) uint8 per step."""

    dataset: OfflineDataset
    images: np.ndarray | None
    stats: dict[str, Any]

    @property
    def agent_pos(self) -> np.ndarray:
        """The image variant's low-dimensional observation: the agent position (first two state entries)."""
        return self.dataset.observations[:, :2].numpy()


def _image(env: Any) -> np.ndarray:
    return np.ascontiguousarray(env.unwrapped._render().transpose(2, 0, 1))


def run_expert_episode(env: Any, expert: PushTExpert, seed: int, images: bool = False,
                       max_steps: int = MAX_STEPS) -> dict[str, Any]:
    """One expert episode from ``env.reset(seed=seed)``: observations, actions, rewards, frames, coverage, success."""
    obs, _ = env.reset(seed=seed)
    expert.reset()
    rows: dict[str, list] = {"observations": [], "actions": [], "rewards": [], "images": []}
    best, success = 0.0, False
    for _ in range(max_steps):
        rows["observations"].append(np.asarray(obs, dtype=np.float64))
        if images:
            rows["images"].append(_image(env))
        action = expert.act(env)
        obs, reward, terminated, _, info = env.step(action)
        rows["actions"].append(action)
        rows["rewards"].append(reward)
        best = max(best, float(info["coverage"]))
        if terminated:
            success = True
            break
    return {**rows, "max_coverage": best, "success": success}


def collect_demos(n_episodes: int, seed: int = 0, images: bool = False, successful_only: bool = True,
                  noise: float = 0.0, log: Callable[[str], Any] | None = None) -> Demos:
    """Expert episodes from env seeds ``seed, seed + 1, ...`` (``n_episodes`` tried); with ``successful_only`` only
    the successful ones are kept. ``stats`` holds the expert's success rate and mean max coverage over all tried."""
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    env, expert = make_env("state"), PushTExpert(noise=noise, seed=seed)
    kept, coverages, successes, start = [], [], [], time.perf_counter()
    for i in range(n_episodes):
        episode = run_expert_episode(env, expert, seed + i, images)
        coverages.append(episode["max_coverage"])
        successes.append(episode["success"])
        if episode["success"] or not successful_only:
            kept.append(episode)
        if log is not None:
            log(f"episode {i + 1}/{n_episodes}: {len(episode['actions'])} steps, max coverage "
                f"{episode['max_coverage']:.3f}, success {episode['success']}")
    if not kept:
        raise RuntimeError(f"the expert succeeded in none of {n_episodes} episodes; nothing to keep")
    cat = {k: np.concatenate([np.asarray(e[k]) for e in kept]) for k in ("observations", "actions", "rewards")}
    terminals = np.concatenate([np.arange(len(e["actions"])) == len(e["actions"]) - 1 if e["success"]
                                else np.zeros(len(e["actions"]), bool) for e in kept])
    timeouts = np.concatenate([np.zeros(len(e["actions"]), bool) if e["success"]
                               else np.arange(len(e["actions"])) == len(e["actions"]) - 1 for e in kept])
    dataset = OfflineDataset(cat["observations"], cat["actions"], cat["rewards"], terminals=terminals,
                             timeouts=timeouts, name="pusht-expert", env_id=ENV_ID)
    frames = np.concatenate([np.stack(e["images"]) for e in kept]).astype(np.uint8) if images else None
    stats = {"tried": n_episodes, "kept": len(kept), "transitions": len(dataset), "seed": seed,
             "successful_only": successful_only, "success_rate": float(np.mean(successes)),
             "mean_max_coverage": float(np.mean(coverages)), "seconds": time.perf_counter() - start}
    return Demos(dataset, frames, stats)


def write_demos(path: str | os.PathLike, demos: Demos) -> Path:
    """D4RL-layout HDF5 (readable by ``envs.load_dataset``) with the images as an extra uint8 ``images`` group."""
    path = d4rl.write_d4rl_hdf5(path, demos.dataset, **{f"expert_{k}": v for k, v in demos.stats.items()})
    if demos.images is not None:
        with h5py.File(path, "a") as f:
            f.create_dataset("images", data=demos.images, compression="gzip", compression_opts=4,
                             chunks=(1, *demos.images.shape[1:]))
    return path


def read_demos(path: str | os.PathLike, images: bool = False) -> Demos:
    """Demonstrations written by :func:`write_demos` (``images=True`` needs the ``images`` group)."""
    dataset = d4rl.read_d4rl_hdf5(path, name="pusht-expert")
    with h5py.File(path, "r") as f:
        stats = {k.removeprefix("expert_"): (v.item() if hasattr(v, "item") else v)
                 for k, v in f.attrs.items() if k.startswith("expert_")}
        if images and "images" not in f:
            raise ValueError(f"{path} holds no images; collect with images")
        frames = f["images"][()] if images else None
    return Demos(dataset, frames, stats)


def image_dataset(demos: Demos) -> OfflineDataset:
    """The image variant's low-dimensional dataset: agent positions as observations, same actions and episodes."""
    d = demos.dataset
    return OfflineDataset(demos.agent_pos, d.actions, d.rewards, terminals=d.terminals, timeouts=d.timeouts,
                          name="pusht-expert-image", env_id=ENV_ID)


class ImageWindows:
    """Batches of Diffusion Policy windows with image observations: ``{"observations": {"image": (B, T, 3, 96, 96)
    uint8, "state": (B, T, 2)}, "actions": (B, horizon, 2)}`` with T = ``n_obs_steps`` (the steps the policy sees),
    windows and padding as :class:`envs.datasets.SequenceDataset`."""

    def __init__(self, dataset: OfflineDataset, images: np.ndarray | torch.Tensor, horizon: int, n_obs_steps: int,
                 pad_before: int, pad_after: int) -> None:
        if len(images) != len(dataset):
            raise ValueError(f"{len(images)} images for {len(dataset)} transitions")
        self.windows = SequenceDataset(dataset, horizon, pad_before=pad_before, pad_after=pad_after)
        self.images, self.n_obs_steps = torch.as_tensor(images), n_obs_steps

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        w = self.windows
        idx = torch.randint(0, len(w), (batch_size,), generator=generator)
        pos = w.start[idx].unsqueeze(-1) + w._steps
        last, first = w.episode_end[idx].unsqueeze(-1) - 1, w.episode_start[idx].unsqueeze(-1)
        pos = torch.maximum(torch.minimum(pos, last), first)
        seen = pos[:, : self.n_obs_steps]
        d = w.dataset
        return {"observations": {"image": self.images[seen], "state": d.observations[seen]}, "actions": d.actions[pos]}


# ------------------------------------------------------------------------------------------------ evaluation
def policy_observation(obs: Any, obs_type: str) -> Any:
    """The environment's observation in the layout the policies take: the 5-d state, or
    ``{"image": (3, 96, 96) uint8, "state": agent position}``."""
    if obs_type == "state":
        return np.asarray(obs, dtype=np.float32)
    return {"image": np.ascontiguousarray(obs["pixels"].transpose(2, 0, 1)),
            "state": np.asarray(obs["agent_pos"], dtype=np.float32)}


def evaluate_pusht(policy: Any, obs_type: str = "state", episodes: int = 50, seed: int = 10_000,
                   max_steps: int = MAX_STEPS) -> dict[str, Any]:
    """Roll ``policy`` (``reset()``, ``act(obs) -> (2,)`` target position) out on env seeds ``seed + i``: per-episode
    maximum coverage, success (coverage above 0.95 at some step) and length, their means and the wall time."""
    env = make_env(obs_type)
    coverage, success, lengths, start = [], [], [], time.perf_counter()
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        if hasattr(policy, "reset"):
            policy.reset()
        best, done, steps = 0.0, False, 0
        while not done and steps < max_steps:
            action = np.asarray(policy.act(policy_observation(obs, obs_type)), dtype=np.float64).reshape(2)
            obs, _, done, _, info = env.step(np.clip(action, 0.0, 512.0))
            best, steps = max(best, float(info["coverage"])), steps + 1
        coverage.append(best)
        success.append(bool(best > SUCCESS_COVERAGE))
        lengths.append(steps)
    env.close()
    return {"coverage": coverage, "success": success, "lengths": lengths, "success_rate": float(np.mean(success)),
            "mean_coverage": float(np.mean(coverage)), "eval_s": time.perf_counter() - start}


def initial_coverage(episodes: int = 50, seed: int = 10_000) -> float:
    """Mean coverage at the start of the episodes of env seeds ``seed + i``: the score of not pushing at all."""
    env = make_env("state")
    values = []
    for i in range(episodes):
        env.reset(seed=seed + i)
        values.append(env.unwrapped._get_coverage())
    return float(np.mean(values))


def evaluate_expert(episodes: int = 50, seed: int = 10_000, max_steps: int = MAX_STEPS) -> dict[str, Any]:
    """The expert on env seeds ``seed + i``, in the keys of :func:`evaluate_pusht`."""
    env, expert, start = make_env("state"), PushTExpert(), time.perf_counter()
    runs = [run_expert_episode(env, expert, seed + i, max_steps=max_steps) for i in range(episodes)]
    coverage = [r["max_coverage"] for r in runs]
    success = [bool(c > SUCCESS_COVERAGE) for c in coverage]
    return {"coverage": coverage, "success": success, "lengths": [len(r["actions"]) for r in runs],
            "success_rate": float(np.mean(success)), "mean_coverage": float(np.mean(coverage)),
            "eval_s": time.perf_counter() - start}
