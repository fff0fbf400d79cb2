"""Diffuser (Janner et al. 2022, "Planning with Diffusion for Flexible Behavior Synthesis").

A temporal U-Net models windows of ``horizon`` steps of ``x = concat(normalised state, normalised action)``.
The current state (and, goal-conditioned, a goal state at the last step) is held fixed by inpainting. A return
model on noisy windows predicts the normalised discounted return-to-go of the window; planning samples candidate
plans with value-gradient guidance, ranks them by the return model, executes the first action(s) and replans.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from agents.planning import (
    inpainted_denoising_loss,
    last_observation,
    make_discrete_schedule,
    noisy_inputs,
    planner_sequences,
    state_inpainting,
    with_termination_penalty,
)
from agents.policy import Policy, register_actor
from diffrl.guidance import GradientGuidance
from diffrl.model import DiffusionModel
from diffrl.nets import TemporalUNet1D, TemporalValueNet1D
from diffrl.solvers import make_solver
from diffrl.training import Learner
from envs.datasets import Normalizer, OfflineDataset, SequenceDataset


@dataclass
class DiffuserConfig:
    """Diffuser hyper-parameters; defaults follow the locomotion setting of Janner et al. (2022): horizon 32,
    T = 20, x0 prediction, action weight 10, value discount 0.99 with a -100 termination penalty, 64 candidate
    plans, guide scale 0.1 switched off for the last 2 of 20 steps, learning rate 2e-4, EMA 0.995."""

    horizon: int = 32
    diffusion_steps: int = 20
    schedule: str = "cosine"
    prediction: str = "x0"
    dims: tuple[int, ...] = (32, 64, 128)
    kernel_size: int = 5
    action_weight: float = 10.0
    goal_conditioned: bool = False
    lr: float = 2e-4
    ema_decay: float = 0.995
    max_grad_norm: float | None = None
    # return model
    train_value: bool = True
    discount: float = 0.99
    termination_penalty: float = -100.0
    value_lr: float = 2e-4
    # planning
    solver: str = "ddpm"
    sampling_steps: int = 20
    n_candidates: int = 64
    guide_scale: float = 0.1
    guide_t_stop: float = 0.1
    n_action_steps: int = 1
    clip_x0: float | None = None
    goal: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        self.dims = tuple(self.dims)
        self.goal = None if self.goal is None else tuple(float(g) for g in self.goal)
        if self.horizon < 2:
            raise ValueError(f"DiffuserConfig.horizon must be >= 2, got {self.horizon}")
        if not 1 <= self.n_action_steps <= self.horizon:
            raise ValueError(f"n_action_steps must lie in [1, horizon={self.horizon}], got {self.n_action_steps}")
        if self.n_candidates < 1 or self.sampling_steps < 1:
            raise ValueError(f"n_candidates and sampling_steps must be >= 1, got {self.n_candidates}, "
                             f"{self.sampling_steps}")
        if self.guide_scale and not self.train_value:
            raise ValueError("value guidance (guide_scale != 0) needs the return model: set train_value=True")


#: Config fields that only change how plans are sampled (``policy(**overrides)``).
PLANNING_FIELDS = ("solver", "sampling_steps", "n_candidates", "guide_scale", "guide_t_stop", "n_action_steps",
                   "clip_x0", "goal")


def planning_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """``config`` with the planning fields in ``overrides`` replaced (other keys are an error)."""
    unknown = sorted(set(overrides) - set(PLANNING_FIELDS))
    if unknown:
        raise ValueError(f"cannot override {unknown} at planning time; allowed: {list(PLANNING_FIELDS)}")
    return dataclasses.replace(config, **overrides)


@register_actor("diffuser")
class DiffuserActor(nn.Module):
    """Receding-horizon planner: normalised observations (B, n_obs_steps, obs_dim) -> first ``n_action_steps``
    normalised actions of the best plan. ``last_plan`` keeps the latest plans (normalised, see :meth:`plan`)."""

    needs_grad = True

    def __init__(self, config: DiffuserConfig | dict, obs_dim: int, act_dim: int, goal: list[float] | None = None):
        super().__init__()
        self.config = config if isinstance(config, DiffuserConfig) else DiffuserConfig(**config)
        c = self.config
        self.obs_dim, self.act_dim = obs_dim, act_dim
        x_dim = obs_dim + act_dim
        net = TemporalUNet1D(x_dim, c.horizon, dims=c.dims, kernel_size=c.kernel_size)
        self.model = DiffusionModel(net, make_discrete_schedule(c.schedule, c.diffusion_steps), c.prediction,
                                    clip_x0=c.clip_x0)
        self.value = TemporalValueNet1D(x_dim, c.horizon, dims=c.dims, kernel_size=c.kernel_size) \
            if c.train_value else None
        if goal is not None and len(goal) != obs_dim:
            raise ValueError(f"goal has {len(goal)} entries, observations have {obs_dim}")
        self.goal = None if goal is None else torch.tensor(goal, dtype=torch.float32)
        self.last_plan: dict[str, Tensor | None] | None = None

    def export_config(self) -> dict:
        goal = None if self.goal is None else self.goal.tolist()
        return {"config": asdict(self.config), "obs_dim": self.obs_dim, "act_dim": self.act_dim, "goal": goal}

    def predicted_value(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        """The return model's normalised value of (noisy) plans at time ``t``."""
        return self.value(x, t)

    def plan(self, obs: Tensor, generator: torch.Generator | None = None, goal: Tensor | None = None) -> dict:
        """Plans from normalised states ``obs`` (B, obs_dim): ``states`` (B, H, obs_dim), ``actions`` (B, H, act_dim)
        and the return model's normalised ``values`` (B,) (None without a return model), best of the candidates."""
        c = self.config
        batch, n = obs.shape[0], c.n_candidates
        goal = self.goal if goal is None else goal
        if c.goal_conditioned and goal is None:
            raise ValueError("this Diffuser is goal-conditioned: give a goal (config.goal or plan(..., goal=))")
        first = obs.repeat_interleave(n, 0)
        last = goal.to(obs).expand_as(first) if c.goal_conditioned else None
        shape = (batch * n, c.horizon, self.obs_dim + self.act_dim)
        hooks = [] if not c.guide_scale else [GradientGuidance(self.predicted_value, c.guide_scale, c.guide_t_stop)]
        hooks.append(state_inpainting(obs.new_empty(shape), first, last))
        x = self.model.sample(shape, solver=make_solver(c.solver), steps=c.sampling_steps, guidance=hooks,
                              generator=generator)
        values = None
        if self.value is not None:
            with torch.no_grad():
                t0 = torch.full((x.shape[0],), self.model.schedule.t_min, device=x.device)
                values = self.value(x, t0).view(batch, n)
            best = values.argmax(1)
            values = values.gather(1, best[:, None]).squeeze(1)
        else:
            best = torch.zeros(batch, dtype=torch.long, device=x.device)
        x = x.view(batch, n, *shape[1:])[torch.arange(batch, device=x.device), best]
        return {"states": x[..., : self.obs_dim], "actions": x[..., self.obs_dim:], "values": values}

    def forward(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self.last_plan = self.plan(last_observation(obs, self.obs_dim), generator)
        return self.last_plan["actions"][:, : self.config.n_action_steps]


class Diffuser:
    """Diffuser agent: one ``update`` trains the trajectory model and the return model by one step each."""

    kind = "diffuser"

    def __init__(self, config: DiffuserConfig, obs_dim: int, act_dim: int, obs_normalizer: Normalizer | None = None,
                 action_normalizer: Normalizer | None = None, value_normalizer: Normalizer | None = None):
        self.config, self.obs_dim, self.act_dim = config, obs_dim, act_dim
        self.obs_normalizer = obs_normalizer or Normalizer.identity(obs_dim)
        self.action_normalizer = action_normalizer or Normalizer.identity(act_dim)
        self.value_normalizer = value_normalizer or Normalizer.identity()
        self.nets = DiffuserActor(config, obs_dim, act_dim)
        c = config
        self.learner = Learner(self.nets.model.denoiser, lr=c.lr, ema_decay=c.ema_decay, max_grad_norm=c.max_grad_norm)
        self.value_learner = Learner(self.nets.value, lr=c.value_lr, ema_decay=c.ema_decay,
                                     max_grad_norm=c.max_grad_norm) if c.train_value else None
        weights = torch.ones(1, c.horizon, obs_dim + act_dim)
        weights[:, 0, obs_dim:] = c.action_weight
        self._loss_weights = weights

    @classmethod
    def from_dataset(cls, dataset: OfflineDataset, config: DiffuserConfig) -> Diffuser:
        """Dimensions and normalisers (states, actions, discounted penalised returns-to-go) from ``dataset``."""
        returns = with_termination_penalty(dataset, config.termination_penalty).returns_to_go(config.discount)
        return cls(config, dataset.obs_dim, dataset.act_dim, dataset.normalizer("observations"),
                   dataset.normalizer("actions"), Normalizer.fit(returns))

    def sequences(self, dataset: OfflineDataset) -> SequenceDataset:
        """Training windows of ``dataset`` whose ``returns_to_go`` are this agent's value targets."""
        return planner_sequences(dataset, self.config.horizon, self.config.discount, self.config.termination_penalty)

    # ------------------------------------------------------------------------------------------- training
    def _windows(self, batch: dict[str, Tensor]) -> Tensor:
        obs = self.obs_normalizer.normalize(batch["observations"])
        act = self.action_normalizer.normalize(batch["actions"])
        return torch.cat([obs, act], dim=-1)

    def _held(self, x0: Tensor):
        d = self.obs_dim
        return state_inpainting(x0, x0[:, 0, :d], x0[:, -1, :d] if self.config.goal_conditioned else None)

    def update(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One step on the inpainted denoising loss and, with a return model, one on its regression loss."""
        x0 = self._windows(batch)
        held = self._held(x0)
        loss = inpainted_denoising_loss(self.nets.model, x0, held, weights=self._loss_weights)
        metrics = {"diffusion_loss": loss.item(), **{f"diffusion_{k}": v for k, v in self.learner.step(loss).items()}}
        if self.value_learner is not None:
            target = self.value_normalizer.normalize(batch["returns_to_go"][:, 0])
            x_t, t, _ = noisy_inputs(self.nets.model, x0, held)
            value_loss = F.mse_loss(self.nets.value(x_t, t), target)
            metrics["value_loss"] = value_loss.item()
            metrics.update({f"value_{k}": v for k, v in self.value_learner.step(value_loss).items()})
        return metrics

    # ------------------------------------------------------------------------------------------- acting
    def actor(self, **overrides: Any) -> DiffuserActor:
        """A planner with the EMA weights; ``overrides`` change planning fields (see ``PLANNING_FIELDS``)."""
        config = planning_overrides(self.config, overrides)
        goal = None if config.goal is None else self.obs_normalizer.normalize(torch.tensor(config.goal)).tolist()
        actor = DiffuserActor(config, self.obs_dim, self.act_dim, goal)
        actor.model.denoiser.load_state_dict(self.learner.ema_module.state_dict())
        if self.value_learner is not None:
            actor.value.load_state_dict(self.value_learner.ema_module.state_dict())
        return actor.eval()

    def policy(self, seed: int | None = None, **overrides: Any) -> Policy:
        """The controller-facing policy (receding horizon: plan, execute ``n_action_steps`` actions, replan)."""
        actor = self.actor(**overrides)
        return Policy(actor, self.obs_normalizer, self.action_normalizer, n_action_steps=actor.config.n_action_steps,
                      seed=seed)

    def plan(self, obs: np.ndarray | Tensor, generator: torch.Generator | None = None,
             goal: np.ndarray | Tensor | None = None, **overrides: Any) -> dict[str, np.ndarray | None]:
        """Plans from raw states (B, obs_dim) or (obs_dim,) in raw units: ``states``, ``actions`` and ``values``
        (predicted discounted return-to-go of the plan, None without a return model)."""
        actor = self.actor(**overrides)
        obs_t = torch.as_tensor(np.asarray(obs), dtype=torch.float32).reshape(-1, self.obs_dim)
        goal_t = None if goal is None else self.obs_normalizer.normalize(torch.as_tensor(goal, dtype=torch.float32))
        with torch.no_grad():
            out = actor.plan(self.obs_normalizer.normalize(obs_t), generator, goal_t)
        values = None if out["values"] is None else self.value_normalizer.denormalize(out["values"]).numpy()
        return {"states": self.obs_normalizer.denormalize(out["states"]).numpy(),
                "actions": self.action_normalizer.denormalize(out["actions"]).numpy(), "values": values}

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "config": asdict(self.config), "obs_dim": self.obs_dim, "act_dim": self.act_dim,
            "nets": self.nets.state_dict(), "learner": self.learner.state_dict(),
            "value_learner": None if self.value_learner is None else self.value_learner.state_dict(),
            "normalizers": {name: getattr(self, f"{name}_normalizer").state_dict()
                            for name in ("obs", "action", "value")},
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["obs_dim"], state["act_dim"]) != (self.obs_dim, self.act_dim):
            raise ValueError(f"saved Diffuser has obs_dim={state['obs_dim']}, act_dim={state['act_dim']}; this one "
                             f"has {self.obs_dim}, {self.act_dim}")
        self.nets.load_state_dict(state["nets"])
        self.learner.load_state_dict(state["learner"])
        if self.value_learner is not None:
            self.value_learner.load_state_dict(state["value_learner"])
        for name, norm in state["normalizers"].items():
            setattr(self, f"{name}_normalizer", Normalizer.from_state_dict(norm))
