"""Shared pieces of the trajectory planners (Diffuser, Decision Diffuser).

Planners model whole windows ``x (B, horizon, x_dim)`` whose first ``obs_dim`` features per step are the
normalised state. Known states (the current one at step 0, a goal at the last step) are held fixed by inpainting
both in training (the noisy input carries the clean values there and the loss ignores them) and in sampling
(`diffrl.guidance.Inpainting`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffrl.guidance import Inpainting
from diffrl.model import DiffusionModel
from diffrl.schedules import DiscreteVP
from envs.datasets import OfflineDataset, SequenceDataset

SCHEDULES = {"cosine": DiscreteVP.cosine, "linear": DiscreteVP.linear}


def make_discrete_schedule(name: str, num_steps: int) -> DiscreteVP:
    """DDPM chain of ``num_steps`` steps with cosine or linear betas."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown planner schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if num_steps < 2:
        raise ValueError(f"the diffusion chain needs at least 2 steps, got {num_steps}")
    return SCHEDULES[name](num_steps)


def with_termination_penalty(dataset: OfflineDataset, penalty: float) -> OfflineDataset:
    """``dataset`` with ``penalty`` added to the reward of every terminal transition (Janner et al. 2022)."""
    if not penalty:
        return dataset
    rewards = dataset.rewards + penalty * dataset.terminals.float()
    return OfflineDataset(dataset.observations, dataset.actions, rewards, dataset.next_observations,
                          dataset.terminals, dataset.timeouts, name=dataset.name, env_id=dataset.env_id,
                          source=dataset.source)


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
    t = model.schedule.sample_t(x0.shape[0], generator=generator, device=x0.device)
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
