"""The diffusion actor shared by DiffusionBC and DiffusionPolicy: observation history in, sampled actions out.

The denoiser models the action (chunk) ``x`` given ``cond`` = the flattened normalised observation history.
Sampling goes through ``DiffusionModel.sample``, which uses a precomputed :class:`~diffrl.solvers.SamplingPlan`
when the solver has one (the low-latency path for control loops).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from agents.policy import register_actor
from diffrl.model import DiffusionModel
from diffrl.nets import ResidualMLP
from diffrl.nets.chi_unet1d import ChiUNet1D
from diffrl.nets.transformer import DiT1D
from diffrl.nets.unet1d import TemporalUNet1D
from diffrl.schedules import make_schedule
from diffrl.solvers import make_solver

#: Backbones by name; "mlp" models the (flattened) chunk as one vector, the others run along the horizon.
NETS = {"mlp": ResidualMLP, "unet1d": TemporalUNet1D, "chi_unet1d": ChiUNet1D, "dit1d": DiT1D}


def build_denoiser(net: str, act_dim: int, horizon: int, cond_dim: int, net_kwargs: dict) -> nn.Module:
    """A denoiser for action chunks (horizon, act_dim) conditioned on a (cond_dim,) vector."""
    if net not in NETS:
        raise ValueError(f"unknown net {net!r}; choose one of {sorted(NETS)}")
    if net == "mlp":
        return ResidualMLP(horizon * act_dim, cond_dim, **net_kwargs)
    return NETS[net](act_dim, horizon, cond_dim, **net_kwargs)


@register_actor("diffusion")
class DiffusionActor(nn.Module):
    """``forward(obs (B, n_obs_steps, obs_dim), generator) -> (B, horizon - action_start, act_dim)`` (normalised).

    Samples a chunk of ``horizon`` actions and returns those from ``action_start`` on (with an observation
    history, the chunk starts at the oldest observation; the action for the newest one is at n_obs_steps - 1).
    """

    def __init__(self, obs_dim: int, act_dim: int, n_obs_steps: int = 1, horizon: int = 1, action_start: int = 0,
                 net: str = "mlp", net_kwargs: dict | None = None, schedule: str = "vp-sde",
                 schedule_kwargs: dict | None = None, prediction: str = "eps", clip_x0: float | None = 1.0,
                 solver: str = "ddpm", solver_kwargs: dict | None = None, steps: int = 5):
        super().__init__()
        if min(obs_dim, act_dim, n_obs_steps, horizon, steps) < 1 or not 0 <= action_start < horizon:
            raise ValueError(f"invalid DiffusionActor sizes: obs_dim={obs_dim}, act_dim={act_dim}, n_obs_steps="
                             f"{n_obs_steps}, horizon={horizon}, action_start={action_start}, steps={steps}")
        self._config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.obs_dim, self.act_dim, self.horizon, self.action_start = obs_dim, act_dim, horizon, action_start
        self.n_obs_steps, self.steps = n_obs_steps, steps
        self.x_shape = (horizon * act_dim,) if net == "mlp" else (horizon, act_dim)
        denoiser = build_denoiser(net, act_dim, horizon, n_obs_steps * obs_dim, dict(net_kwargs or {}))
        self.model = DiffusionModel(denoiser, make_schedule(schedule, **(schedule_kwargs or {})), prediction,
                                    clip_x0=clip_x0)
        self.solver = make_solver(solver, **(solver_kwargs or {}))

    def export_config(self) -> dict[str, Any]:
        return dict(self._config)

    def with_sampling(self, **overrides: Any) -> DiffusionActor:
        """A new actor with other sampling settings (solver, solver_kwargs, steps) and a copy of these weights."""
        allowed = {"solver", "solver_kwargs", "steps", "clip_x0"}
        unknown = set(overrides) - allowed
        if unknown:
            raise ValueError(f"unknown sampling overrides {sorted(unknown)}; allowed: {sorted(allowed)}")
        if "solver" in overrides and "solver_kwargs" not in overrides:
            overrides["solver_kwargs"] = None
        actor = DiffusionActor(**{**self._config, **overrides})
        actor.load_state_dict(self.state_dict())
        return actor

    def cond(self, obs: Tensor) -> Tensor:
        """The denoiser's condition: the flattened observation history (B, n_obs_steps * obs_dim)."""
        if obs.dim() != 3 or obs.shape[1:] != (self.n_obs_steps, self.obs_dim):
            raise ValueError(f"actor input must have shape (B, {self.n_obs_steps}, {self.obs_dim}), "
                             f"got {tuple(obs.shape)}")
        return obs.reshape(obs.shape[0], -1)

    def sample_chunk(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Whole sampled chunks (B, horizon, act_dim) for normalised observation histories."""
        cond = self.cond(obs)
        x = self.model.sample((obs.shape[0], *self.x_shape), cond, solver=self.solver, steps=self.steps,
                              generator=generator)
        return x.reshape(obs.shape[0], self.horizon, self.act_dim)

    def forward(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.sample_chunk(obs, generator)[:, self.action_start:]
