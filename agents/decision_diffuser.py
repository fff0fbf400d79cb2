"""Decision Diffuser (Ajay et al. 2023, "Is Conditional Generative Modeling all you need for Decision-Making?").

A temporal U-Net models windows of normalised states only, conditioned on the return-to-go of the window's first
step (divided by ``returns_scale``) through classifier-free guidance (the condition is dropped with probability
``cond_drop_prob`` in training; planning mixes conditional and unconditional predictions with weight
``guidance_weight``). The current state is held by
inpainting, and an inverse-dynamics MLP ``a_t = f(s_t, s_{t+1})`` turns the planned states into actions.
"""

from __future__ import annotations

import dataclasses
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
    state_inpainting,
)
from agents.policy import register_actor
from agents.presets import Preset
from diffrl.guidance import ClassifierFree
from diffrl.model import DiffusionModel
from diffrl.nets import TemporalUNet1D
from diffrl.solvers import DDPM, make_solver
from envs.datasets import Normalizer, OfflineDataset


@dataclass
class DecisionDiffuserConfig:
    """Decision Diffuser hyper-parameters; defaults follow the official code (anuragajay/decision-diffuser,
    ``code/config/locomotion_config.py`` and ``code/analysis/default_inv.py``): horizon 100, T = 200 cosine steps,
    eps prediction with the x0 estimate clipped to [-1, 1], U-Net widths 128 x (1, 4, 8), condition dropout 0.25,
    guidance weight 1.2, the return condition = the discounted (0.99) return-to-go of the window's first step with
    -100 added at terminals, divided by ``returns_scale`` (400, the official hopper value), target return 0.9 in
    those units, inverse dynamics MLP with 256 hidden units, learning rate 2e-4, EMA 0.995 every 10 updates from
    update 2000, batch 32 x 2 accumulated (:attr:`DecisionDiffuser.default_batch_size` 64).

    Deviations: states and actions are mapped to [-1, 1] by their [min, max] (``normalizer="limits"``) where the
    official code uses per-dimension empirical CDFs; both fill [-1, 1], so the x0 clip keeps its meaning. Planning
    defaults to DPM-Solver++ with 20 steps (a tenth of the official network calls); ``solver="ddpm"``,
    ``sampling_steps=None`` (the whole chain) and ``temperature=0.5`` is the official sampler. The official code gives
    ``returns_scale`` for hopper only; set it per environment so that returns / returns_scale lie near [0, 1]."""

    horizon: int = 100
    diffusion_steps: int = 200
    schedule: str = "cosine"
    prediction: str = "eps"
    dims: tuple[int, ...] = (128, 512, 1024)
    kernel_size: int = 5
    normalizer: str = "limits"
    cond_drop_prob: float = 0.25
    discount: float = 0.99
    termination_penalty: float = -100.0
    returns_scale: float = 400.0
    inverse_dynamics_hidden: int = 256
    lr: float = 2e-4
    inverse_dynamics_lr: float = 2e-4
    ema_decay: float = 0.995
    ema_start: int = 2000
    ema_every: int = 10
    max_grad_norm: float | None = None
    # planning
    solver: str = "dpm-solver++"
    sampling_steps: int | None = 20
    temperature: float = 1.0
    guidance_weight: float = 1.2
    target_return: float = 0.9
    n_action_steps: int = 1
    clip_x0: float | None = 1.0

    def __post_init__(self) -> None:
        self.dims = tuple(self.dims)
        if self.horizon < 2:
            raise ValueError(f"DecisionDiffuserConfig.horizon must be >= 2, got {self.horizon}")
        if not 1 <= self.n_action_steps < self.horizon:
            raise ValueError(f"n_action_steps must lie in [1, horizon - 1 = {self.horizon - 1}], "
                             f"got {self.n_action_steps}")
        if not 0.0 < self.cond_drop_prob < 1.0:
            raise ValueError(f"classifier-free guidance needs 0 < cond_drop_prob < 1, got {self.cond_drop_prob}")
        if self.returns_scale <= 0 or self.temperature <= 0 or (self.sampling_steps or 1) < 1:
            raise ValueError(f"returns_scale and temperature must be > 0 and sampling_steps >= 1, got "
                             f"{self.returns_scale}, {self.temperature}, {self.sampling_steps}")
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"DecisionDiffuserConfig.normalizer must be one of {sorted(NORMALIZERS)}, "
                             f"got {self.normalizer!r}")


#: Config fields that only change how plans are sampled (``policy(**overrides)``).
PLANNING_FIELDS = ("solver", "sampling_steps", "temperature", "guidance_weight", "target_return", "n_action_steps",
                   "clip_x0")

#: The one per-task value the official code gives (its sweep runs hopper-medium-expert only).
PRESETS: dict[str, Preset] = {
    "hopper-medium-expert": Preset(
        {"returns_scale": 400.0}, "anuragajay/decision-diffuser code/analysis/default_inv.py (hopper-medium-expert-v2)"
    ),
}


class TemperedDDPM(DDPM):
    """DDPM whose per-step noise is scaled by ``temperature`` (the official sampler's 0.5; the prior draw is scaled
    by the caller)."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def step(self, model, x, t, s, cond, guidance, generator, state):
        dist = self.step_distribution(model, x, t, s, cond, guidance)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return dist.mean + self.temperature * dist.std * noise

    def affine_step(self, model, grid, i):
        step = super().affine_step(model, grid, i)
        return dataclasses.replace(step, noise=step.noise * self.temperature)


class InverseDynamics(nn.Module):
    """``a_t = f(s_t, s_{t+1})`` on normalised states and actions: a two-hidden-layer ReLU MLP."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, act_dim))

    def forward(self, states: Tensor, next_states: Tensor) -> Tensor:
        return self.net(torch.cat([states, next_states], dim=-1))


