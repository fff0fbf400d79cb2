"""Diffusion behaviour cloning: a state-conditioned diffusion model of the dataset's actions, p(a | s).

Observations are z-scored; actions are scaled per dimension from the dataset's [min, max] to [-1, 1] (and clipped
there), so clipping the sampler's x0 estimate at 1 keeps every action inside the data's range. The denoiser is the
residual MLP of Diffusion-QL (3x256, Mish) trained with the eps-prediction loss on the continuous VP-SDE whose
5-point discretisation is Diffusion-QL's short chain (beta in [0.1, 10]); any solver and step count can sample it,
stochastic (DDPM, Euler-Maruyama) or deterministic (DDIM, DPM-Solver++). The policy uses the EMA weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from agents.base import TorchAgent
from agents.diffusion_actor import DiffusionActor
from agents.policy import Policy
from diffrl.training import Learner

MIN_ACTION_RANGE = 1e-6


def minmax_normalizer(actions: Tensor) -> Any:
    """Per-dimension affine map of [min, max] onto [-1, 1], as a ``Normalizer`` (mean = mid-point, std = half-range)."""
    from envs.datasets import Normalizer

    low, high = actions.amin(0), actions.amax(0)
    return Normalizer((high + low) / 2, ((high - low) / 2).clamp_min(MIN_ACTION_RANGE))


def schedule_kwargs(name: str, beta_min: float, beta_max: float, num_train_steps: int) -> dict:
    """The keyword arguments ``make_schedule(name, ...)`` takes from the agent configs' schedule fields."""
    if name == "vp-sde":
        return {"beta_min": beta_min, "beta_max": beta_max}
    if name == "ddpm-vp":
        return {"num_steps": num_train_steps, "beta_min": beta_min, "beta_max": beta_max}
    if name in ("ddpm-linear", "ddpm-cosine"):
        return {"num_steps": num_train_steps}
    return {}


@dataclass
class DiffusionBCConfig:
    """Defaults follow the Diffusion-QL actor (Wang et al. 2023: 3x256 Mish MLP, VP beta in [0.1, 10], 5 DDPM steps,
    lr 3e-4, EMA 0.995 every 5 updates after 1000)."""

    hidden: int = 256
    depth: int = 3
    time_dim: int = 16
    layer_norm: bool = False
    schedule: str = "vp-sde"
    beta_min: float = 0.1
    beta_max: float = 10.0
    num_train_steps: int = 5
    prediction: str = "eps"
    solver: str = "ddpm"
    steps: int = 5
    lr: float = 3e-4
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None  # learning-rate schedule horizon; None: the run's steps
    max_grad_norm: float | None = None
    ema_decay: float = 0.995
    ema_start: int = 1000
    ema_every: int = 5


