"""Diffusion Policy (Chi et al. 2023, "Diffusion Policy: Visuomotor Policy Learning via Action Diffusion").

The last ``n_obs_steps`` observations condition a diffusion model of a chunk of ``horizon`` actions that starts at
the oldest of them; the policy executes ``n_action_steps`` actions from the newest observation's step on, then
plans again (receding horizon with an action queue, handled by :class:`agents.policy.Policy`). Backbones: the
FiLM-conditioned temporal U-Net (the paper's CNN variant) or a DiT-style transformer, conditioned on the flattened
normalised observation history. Training windows come from ``dataset.sequences(horizon)`` (padded at episode ends
by repeating the last step) and may start up to ``n_obs_steps - 1`` steps before an episode (first step repeated).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from agents.diffusion_bc import DiffusionBC, schedule_kwargs

NET_FIELDS = {"unet1d": ("dims", "kernel_size", "time_dim"), "dit1d": ("d_model", "n_layers", "heads"),
              "mlp": ("hidden", "depth", "time_dim")}


@dataclass
class DiffusionPolicyConfig:
    """Defaults from Chi et al. 2023 (horizon 16, 2 observations, 8 executed actions, squared-cosine noise schedule
    (here in continuous time: ``trig-flow``, alpha = cos(pi t / 2)), eps prediction with x0 clipping, DDIM with 10
    steps at inference, AdamW lr 1e-4 / weight decay 1e-6, cosine LR after 500 warmup steps, EMA); the U-Net widths
    are reduced from (256, 512, 1024) to CPU size."""

    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    net: str = "unet1d"
    dims: tuple[int, ...] = (64, 128, 256)
    kernel_size: int = 5
    time_dim: int = 64
    d_model: int = 128
    n_layers: int = 4
    heads: int = 4
    hidden: int = 256
    depth: int = 3
    schedule: str = "trig-flow"
    beta_min: float = 0.1
    beta_max: float = 20.0
    num_train_steps: int = 100
    prediction: str = "eps"
    solver: str = "ddim"
    steps: int = 10
    lr: float = 1e-4
    weight_decay: float = 1e-6
    lr_schedule: str = "cosine"
    warmup_steps: int = 500
    total_steps: int | None = None  # learning-rate schedule horizon; None: the run's steps
    max_grad_norm: float | None = None
    ema_decay: float = 0.995
    ema_start: int = 0
    ema_every: int = 1

    def __post_init__(self) -> None:
        if self.net not in NET_FIELDS:
            raise ValueError(f"net must be one of {sorted(NET_FIELDS)}, got {self.net!r}")
        if not 1 <= self.n_obs_steps <= self.horizon:
            raise ValueError(f"need 1 <= n_obs_steps <= horizon, got {self.n_obs_steps}, {self.horizon}")
        if not 1 <= self.n_action_steps <= self.horizon - self.n_obs_steps + 1:
            raise ValueError(f"n_action_steps must lie in [1, horizon - n_obs_steps + 1] = "
                             f"[1, {self.horizon - self.n_obs_steps + 1}], got {self.n_action_steps}")


class WindowSampler:
    """Batches of (observation history, action chunk) windows of ``horizon`` steps from ``dataset.sequences``.

    Besides every window of the sequence set, each episode contributes ``n_obs_steps - 1`` windows that start
    before it: its first window shifted right by k steps, with the first step repeated k times in front.
    """

    def __init__(self, dataset: Any, horizon: int, n_obs_steps: int):
        self.sequences = dataset.sequences(horizon, pad=True)
        self.horizon, self.shifts = horizon, n_obs_steps - 1
        episode = self.sequences.episode_index
        first = torch.ones(len(episode), dtype=torch.bool, device=episode.device)
        first[1:] = episode[1:] != episode[:-1]
        self.first_windows = torch.nonzero(first).squeeze(1)
        self._steps = torch.arange(horizon, device=episode.device)

    def __len__(self) -> int:
        return len(self.sequences) + self.shifts * len(self.first_windows)

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        device = self.first_windows.device
        idx = torch.randint(0, len(self), (batch_size,), generator=generator, device=device)
        shift = torch.zeros_like(idx)
        if self.shifts:  # no data-dependent branch: nothing is read back from the device
            extra = (idx - len(self.sequences)).clamp_min(0)
            shifted = idx >= len(self.sequences)
            shift = torch.where(shifted, extra % self.shifts + 1, shift)
            idx = torch.where(shifted, self.first_windows[extra // self.shifts], idx)
        batch = self.sequences[idx]
        pos = (self._steps - shift[:, None]).clamp_min(0)
        rows = torch.arange(batch_size, device=device)[:, None]
        return {k: v[rows, pos] for k, v in batch.items()}


class DiffusionPolicy(DiffusionBC):
    """Observation history -> action chunk diffusion; ``update`` takes one denoising step on a window batch."""

    kind = "diffusion_policy"

    def actor_config(self) -> dict:
        c = self.config
        net_kwargs = {field: getattr(c, field) for field in NET_FIELDS[c.net]}
        if c.net == "dit1d":
            net_kwargs["depth"] = net_kwargs.pop("n_layers")
        if c.net == "unet1d":
            net_kwargs["dims"] = tuple(net_kwargs["dims"])
        return dict(obs_dim=self.obs_dim, act_dim=self.act_dim, n_obs_steps=c.n_obs_steps, horizon=c.horizon,
                    action_start=c.n_obs_steps - 1, net=c.net, net_kwargs=net_kwargs, schedule=c.schedule,
                    schedule_kwargs=schedule_kwargs(c.schedule, c.beta_min, c.beta_max, c.num_train_steps),
                    prediction=c.prediction, clip_x0=1.0, solver=c.solver, steps=c.steps)

    def batch_sampler(self, dataset: Any) -> Callable[[int, torch.Generator | None], dict[str, Tensor]]:
        """The window sampler for ``Trainer``."""
        return WindowSampler(dataset, self.config.horizon, self.config.n_obs_steps)

    def prepare(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(normalised action chunks (B, horizon, act_dim), normalised histories (B, n_obs_steps, obs_dim))."""
        obs = self.obs_normalizer.normalize(batch["observations"][:, : self.config.n_obs_steps])
        actions = self.action_normalizer.normalize(batch["actions"]).clamp(-1.0, 1.0)
        return actions, obs

    def policy_settings(self) -> dict:
        return {"n_obs_steps": self.config.n_obs_steps, "n_action_steps": self.config.n_action_steps}
