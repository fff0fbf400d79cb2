"""Diffuser (Janner et al. 2022, "Planning with Diffusion for Flexible Behavior Synthesis").

A temporal U-Net models windows of ``horizon`` steps of ``x = concat(normalised state, normalised action)``.
The current state (and, goal-conditioned, a goal state at the last step) is held fixed by inpainting. A return
model on noisy windows predicts the discounted return-to-go of the window's first step; planning samples candidate
plans with value guidance (x_t moved up the return model's gradient before each denoising step), takes the
candidate the return model values most, executes its first action(s) and replans.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from agents.planning import (
    NORMALIZERS,
    PlannerAgent,
    fit_normalizer,
    inpainted_denoising_loss,
    last_observation,
    make_discrete_schedule,
    noisy_inputs,
    state_inpainting,
)
from agents.policy import register_actor
from agents.presets import Preset
from diffrl.guidance import PosteriorValueGuidance
from diffrl.model import DiffusionModel
from diffrl.nets import TemporalUNet1D, TemporalValueNet1D
from diffrl.solvers import make_solver
from envs.datasets import Normalizer, OfflineDataset


@dataclass
class DiffuserConfig:
    """Diffuser hyper-parameters; defaults follow the official locomotion config (jannerm/diffuser,
    ``config/locomotion.py``): horizon 32, T = 20 cosine steps, x0 prediction, U-Net widths 32 x (1, 2, 4, 8), loss
    weight 10 on the first action, learning rate 2e-4, EMA 0.995 every 10 updates from update 2000, batch 32 x 2
    accumulated (:attr:`Diffuser.default_batch_size` 64). The return model regresses the raw (unnormalised, as
    official) discounted return-to-go with discount 0.997 (the value functions the official planner loads) and
    -100 added at terminals. Planning runs DDPM over the whole chain on 64 candidates; before each denoising step x_t
    moves ``n_guide_steps`` = 2 times by ``guide_scale`` (0.1) * posterior variance * grad V, except at the last
    ``t_stopgrad`` = 2 steps; the first action of the highest-valued candidate is executed. :data:`PRESETS` holds
    the official per-task rows (locomotion overrides, Maze2D).

    Deviations: the return model is the U-Net encoder with a two-layer head (the official one narrows the channels
    twice more before its head), and the official halfcheetah U-Net's linear attention is left out (no attention
    blocks here). ``sampling_steps`` None means every step of the chain, the official sampler."""

    horizon: int = 32
    diffusion_steps: int = 20
    schedule: str = "cosine"
    prediction: str = "x0"
    dims: tuple[int, ...] = (32, 64, 128, 256)
    kernel_size: int = 5
    action_weight: float = 10.0
    goal_conditioned: bool = False
    normalizer: str = "gaussian"
    lr: float = 2e-4
    ema_decay: float = 0.995
    ema_start: int = 2000
    ema_every: int = 10
    max_grad_norm: float | None = None
    # return model
    train_value: bool = True
    discount: float = 0.997
    termination_penalty: float = -100.0
    value_lr: float = 2e-4
    # planning
    solver: str = "ddpm"
    sampling_steps: int | None = None
    n_candidates: int = 64
    guide_scale: float = 0.1
    t_stopgrad: int = 2
    n_guide_steps: int = 2
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
        if min(self.n_candidates, self.sampling_steps or 1, self.n_guide_steps) < 1 or self.t_stopgrad < 0:
            raise ValueError(f"n_candidates, sampling_steps and n_guide_steps must be >= 1 and t_stopgrad >= 0, got "
                             f"{self.n_candidates}, {self.sampling_steps}, {self.n_guide_steps}, {self.t_stopgrad}")
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"DiffuserConfig.normalizer must be one of {sorted(NORMALIZERS)}, got {self.normalizer!r}")
        if self.guide_scale and not self.train_value:
            raise ValueError("value guidance (guide_scale != 0) needs the return model: set train_value=True")


#: Config fields that only change how plans are sampled (``policy(**overrides)``).
PLANNING_FIELDS = ("solver", "sampling_steps", "n_candidates", "guide_scale", "t_stopgrad", "n_guide_steps",
                   "n_action_steps", "clip_x0", "goal")

_LOCOMOTION = {"horizon": 32, "diffusion_steps": 20, "dims": (32, 64, 128, 256), "guide_scale": 0.1, "t_stopgrad": 2,
               "n_guide_steps": 2, "discount": 0.997}
_LOCOMOTION_SOURCE = "jannerm/diffuser config/locomotion.py, base{}"
_MAZE2D = {"dims": (32, 128, 256), "action_weight": 1.0, "goal_conditioned": True, "normalizer": "limits",
           "clip_x0": 1.0, "train_value": False, "guide_scale": 0.0, "n_candidates": 1}
_MAZE2D_SOURCE = "jannerm/diffuser maze2d branch, config/maze2d.py, base{}"
#: The evaluation goal inpainted at the last plan step, as the official scripts/plan_maze2d.py conditions on the env's
#: target with zero velocity: D4RL maze2d-v1's fixed goal cell (the map's ``G``) in gymnasium-robotics coordinates,
#: the state ``envs.maze.eval_goal_state`` gives (a test keeps the two equal) and the HDF5 attribute ``eval_goal``.
_MAZE2D_GOAL = "; goal: D4RL maze2d-v1 goal cell centre with zero velocity (envs.maze.eval_goal_state)"

#: Per-task settings of the official configs: the locomotion base with its hopper-medium-expert and halfcheetah
#: overrides; Maze2D goal reaching by inpainting of the start and the evaluation goal (no return model) with the
#: per-maze horizon and chain length.
PRESETS: dict[str, Preset] = {
    **{f"{env}-{level}": Preset(dict(_LOCOMOTION), _LOCOMOTION_SOURCE.format(""))
       for env in ("hopper", "walker2d") for level in ("medium", "medium-replay", "medium-expert")},
    "hopper-medium-expert": Preset({**_LOCOMOTION, "guide_scale": 0.0001, "t_stopgrad": 4},
                                   _LOCOMOTION_SOURCE.format(" + hopper_medium_expert_v2")),
    **{f"halfcheetah-{level}": Preset({**_LOCOMOTION, "horizon": 4, "dims": (32, 128, 256), "guide_scale": 0.001,
                                       "t_stopgrad": 4},
                                      _LOCOMOTION_SOURCE.format(" + halfcheetah_*_v2 (attention left out)"))
       for level in ("medium", "medium-replay", "medium-expert")},
    "maze2d-umaze": Preset({**_MAZE2D, "horizon": 128, "diffusion_steps": 64, "goal": (-1.0, 1.0, 0.0, 0.0)},
                           _MAZE2D_SOURCE.format(" + maze2d_umaze_v1") + _MAZE2D_GOAL),
    "maze2d-medium": Preset({**_MAZE2D, "horizon": 256, "diffusion_steps": 256, "goal": (2.5, -2.5, 0.0, 0.0)},
                            _MAZE2D_SOURCE.format("") + _MAZE2D_GOAL),
    "maze2d-large": Preset({**_MAZE2D, "horizon": 384, "diffusion_steps": 256, "goal": (3.5, -3.0, 0.0, 0.0)},
                           _MAZE2D_SOURCE.format(" + maze2d_large_v1") + _MAZE2D_GOAL),
}


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
        net = TemporalUNet1D(x_dim, c.horizon, dims=c.dims, kernel_size=c.kernel_size, time_dim=c.dims[0])
        self.model = DiffusionModel(net, make_discrete_schedule(c.schedule, c.diffusion_steps), c.prediction,
                                    clip_x0=c.clip_x0)
        self.value = TemporalValueNet1D(x_dim, c.horizon, dims=c.dims, kernel_size=c.kernel_size,
                                        time_dim=c.dims[0]) if c.train_value else None
        if goal is not None and len(goal) != obs_dim:
            raise ValueError(f"goal has {len(goal)} entries, observations have {obs_dim}")
        self.goal = None if goal is None else torch.tensor(goal, dtype=torch.float32)
        self.last_plan: dict[str, Tensor | None] | None = None

    def export_config(self) -> dict:
        goal = None if self.goal is None else self.goal.tolist()
        return {"config": asdict(self.config), "obs_dim": self.obs_dim, "act_dim": self.act_dim, "goal": goal}

    def predicted_value(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        """The return model's value (raw discounted return) of (noisy) plans at time ``t``."""
        return self.value(x, t)

    def sample_candidates(self, obs: Tensor, generator: torch.Generator | None = None,
                          goal: Tensor | None = None) -> Tensor:
        """``n_candidates`` guided plans per state of ``obs`` (B, obs_dim): (B * n_candidates, H, x_dim), the
        candidates of each state consecutive."""
        c = self.config
        goal = self.goal if goal is None else goal
        if c.goal_conditioned and goal is None:
            raise ValueError("this Diffuser is goal-conditioned: give a goal (config.goal or plan(..., goal=))")
        first = obs.repeat_interleave(c.n_candidates, 0)
        last = goal.to(obs).expand_as(first) if c.goal_conditioned else None
        shape = (first.shape[0], c.horizon, self.obs_dim + self.act_dim)
        held = state_inpainting(obs.new_empty(shape), first, last)
        hooks = [held]
        if c.guide_scale:
            hooks.append(PosteriorValueGuidance(self.predicted_value, self.model.schedule, c.guide_scale,
                                                chain_step=1.0 / c.diffusion_steps, t_stopgrad=c.t_stopgrad,
                                                n_steps=c.n_guide_steps, hold=held))
        return self.model.sample(shape, solver=make_solver(c.solver), steps=c.sampling_steps or c.diffusion_steps,
                                 guidance=hooks, generator=generator)

    def plan(self, obs: Tensor, generator: torch.Generator | None = None, goal: Tensor | None = None) -> dict:
        """Plans from normalised states ``obs`` (B, obs_dim): ``states`` (B, H, obs_dim), ``actions`` (B, H, act_dim)
        and the return model's ``values`` (B,) (None without a return model), the highest-valued candidate."""
        batch, n = obs.shape[0], self.config.n_candidates
        x = self.sample_candidates(obs, generator, goal)
        values = None
        best = torch.zeros(batch, dtype=torch.long, device=x.device)
        if self.value is not None:
            with torch.no_grad():
                t0 = torch.full((x.shape[0],), self.model.schedule.t_min, device=x.device, dtype=x.dtype)
                values, best = self.value(x, t0).view(batch, n).max(1)
        x = x.view(batch, n, *x.shape[1:])[torch.arange(batch, device=x.device), best]
        return {"states": x[..., : self.obs_dim], "actions": x[..., self.obs_dim:], "values": values}

    def forward(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self.last_plan = self.plan(last_observation(obs, self.obs_dim), generator)
        return self.last_plan["actions"][:, : self.config.n_action_steps]


class Diffuser(PlannerAgent):
    """Diffuser agent: one ``update`` trains the trajectory model and the return model by one step each.

    The return model's target is the raw discounted, penalised return-to-go of the window's first step (no
    ``return_normalizer``); ``plan(obs, goal=...)`` takes a raw goal state for goal-conditioned models.
    """

    kind = "diffuser"
    actor_class = DiffuserActor
    planning_fields = PLANNING_FIELDS
    presets = PRESETS
    default_batch_size = 64  # official batch 32 with gradient_accumulate_every 2

    def __init__(self, config: DiffuserConfig, obs_dim: int, act_dim: int, obs_normalizer: Normalizer | None = None,
                 action_normalizer: Normalizer | None = None):
        super().__init__(config, obs_dim, act_dim, obs_normalizer, action_normalizer)
        self.learner = self._learn("model.denoiser", config.lr)
        self.value_learner = self._learn("value", config.value_lr) if config.train_value else None
        weights = torch.ones(1, config.horizon, obs_dim + act_dim)
        weights[:, 0, obs_dim:] = config.action_weight
        self._loss_weights = weights

    @classmethod
    def from_dataset(cls, dataset: OfflineDataset, config: DiffuserConfig, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> Diffuser:
        """Dimensions and the ``config.normalizer`` normalisers of states and actions from ``dataset``."""
        return cls(config, dataset.obs_dim, dataset.act_dim, fit_normalizer(dataset.observations, config.normalizer),
                   fit_normalizer(dataset.actions, config.normalizer)).to(device, dtype)

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        """One step on the inpainted denoising loss and, with a return model, one on its regression loss."""
        x0 = torch.cat(self._normalize_obs_and_actions(batch), dim=-1)
        d = self.obs_dim
        held = state_inpainting(x0, x0[:, 0, :d], x0[:, -1, :d] if self.config.goal_conditioned else None)
        loss = inpainted_denoising_loss(self.nets.model, x0, held, weights=self._loss_weights)
        metrics = {"diffusion_loss": loss.detach(), **{f"diffusion_{k}": v for k, v in self.learner.step(loss).items()}}
        if self.value_learner is not None:
            x_t, t, _ = noisy_inputs(self.nets.model, x0, held)
            value_loss = F.mse_loss(self.nets.value(x_t, t), batch["returns_to_go"][:, 0])
            metrics["value_loss"] = value_loss.detach()
            metrics.update({f"value_{k}": v for k, v in self.value_learner.step(value_loss).items()})
        return metrics

    def _actor_kwargs(self, config: DiffuserConfig) -> dict:
        if config.goal is None:
            return {}
        return {"goal": self.obs_normalizer.normalize(torch.tensor(config.goal)).tolist()}
