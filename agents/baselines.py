"""Gaussian MLP behaviour cloning: the unimodal baseline the diffusion policies are compared with.

The actor maps the normalised state to the mean and (state-dependent, clamped) log-std of a diagonal Gaussian over
the normalised action and is trained by maximum likelihood. Acting uses the mean (``deterministic=True``, the
usual evaluation of BC) or a sample. Normalisation and the agent interface are DiffusionBC's.

With ``n_obs_steps`` > 1 the actor sees the last observations concatenated (trained on sequence windows, see
``batch_sampler``); with ``cameras`` the observations are dicts of images and a state, as Diffusion Policy's, encoded
per step by the same :class:`~diffrl.nets.vision.ObservationEncoder` before the MLP.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from agents.diffusion_bc import CloningAgent
from agents.diffusion_policy import DictObservationPolicy, encoder_settings, pack_observations, with_pixels
from agents.policy import register_actor
from diffrl.nets.activations import Mish
from diffrl.nets.vision import ObservationEncoder


@dataclass
class GaussianBCConfig:
    """An MLP of the same size as the diffusion actor (3x256), trained with the same optimiser settings."""

    hidden: int = 256
    depth: int = 3
    min_log_std: float = -5.0
    max_log_std: float = 2.0
    deterministic: bool = True
    lr: float = 3e-4
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None  # learning-rate schedule horizon; None: the run's steps
    max_grad_norm: float | None = None
    n_obs_steps: int = 1
    cameras: tuple[str, ...] = ()
    image_shape: tuple[int, int, int] = (3, 96, 96)
    crop_shape: tuple[int, int] = (84, 84)
    num_keypoints: int = 32
    encoder_width: int = 64

    def __post_init__(self) -> None:
        if self.n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {self.n_obs_steps}")


@register_actor("gaussian_mlp")
class GaussianActor(nn.Module):
    """``forward(obs (B, 1, obs_dim), generator) -> (B, 1, act_dim)``: the Gaussian's mean or a draw, in [-1, 1]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 3, min_log_std: float = -5.0,
                 max_log_std: float = 2.0, deterministic: bool = True, n_obs_steps: int = 1,
                 encoder: dict | None = None):
        super().__init__()
        self._config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.obs_dim, self.act_dim, self.deterministic = obs_dim, act_dim, deterministic
        self.min_log_std, self.max_log_std, self.n_obs_steps = min_log_std, max_log_std, n_obs_steps
        self.encoder = ObservationEncoder(**encoder) if encoder is not None else None
        layers: list[nn.Module] = []
        width = n_obs_steps * (self.encoder.feature_dim if self.encoder is not None else obs_dim)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), Mish()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, 2 * act_dim)

    def export_config(self) -> dict[str, Any]:
        return dict(self._config)

    def distribution(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log_std) of the action given the newest ``n_obs_steps`` normalised observations of
        (B, T >= n_obs_steps, obs_dim)."""
        if obs.dim() != 3 or obs.shape[-1] != self.obs_dim or obs.shape[1] < self.n_obs_steps:
            raise ValueError(f"actor input must have shape (B, T >= {self.n_obs_steps}, {self.obs_dim}), got "
                             f"{tuple(obs.shape)}")
        obs = obs[:, obs.shape[1] - self.n_obs_steps:]
        if self.encoder is not None:
            obs = self.encoder(obs.reshape(-1, self.obs_dim)).view(obs.shape[0], self.n_obs_steps, -1)
        mean, log_std = self.head(self.body(obs.flatten(1))).chunk(2, dim=-1)
        return mean, log_std.clamp(self.min_log_std, self.max_log_std)

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        """Log-density (B,) of normalised ``actions`` (B, act_dim)."""
        mean, log_std = self.distribution(obs)
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def forward(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean, log_std = self.distribution(obs)
        if not self.deterministic:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + log_std.exp() * noise
        return mean.clamp(-1.0, 1.0).unsqueeze(1)


class GaussianBC(CloningAgent):
    """Maximum-likelihood Gaussian behaviour cloning; ``update`` takes one NLL step on a transition batch."""

    kind = "gaussian_bc"

    def __init__(self, config: GaussianBCConfig, obs_dim: int, act_dim: int, obs_normalizer: Any = None,
                 action_normalizer: Any = None):
        c = config
        self.state_dim, encoder = int(obs_dim), None
        if c.cameras:  # the state, then each camera's pixels (as Diffusion Policy)
            obs_normalizer, obs_dim = with_pixels(obs_normalizer, obs_dim, c)
            encoder = encoder_settings(c, self.state_dim)
        super().__init__(config, obs_dim, act_dim, obs_normalizer, action_normalizer)
        self.actor = GaussianActor(self.obs_dim, self.act_dim, c.hidden, c.depth, c.min_log_std, c.max_log_std,
                                   c.deterministic, c.n_obs_steps, encoder)
        self.learner = self.make_learner(self.actor, ema=False)

    def batch_sampler(self, dataset: Any) -> Callable[[int, torch.Generator | None], dict[str, Tensor]]:
        """Transitions, or with ``n_obs_steps`` > 1 windows of that many steps (the first step repeated before an
        episode's start) whose last action is the target."""
        n = self.config.n_obs_steps
        return dataset.sample if n == 1 else dataset.sequences(n, pad_before=n - 1, pad_after=0).sample

    def prepare(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(normalised actions (B, act_dim), normalised observation histories (B, T, obs_dim)); window batches
        (observations with a time axis, dicts of cameras and state with ``cameras``) train on their last action."""
        obs, actions = batch["observations"], batch["actions"]
        if self.config.cameras:
            obs = pack_observations(obs, self.config.cameras, self.dtype)
        if actions.dim() == 2:
            obs = obs.unsqueeze(1)
        else:
            obs, actions = obs[:, : self.config.n_obs_steps], actions[:, self.config.n_obs_steps - 1]
        return self.action_normalizer.normalize(actions).clamp(-1.0, 1.0), self.obs_normalizer.normalize(obs)

    def policy_settings(self) -> dict:
        return {"n_obs_steps": self.config.n_obs_steps, "n_action_steps": 1}

    def policy(self, seed: int | None = None, **overrides: Any) -> Any:
        """The controller-facing policy; with ``cameras`` it takes dict observations."""
        policy = super().policy(seed, **overrides)
        return DictObservationPolicy(policy, self.config.cameras) if self.config.cameras else policy

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        actions, obs = self.prepare(batch)
        loss = -self.actor.log_prob(obs, actions).mean()
        return {"loss": loss.detach(), **self.learner.step(loss)}

    def policy_actor(self, deterministic: bool | None = None) -> GaussianActor:
        """A copy of the actor; ``deterministic`` overrides acting with the mean."""
        config = self.actor.export_config()
        if deterministic is not None:
            config["deterministic"] = deterministic
        actor = GaussianActor(**config)
        actor.load_state_dict(self.actor.state_dict())
        return actor
