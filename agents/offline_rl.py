"""Plumbing shared by the offline-RL agents (Diffusion-QL, QGPO, IDQL): normalisers taken from the data, batch
preparation, state-dict bookkeeping, the state-conditioned diffusion model they all train, and the actor-module
helpers (last observation, critic-scored choice among candidate actions)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from agents.base import TorchAgent
from diffrl.model import DiffusionModel
from diffrl.nets import ResidualMLP
from diffrl.schedules import NoiseSchedule
from diffrl.training import Learner

MIN_ACTION_SCALE = 1e-6


def max_abs_normalizer(actions: Tensor) -> Any:
    """Per-dimension scaling by max |a| (mean 0), so dataset actions lie in [-1, 1] and x0 clipping at 1 is exact."""
    from envs.datasets import Normalizer

    return Normalizer(torch.zeros(actions.shape[-1]), actions.abs().amax(0).clamp_min(MIN_ACTION_SCALE))


OBS_NORMALIZATIONS = ("none", "zscore")
ACTION_NORMALIZATIONS = ("none", "max_abs")
#: Largest |action| in a dataset that ``action_normalization="none"`` accepts (the samplers clip to [-1, 1]).
MAX_RAW_ACTION = 1.0 + 1e-3


def input_normalizers(dataset: Any, obs_normalization: str, action_normalization: str) -> tuple[Any, Any]:
    """(observation, action) normalisers of ``dataset``: z-scored or raw observations, max-abs scaled or raw
    actions; raw actions must lie in [-1, 1], where the diffusion actors sample."""
    if obs_normalization == "zscore":
        obs_normalizer = dataset.normalizer("observations")
    else:
        obs_normalizer = identity_normalizer(dataset.obs_dim)
    if action_normalization == "max_abs":
        return obs_normalizer, max_abs_normalizer(dataset.actions)
    largest = float(dataset.actions.abs().max()) if len(dataset.actions) else 0.0
    if largest > MAX_RAW_ACTION:
        raise ValueError(f"dataset actions reach |a| = {largest:.4g}, but action_normalization='none' samples "
                         "actions in [-1, 1]; use action_normalization='max_abs'")
    return obs_normalizer, identity_normalizer(dataset.act_dim)


def identity_normalizer(dim: int) -> Any:
    from envs.datasets import Normalizer

    return Normalizer.identity(dim)


def diffusion_actor(obs_dim: int, act_dim: int, schedule: NoiseSchedule, hidden: int = 256, depth: int = 3,
                    time_dim: int = 16, layer_norm: bool = False) -> DiffusionModel:
    """p(a | s) as a residual-MLP eps-prediction model; x0 clipped to [-1, 1] (actions are max-abs normalised)."""
    net = ResidualMLP(act_dim, obs_dim, hidden=hidden, depth=depth, time_dim=time_dim, layer_norm=layer_norm)
    return DiffusionModel(net, schedule, prediction="eps", clip_x0=1.0)


def last_observation(obs: Tensor, obs_dim: int) -> Tensor:
    """The newest observation (B, obs_dim) of an actor input (B, n_obs_steps, obs_dim)."""
    if obs.dim() != 3 or obs.shape[-1] != obs_dim:
        raise ValueError(f"actor input must have shape (B, n_obs_steps, {obs_dim}), got {tuple(obs.shape)}")
    return obs[:, -1]


def choose(candidates: Tensor, logits: Tensor, greedy: bool, generator: torch.Generator | None = None) -> Tensor:
    """One of N candidate actions per state: argmax of ``logits`` or a draw from softmax(logits).

    ``candidates`` (B, N, act_dim), ``logits`` (B, N) -> (B, act_dim); float32 / float64 logits keep their dtype
    (reduced-precision ones are drawn in float32).
    """
    if greedy:
        idx = logits.argmax(dim=1)
    else:
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        idx = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), idx]


def repeat_states(obs: Tensor, n: int) -> Tensor:
    """(B, obs_dim) -> (B * n, obs_dim), each state repeated n times in a row."""
    return obs.repeat_interleave(n, dim=0)


def candidate_actions(model: DiffusionModel, obs: Tensor, n: int, act_dim: int, solver: Any, steps: int,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``n`` sampled actions per state: (repeated states (B * n, obs_dim), actions (B * n, act_dim))."""
    states = repeat_states(obs, n)
    return states, model.sample((states.shape[0], act_dim), states, solver=solver, steps=steps, generator=generator)