@register_actor("decision_diffuser")
class DecisionDiffuserActor(nn.Module):
    """Return-conditioned planner: normalised observations (B, n_obs_steps, obs_dim) -> the inverse-dynamics
    actions between the first ``n_action_steps + 1`` planned states. ``last_plan`` keeps the latest plans."""

    def __init__(self, config: DecisionDiffuserConfig | dict, obs_dim: int, act_dim: int):
        super().__init__()
        self.config = config if isinstance(config, DecisionDiffuserConfig) else DecisionDiffuserConfig(**config)
        c = self.config
        self.obs_dim, self.act_dim = obs_dim, act_dim
        net = TemporalUNet1D(obs_dim, c.horizon, cond_dim=1, dims=c.dims, kernel_size=c.kernel_size,
                             time_dim=c.dims[0], cond_drop_prob=c.cond_drop_prob)
        self.model = DiffusionModel(net, make_discrete_schedule(c.schedule, c.diffusion_steps), c.prediction,
                                    clip_x0=c.clip_x0)
        self.inverse_dynamics = InverseDynamics(obs_dim, act_dim, c.inverse_dynamics_hidden)
        self.last_plan: dict[str, Tensor] | None = None

    def export_config(self) -> dict:
        return {"config": asdict(self.config), "obs_dim": self.obs_dim, "act_dim": self.act_dim}

    def plan(self, obs: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Plans from normalised states ``obs`` (B, obs_dim): ``states`` (B, H, obs_dim), inverse-dynamics
        ``actions`` (B, H - 1, act_dim) and the requested return ``values`` (B,) in ``returns_scale`` units."""
        c = self.config
        shape = (obs.shape[0], c.horizon, self.obs_dim)
        returns = obs.new_full((obs.shape[0], 1), c.target_return)
        hooks = [ClassifierFree(c.guidance_weight), state_inpainting(obs.new_empty(shape), obs)]
        x_T = c.temperature * self.model.schedule.prior(shape, generator=generator, device=obs.device, dtype=obs.dtype)
        solver = TemperedDDPM(c.temperature) if c.solver == "ddpm" else make_solver(c.solver)
        states = self.model.sample(shape, returns, solver=solver, steps=c.sampling_steps or c.diffusion_steps,
                                   guidance=hooks, generator=generator, x_T=x_T)
        actions = self.inverse_dynamics(states[:, :-1], states[:, 1:])
        return {"states": states, "actions": actions, "values": returns[:, 0]}

    def forward(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self.last_plan = self.plan(last_observation(obs, self.obs_dim), generator)
        return self.last_plan["actions"][:, : self.config.n_action_steps]


class DecisionDiffuser(PlannerAgent):
    """Decision Diffuser agent: one ``update`` trains the state diffusion model and the inverse dynamics.

    ``return_normalizer`` divides a window's discounted return-to-go by ``returns_scale``; that value is the
    condition in training and ``target_return`` the one requested when planning.
    """

    kind = "decision_diffuser"
    actor_class = DecisionDiffuserActor
    planning_fields = PLANNING_FIELDS
    presets = PRESETS
    default_batch_size = 64  # official batch 32 with gradient_accumulate_every 2

    def __init__(self, config: DecisionDiffuserConfig, obs_dim: int, act_dim: int,
                 obs_normalizer: Normalizer | None = None, action_normalizer: Normalizer | None = None,
                 return_normalizer: Normalizer | None = None):
        super().__init__(config, obs_dim, act_dim, obs_normalizer, action_normalizer, return_normalizer)
        self.learner = self._learn("model.denoiser", config.lr)
        self.inverse_dynamics_learner = self._learn("inverse_dynamics", config.inverse_dynamics_lr)

    @classmethod
    def from_dataset(cls, dataset: OfflineDataset, config: DecisionDiffuserConfig,
                     device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> DecisionDiffuser:
        """Dimensions, the ``config.normalizer`` normalisers of states and actions and the return scaling."""
        return cls(config, dataset.obs_dim, dataset.act_dim, fit_normalizer(dataset.observations, config.normalizer),
                   fit_normalizer(dataset.actions, config.normalizer),
                   Normalizer(torch.zeros(()), torch.tensor(config.returns_scale))).to(device, dtype)

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        """One step on the return-conditioned denoising loss and one on the inverse-dynamics regression."""
        obs, act = self._normalize_obs_and_actions(batch)
        returns = self.return_normalizer.normalize(batch["returns_to_go"][:, :1])
        loss = inpainted_denoising_loss(self.nets.model, obs, state_inpainting(obs, obs[:, 0]), returns)
        metrics = {"diffusion_loss": loss.detach(), **{f"diffusion_{k}": v for k, v in self.learner.step(loss).items()}}
        valid = batch["mask"][:, 1:]
        predicted = self.nets.inverse_dynamics(obs[:, :-1][valid], obs[:, 1:][valid])
        id_loss = F.mse_loss(predicted, act[:, :-1][valid])
        metrics["inverse_dynamics_loss"] = id_loss.detach()
        metrics.update({f"inverse_dynamics_{k}": v for k, v in self.inverse_dynamics_learner.step(id_loss).items()})
        return metrics
