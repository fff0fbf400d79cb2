"""Diffuser (Janner et al. 2022, "Planning with Diffusion for Flexible Behavior Synthesis").

A temporal U-Net models windows of ``horizon`` steps of ``x = concat(normalised state, normalised action)``.
The current state (and, goal-conditioned, a goal state at the last step) is held fixed by inpainting. A return
model on noisy windows predicts the normalised discounted return-to-go of the window; planning samples candidate
plans with value-gradient guidance, ranks them by the return model, executes the first action(s) and replans.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from agents.planning import (
    PlannerAgent,
    inpainted_denoising_loss,
    last_observation,
    make_discrete_schedule,
    noisy_inputs,
    state_inpainting,
    with_termination_penalty,
)
from agents.policy import register_actor
from diffrl.guidance import GradientGuidance
from diffrl.model import DiffusionModel
from diffrl.nets import TemporalUNet1D, TemporalValueNet1D
from diffrl.solvers import make_solver
from envs.datasets import Normalizer, OfflineDataset


@dataclass
class DiffuserConfig:
    """Diffuser hyper-parameters; defaults follow the locomotion setting of Janner et al. (2022): horizon 32,
    T = 20, x0 prediction, action weight 10, value discount 0.99 with a -100 termination penalty, 64 candidate
    plans, guidance switched off for the last 2 of 20 steps, learning rate 2e-4, EMA 0.995.

    The return model predicts the *standardised* return, so ``guide_scale`` is in those units: the paper's 0.1 on
    raw returns corresponds to 0.1 * std(returns), about 8 on hopper-medium; the default is 10. ``n_guide_steps``
    value gradients are taken per denoising step (the paper uses 2; the default 1 is plain classifier guidance)."""

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
    guide_scale: float = 10.0
    guide_t_stop: float = 0.1
    n_guide_steps: int = 1
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
        if min(self.n_candidates, self.sampling_steps, self.n_guide_steps) < 1:
            raise ValueError(f"n_candidates, sampling_steps and n_guide_steps must be >= 1, got {self.n_candidates}, "
                             f"{self.sampling_steps}, {self.n_guide_steps}")
        if self.guide_scale and not self.train_value:
            raise ValueError("value guidance (guide_scale != 0) needs the return model: set train_value=True")


#: Config fields that only change how plans are sampled (``policy(**overrides)``).
PLANNING_FIELDS = ("solver", "sampling_steps", "n_candidates", "guide_scale", "guide_t_stop", "n_guide_steps",
                   "n_action_steps", "clip_x0", "goal")


@register_actor("diffuser")
class DiffuserActor(nn.Module):
    """Receding-horizon planner: normalised observations (B, n_obs_steps, obs_dim) -> first ``n_action_steps``
    normalised actions of the best plan. ``last_plan`` keeps the latest plans (normalised, see :meth:`plan`)."""

    @property
    def needs_grad(self) -> bool:
        """Value guidance differentiates the return model while sampling."""
        return bool(self.config.guide_scale)

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
        hooks = [] if not c.guide_scale else [GradientGuidance(self.predicted_value, c.guide_scale, c.guide_t_stop,
                                                               n_steps=c.n_guide_steps)]
        hooks.append(state_inpainting(obs.new_empty(shape), first, last))
        x = self.model.sample(shape, solver=make_solver(c.solver), steps=c.sampling_steps, guidance=hooks,
                              generator=generator)
        values = None
        if self.value is not None:
            with torch.no_grad():
                t0 = torch.full((x.shape[0],), self.model.schedule.t_min, device=x.device, dtype=x.dtype)
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


class Diffuser(PlannerAgent):
    """Diffuser agent: one ``update`` trains the trajectory model and the return model by one step each.

    ``return_normalizer`` standardises the return model's target (the window's discounted, penalised
    return-to-go); ``plan(obs, goal=...)`` takes a raw goal state for goal-conditioned models.
    """

    kind = "diffuser"
    actor_class = DiffuserActor
    planning_fields = PLANNING_FIELDS

    def __init__(self, config: DiffuserConfig, obs_dim: int, act_dim: int, obs_normalizer: Normalizer | None = None,
                 action_normalizer: Normalizer | None = None, return_normalizer: Normalizer | None = None):
        super().__init__(config, obs_dim, act_dim, obs_normalizer, action_normalizer, return_normalizer)
        self.learner = self._learn("model.denoiser", config.lr)
        self.value_learner = self._learn("value", config.value_lr) if config.train_value else None
        weights = torch.ones(1, config.horizon, obs_dim + act_dim)
        weights[:, 0, obs_dim:] = config.action_weight
        self._loss_weights = weights

    @classmethod
    def from_dataset(cls, dataset: OfflineDataset, config: DiffuserConfig, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> Diffuser:
        """Dimensions and normalisers (states, actions, discounted penalised returns-to-go) from ``dataset``."""
        returns = with_termination_penalty(dataset, config.termination_penalty).returns_to_go(config.discount)
        return cls(config, dataset.obs_dim, dataset.act_dim, dataset.normalizer("observations"),
                   dataset.normalizer("actions"), Normalizer.fit(returns)).to(device, dtype)

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        """One step on the inpainted denoising loss and, with a return model, one on its regression loss."""
        x0 = torch.cat(self._normalize_obs_and_actions(batch), dim=-1)
        d = self.obs_dim
        held = state_inpainting(x0, x0[:, 0, :d], x0[:, -1, :d] if self.config.goal_conditioned else None)
        loss = inpainted_denoising_loss(self.nets.model, x0, held, weights=self._loss_weights)
        metrics = {"diffusion_loss": loss.detach(), **{f"diffusion_{k}": v for k, v in self.learner.step(loss).items()}}
        if self.value_learner is not None:
            target = self.return_normalizer.normalize(batch["returns_to_go"][:, 0])
            x_t, t, _ = noisy_inputs(self.nets.model, x0, held)
            value_loss = F.mse_loss(self.nets.value(x_t, t), target)
            metrics["value_loss"] = value_loss.detach()
            metrics.update({f"value_{k}": v for k, v in self.value_learner.step(value_loss).items()})
        return metrics

    def _actor_kwargs(self, config: DiffuserConfig) -> dict:
        if config.goal is None:
            return {}
        return {"goal": self.obs_normalizer.normalize(torch.tensor(config.goal)).tolist()}
