"""Shared pieces of the trajectory planners (Diffuser, Decision Diffuser).

Planners model whole windows ``x (B, horizon, x_dim)`` whose first ``obs_dim`` features per step are the
normalised state. Known states (the current one at step 0, a goal at the last step) are held fixed by inpainting
both in training (the noisy input carries the clean values there and the loss ignores them) and in sampling
(`diffrl.guidance.Inpainting`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from agents.base import TorchAgent
from agents.policy import Policy
from diffrl.guidance import Inpainting
from diffrl.model import DiffusionModel
from diffrl.schedules import DiscreteVP
from diffrl.training import Learner
from envs.datasets import Normalizer, OfflineDataset, SequenceDataset

SCHEDULES = {"cosine": DiscreteVP.cosine, "linear": DiscreteVP.linear}
#: How planners normalise states and actions: z-scores, or each feature's [min, max] to [-1, 1] (Diffuser's Maze2D).
NORMALIZERS = {"gaussian": Normalizer.fit, "limits": Normalizer.limits}


def make_discrete_schedule(name: str, num_steps: int) -> DiscreteVP:
    """DDPM chain of ``num_steps`` steps with cosine or linear betas."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown planner schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if num_steps < 2:
        raise ValueError(f"the diffusion chain needs at least 2 steps, got {num_steps}")
    return SCHEDULES[name](num_steps)


def fit_normalizer(data: Tensor, kind: str) -> Normalizer:
    """The ``kind`` normaliser (see :data:`NORMALIZERS`) of ``data`` (N, dim)."""
    if kind not in NORMALIZERS:
        raise ValueError(f"unknown planner normalizer {kind!r}; choose one of {sorted(NORMALIZERS)}")
    return NORMALIZERS[kind](data)


def with_termination_penalty(dataset: OfflineDataset, penalty: float) -> OfflineDataset:
    """``dataset`` with ``penalty`` added to the reward of every terminal transition (Janner et al. 2022)."""
    if not penalty:
        return dataset
    rewards = dataset.rewards + penalty * dataset.terminals.to(dataset.rewards.dtype)
    penalised = OfflineDataset(dataset.observations, dataset.actions, rewards, dataset.next_observations,
                               dataset.terminals, dataset.timeouts, name=dataset.name, env_id=dataset.env_id,
                               source=dataset.source)
    return penalised.to(dataset.device, dataset.rewards.dtype)


def planner_sequences(dataset: OfflineDataset, horizon: int, discount: float = 1.0,
                      termination_penalty: float = 0.0) -> SequenceDataset:
    """Padded windows of ``horizon`` steps whose ``returns_to_go`` are ``discount``-ed and penalised at terminals."""
    return with_termination_penalty(dataset, termination_penalty).sequences(horizon, discount=discount)


def state_inpainting(like: Tensor, first: Tensor, last: Tensor | None = None) -> Inpainting:
    """Hold the state features of step 0 at ``first`` (B, obs_dim) and, if given, of the last step at ``last``."""
    batch, _, x_dim = like.shape
    obs_dim = first.shape[-1]
    if first.shape != (batch, obs_dim) or obs_dim > x_dim:
        raise ValueError(f"first states of shape {tuple(first.shape)} do not fit windows of shape {tuple(like.shape)}")
    mask = torch.zeros(like.shape, dtype=torch.bool, device=like.device)
    values = torch.zeros_like(like)
    mask[:, 0, :obs_dim] = True
    values[:, 0, :obs_dim] = first
    if last is not None:
        if last.shape != first.shape:
            raise ValueError(f"goal states of shape {tuple(last.shape)} must match {tuple(first.shape)}")
        mask[:, -1, :obs_dim] = True
        values[:, -1, :obs_dim] = last
    return Inpainting(mask, values)


def noisy_inputs(model: DiffusionModel, x0: Tensor, held: Inpainting,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, t, noise) at random training times, with the held entries clean in x_t."""
    t = model.schedule.sample_t(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return held.project(model.schedule.marginal(x0, t, noise), t), t, noise


def inpainted_denoising_loss(model: DiffusionModel, x0: Tensor, held: Inpainting, cond=None,
                             weights: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Denoising loss with the held entries clean in the noisy input and excluded from the error.

    ``weights`` (broadcastable to ``x0``) scales the squared error per entry, e.g. Diffuser's action weight.
    """
    x_t, t, noise = noisy_inputs(model, x0, held, generator)
    target = model.prediction.from_x0_eps(x0, noise, x_t, t, model.schedule)
    free = (~held.mask).to(x0.dtype)
    if weights is not None:
        free = free * weights
    return ((model(x_t, t, cond) - target).pow(2) * free).sum() / free.sum().clamp_min(1.0)


def last_observation(obs: Tensor, obs_dim: int) -> Tensor:
    """The newest observation of an actor input (B, n_obs_steps, obs_dim) (or (B, obs_dim))."""
    if obs.dim() == 2:
        obs = obs.unsqueeze(1)
    if obs.dim() != 3 or obs.shape[-1] != obs_dim:
        raise ValueError(f"planner expects observations (B, n_obs_steps, {obs_dim}), got {tuple(obs.shape)}")
    return obs[:, -1]


def planning_overrides(config: Any, overrides: dict[str, Any], allowed: tuple[str, ...]) -> Any:
    """``config`` with the planning fields in ``overrides`` replaced (fields outside ``allowed`` are an error)."""
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"cannot override {unknown} at planning time; allowed: {list(allowed)}")
    return dataclasses.replace(config, **overrides)