class CloningAgent(TorchAgent):
    """Behaviour-cloning plumbing shared with the baselines: dimensions, normalisers, batch preparation, the policy
    and the state dict. Subclasses create ``self.actor`` (a Policy actor module) and ``self.learner``, and implement
    ``update`` and ``policy_actor``."""

    kind = "cloning"

    def __init__(self, config: Any, obs_dim: int, act_dim: int, obs_normalizer: Any = None,
                 action_normalizer: Any = None):
        from envs.datasets import Normalizer

        if obs_dim < 1 or act_dim < 1:
            raise ValueError(f"{type(self).__name__} needs positive obs_dim and act_dim, got {obs_dim}, {act_dim}")
        self.config, self.obs_dim, self.act_dim = config, int(obs_dim), int(act_dim)
        self.obs_normalizer = obs_normalizer if obs_normalizer is not None else Normalizer.identity(obs_dim)
        self.action_normalizer = action_normalizer if action_normalizer is not None else Normalizer.identity(act_dim)

    @classmethod
    def from_dataset(cls, dataset: Any, config: Any, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> CloningAgent:
        """Dimensions from ``dataset``; z-scored observations, actions scaled from [min, max] to [-1, 1]; on
        ``device``."""
        return cls(config, dataset.obs_dim, dataset.act_dim, dataset.normalizer("observations"),
                   minmax_normalizer(dataset.actions)).to(device, dtype)

    def make_learner(self, module: torch.nn.Module, ema: bool = True) -> Learner:
        """The Learner of ``module`` from the config's optimisation fields."""
        c = self.config
        ema_args = dict(ema_decay=c.ema_decay, ema_start=c.ema_start, ema_update_every=c.ema_every) if ema else {}
        return Learner(module, lr=c.lr, weight_decay=c.weight_decay, max_grad_norm=c.max_grad_norm,
                       lr_schedule=c.lr_schedule, warmup_steps=c.warmup_steps, total_steps=c.total_steps, **ema_args)

    def prepare(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(normalised actions (B, act_dim) clipped to [-1, 1], normalised observation histories (B, 1, obs_dim))."""
        obs = self.obs_normalizer.normalize(batch["observations"]).unsqueeze(1)
        actions = self.action_normalizer.normalize(batch["actions"]).clamp(-1.0, 1.0)
        return actions, obs

    def policy_settings(self) -> dict:
        """Execution settings of the controller-facing policy (history length, actions executed per plan)."""
        return {"n_obs_steps": 1, "n_action_steps": 1}

    def policy_actor(self, **overrides: Any) -> torch.nn.Module:
        """A snapshot of the actor for the policy (``overrides``: sampling settings)."""
        raise NotImplementedError

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        raise NotImplementedError

    def policy(self, seed: int | None = None, **overrides: Any) -> Policy:
        """The controller-facing policy around a snapshot of the actor."""
        return Policy(self.policy_actor(**overrides), self.obs_normalizer, self.action_normalizer, seed=seed,
                      obs_dim=self.obs_dim, act_dim=self.act_dim, device=self.device, dtype=self.dtype,
                      **self.policy_settings())

    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(),
            "learner": self.learner.state_dict(),
            "obs_normalizer": self.obs_normalizer.state_dict(),
            "action_normalizer": self.action_normalizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        from envs.datasets import Normalizer

        self.actor.load_state_dict(state["actor"])
        self.learner.load_state_dict(state["learner"])
        self.obs_normalizer = Normalizer.from_state_dict(state["obs_normalizer"]).to(self.device, self.dtype)
        self.action_normalizer = Normalizer.from_state_dict(state["action_normalizer"]).to(self.device, self.dtype)


class DiffusionBC(CloningAgent):
    """State -> action diffusion behaviour cloning; ``update`` takes one denoising-loss step on a transition batch."""

    kind = "diffusion_bc"

    def __init__(self, config: DiffusionBCConfig, obs_dim: int, act_dim: int, obs_normalizer: Any = None,
                 action_normalizer: Any = None):
        super().__init__(config, obs_dim, act_dim, obs_normalizer, action_normalizer)
        self.actor = DiffusionActor(**self.actor_config())
        self.learner = self.make_learner(self.actor.model.denoiser)

    def actor_config(self) -> dict:
        c = self.config
        return dict(obs_dim=self.obs_dim, act_dim=self.act_dim, net="mlp",
                    net_kwargs=dict(hidden=c.hidden, depth=c.depth, time_dim=c.time_dim, layer_norm=c.layer_norm),
                    schedule=c.schedule, schedule_kwargs=schedule_kwargs(c.schedule, c.beta_min, c.beta_max,
                                                                         c.num_train_steps),
                    prediction=c.prediction, clip_x0=1.0, solver=c.solver, steps=c.steps)

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        x0, obs = self.prepare(batch)
        self.actor.train()
        loss = self.actor.model.loss(x0.reshape(x0.shape[0], *self.actor.x_shape), self.actor.cond(obs))
        return {"loss": loss.detach(), **self.learner.step(loss)}

    def policy_actor(self, **overrides: Any) -> DiffusionActor:
        """The actor with the EMA weights; ``overrides``: solver, solver_kwargs, steps, clip_x0."""
        actor = self.actor.with_sampling(**overrides)
        actor.model.denoiser.load_state_dict(self.learner.ema_module.state_dict())
        return actor