class OfflineRLAgent(TorchAgent):
    """Base of the offline-RL agents: holds the dimensions, normalisers and the modules and Learners to save.

    Subclasses create their networks and Learners in ``__init__`` (after calling this one), list them in
    ``modules`` / ``learners``, and implement ``update`` and ``build_actor``.
    """

    kind: str = "offline_rl"

    def __init__(self, config: Any, obs_dim: int, act_dim: int, obs_normalizer: Any = None,
                 action_normalizer: Any = None):
        if obs_dim <= 0 or act_dim <= 0:
            raise ValueError(f"{type(self).__name__} needs positive obs_dim and act_dim, got {obs_dim}, {act_dim}")
        self.config, self.obs_dim, self.act_dim = config, int(obs_dim), int(act_dim)
        self.obs_normalizer = obs_normalizer if obs_normalizer is not None else identity_normalizer(obs_dim)
        self.action_normalizer = action_normalizer if action_normalizer is not None else identity_normalizer(act_dim)
        self.modules: dict[str, nn.Module] = {}
        self.learners: dict[str, Learner] = {}

    @classmethod
    def from_dataset(cls, dataset: Any, config: Any, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> OfflineRLAgent:
        """Dimensions from ``dataset``; z-scored observations and max-abs scaled actions; on ``device``."""
        return cls(config, dataset.obs_dim, dataset.act_dim, dataset.normalizer("observations"),
                   max_abs_normalizer(dataset.actions)).to(device, dtype)

    def prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Normalised observations and actions, rewards times ``config.reward_scale``, float terminals."""
        missing = {"observations", "actions", "rewards", "next_observations", "terminals"} - set(batch)
        if missing:
            raise KeyError(f"{self.kind} batch lacks {sorted(missing)}; got keys {sorted(batch)}")
        obs = self.obs_normalizer.normalize(batch["observations"])
        return {
            "obs": obs,
            "next_obs": self.obs_normalizer.normalize(batch["next_observations"]),
            "actions": self.action_normalizer.normalize(batch["actions"]),
            "rewards": batch["rewards"].to(obs.dtype).reshape(-1) * self.config.reward_scale,
            "terminals": batch["terminals"].to(obs.dtype).reshape(-1),
        }

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        raise NotImplementedError

    def build_actor(self, **overrides: Any) -> nn.Module:
        """A fresh actor module holding copies of the current weights (``overrides``: sampling settings)."""
        raise NotImplementedError

    def policy(self, seed: int | None = None, **overrides: Any):
        """The controller-facing :class:`agents.policy.Policy` around a snapshot of the current actor."""
        from agents.policy import Policy

        return Policy(self.build_actor(**overrides), self.obs_normalizer, self.action_normalizer, seed=seed,
                      obs_dim=self.obs_dim, act_dim=self.act_dim, device=self.device, dtype=self.dtype)

    def state_dict(self) -> dict:
        return {
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "learners": {k: opt.state_dict() for k, opt in self.learners.items()},
            "obs_normalizer": self.obs_normalizer.state_dict(),
            "action_normalizer": self.action_normalizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        from envs.datasets import Normalizer

        for key in ("modules", "learners"):
            if set(state[key]) != set(getattr(self, key)):
                raise ValueError(f"{self.kind} state has {key} {sorted(state[key])}, expected "
                                 f"{sorted(getattr(self, key))}")
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        for name, learner in self.learners.items():
            learner.load_state_dict(state["learners"][name])
        self.obs_normalizer = Normalizer.from_state_dict(state["obs_normalizer"]).to(self.device, self.dtype)
        self.action_normalizer = Normalizer.from_state_dict(state["action_normalizer"]).to(self.device, self.dtype)


def actor_settings(defaults: dict[str, Any], overrides: dict[str, Any], kind: str) -> dict[str, Any]:
    """``defaults`` with sampling ``overrides`` applied; unknown names are an error."""
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {kind} sampling option(s) {sorted(unknown)}; choose from {sorted(defaults)}")
    return {**defaults, **overrides}