class PlannerAgent(TorchAgent):
    """Plumbing shared by the planners: normalisers, Learners, the actor with EMA weights and the Policy,
    plans in raw units, and state dicts.

    Subclasses set ``kind``, ``actor_class`` (built as ``actor_class(config, obs_dim, act_dim, **actor_kwargs)``),
    ``planning_fields`` and register one Learner per trained sub-module of ``self.nets`` with :meth:`_learn`.
    ``return_normalizer`` maps the planner's return signal (value target or return condition) to raw returns.
    """

    kind: str
    actor_class: type[nn.Module]
    planning_fields: tuple[str, ...]

    def __init__(self, config: Any, obs_dim: int, act_dim: int, obs_normalizer: Normalizer | None = None,
                 action_normalizer: Normalizer | None = None, return_normalizer: Normalizer | None = None):
        self.config, self.obs_dim, self.act_dim = config, obs_dim, act_dim
        self.obs_normalizer = obs_normalizer or Normalizer.identity(obs_dim)
        self.action_normalizer = action_normalizer or Normalizer.identity(act_dim)
        self.return_normalizer = return_normalizer or Normalizer.identity()
        self.nets = self.actor_class(config, obs_dim, act_dim)
        self.learners: dict[str, Learner] = {}

    def _learn(self, name: str, lr: float) -> Learner:
        """Register a Learner for the sub-module ``name`` of ``self.nets``, with the config's clipping and EMA
        (a copy of the weights for the first ``ema_start`` updates, then averaged every ``ema_every`` updates)."""
        c = self.config
        self.learners[name] = Learner(self.nets.get_submodule(name), lr=lr, ema_decay=c.ema_decay,
                                      max_grad_norm=c.max_grad_norm, ema_start=c.ema_start,
                                      ema_update_every=c.ema_every)
        return self.learners[name]

    def sequences(self, dataset: OfflineDataset) -> SequenceDataset:
        """Training windows of ``dataset``; their ``returns_to_go`` are this agent's return signal."""
        c = self.config
        return planner_sequences(dataset, c.horizon, c.discount, c.termination_penalty)

    def batch_sampler(self, dataset: OfflineDataset):
        """``sample(batch_size, generator)`` of training windows, for ``diffrl.training.Trainer``."""
        return self.sequences(dataset).sample

    def _normalize_obs_and_actions(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return (self.obs_normalizer.normalize(batch["observations"]),
                self.action_normalizer.normalize(batch["actions"]))

    # ------------------------------------------------------------------------------------------- acting
    def _actor_kwargs(self, config: Any) -> dict[str, Any]:
        """Extra constructor arguments of the actor for a (possibly overridden) config."""
        return {}

    def actor(self, **overrides: Any) -> nn.Module:
        """A planner holding the EMA weights; ``overrides`` change the fields in ``planning_fields``."""
        config = planning_overrides(self.config, overrides, self.planning_fields)
        actor = self.actor_class(config, self.obs_dim, self.act_dim, **self._actor_kwargs(config))
        for name, learner in self.learners.items():
            actor.get_submodule(name).load_state_dict(learner.ema_module.state_dict())
        return actor.eval()

    def policy(self, seed: int | None = None, **overrides: Any) -> Policy:
        """The controller-facing policy (receding horizon: plan, execute ``n_action_steps`` actions, replan)."""
        actor = self.actor(**overrides)
        return Policy(actor, self.obs_normalizer, self.action_normalizer, n_action_steps=actor.config.n_action_steps,
                      seed=seed, device=self.device, dtype=self.dtype)

    def plan(self, obs: np.ndarray | Tensor, generator: torch.Generator | None = None,
             **overrides: Any) -> dict[str, np.ndarray | None]:
        """Plans from raw states (B, obs_dim) or (obs_dim,), in raw units: ``states`` (B, H, obs_dim), ``actions``
        and ``values`` (the plan's predicted or requested discounted return-to-go; None when there is none)."""
        actor = self.actor(**overrides)
        obs_t = torch.as_tensor(np.asarray(obs), dtype=torch.float32).reshape(-1, self.obs_dim)
        with torch.no_grad():
            out = actor.plan(self.obs_normalizer.normalize(obs_t), generator)
        values = out["values"]
        return {"states": self.obs_normalizer.denormalize(out["states"]).numpy(),
                "actions": self.action_normalizer.denormalize(out["actions"]).numpy(),
                "values": None if values is None else self.return_normalizer.denormalize(values).numpy()}

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config), "obs_dim": self.obs_dim, "act_dim": self.act_dim,
            "nets": self.nets.state_dict(),
            "learners": {name: learner.state_dict() for name, learner in self.learners.items()},
            "normalizers": {name: getattr(self, f"{name}_normalizer").state_dict()
                            for name in ("obs", "action", "return")},
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["obs_dim"], state["act_dim"]) != (self.obs_dim, self.act_dim):
            raise ValueError(f"saved {self.kind} agent has obs_dim={state['obs_dim']}, act_dim={state['act_dim']}; "
                             f"this one has {self.obs_dim}, {self.act_dim}")
        if set(state["learners"]) != set(self.learners):
            raise ValueError(f"saved {self.kind} agent trains {sorted(state['learners'])}, this one "
                             f"{sorted(self.learners)}")
        self.nets.load_state_dict(state["nets"])
        for name, learner in self.learners.items():
            learner.load_state_dict(state["learners"][name])
        for name, norm in state["normalizers"].items():
            setattr(self, f"{name}_normalizer", Normalizer.from_state_dict(norm).to(self.device, self.dtype))
