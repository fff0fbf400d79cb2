"""Diffusion Policy (Chi et al. 2023, "Diffusion Policy: Visuomotor Policy Learning via Action Diffusion").

The last ``n_obs_steps`` observations condition a diffusion model of a chunk of ``horizon`` actions that starts at
the oldest of them; the policy executes ``n_action_steps`` actions from the newest observation's step
(chunk index ``n_obs_steps - 1``) on, then plans again (receding horizon with an action queue, handled by
:class:`agents.policy.Policy`). Backbones: the paper's FiLM-conditioned temporal U-Net (``chi_unet1d``, the default,
in the official layout), the paper's transformer (causal self-attention over action tokens, time and observations as
condition tokens), diffrl's temporal U-Net (``unet1d``, Janner et al.'s layout), a DiT-style transformer or an MLP.
Training windows follow the official sequence sampler: they may start up to ``n_obs_steps - 1`` steps before an
episode (first step repeated) and hold up to ``n_action_steps - 1`` steps past its end (last step repeated).

Image observations: with ``cameras`` set, observations are dicts ``{camera: (C, H, W) uint8 in [0, 255] or float in
[0, 1], ..., "state": (D,)}`` (with leading batch / time axes). They are packed into one flat vector per step (the
state, then each camera's pixels scaled to [-1, 1]) that the policy's history and queue carry as they are, and an
:class:`~diffrl.nets.vision.ObservationEncoder` (ResNet-18 with GroupNorm and spatial softmax per camera) inside the
denoiser turns each step into features, trained and averaged (EMA) with the backbone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from agents.diffusion_actor import NETS, build_denoiser
from agents.diffusion_bc import DiffusionBC, schedule_kwargs
from agents.policy import Policy
from diffrl.nets.transformer import CausalTransformer1D
from diffrl.nets.vision import ObservationEncoder
from diffrl.training import Learner

NET_FIELDS = {"chi_unet1d": ("dims", "kernel_size", "time_dim", "num_train_steps"),
              "unet1d": ("dims", "kernel_size", "time_dim"),
              "transformer": ("d_model", "n_layers", "heads", "p_drop_emb", "p_drop_attn", "causal_attn"),
              "dit1d": ("d_model", "n_layers", "heads"), "mlp": ("hidden", "depth", "time_dim")}
#: AdamW settings of Chi et al.'s configs per backbone (``train_diffusion_unet_lowdim_workspace.yaml``,
#: ``train_diffusion_transformer_lowdim_workspace.yaml``), used where the config leaves them unset; the
#: DiT, MLP and diffrl U-Net backbones (not in the paper) take the paper's U-Net's.
OPTIMISER_DEFAULTS = {"chi_unet1d": dict(betas=(0.95, 0.999), weight_decay=1e-6, warmup_steps=500),
                      "transformer": dict(betas=(0.9, 0.95), weight_decay=1e-3, warmup_steps=1000)}
STATE_KEY = "state"


@dataclass
class DiffusionPolicyConfig:
    """Defaults from Chi et al. 2023 and the official lowdim configs: horizon 16, 2 observations, 8 executed actions;
    DDPM with 100 training steps on the squared-cosine schedule (diffusers' ``squaredcos_cap_v2``), eps prediction
    with x0 clipping, DDIM with 10 steps at inference (the paper's DDIM setting); U-Net widths (256, 512, 1024),
    kernel 5, 8 groups, 256 time features; transformer 8 layers, 4 heads, width 256, attention dropout 0.3;
    AdamW lr 1e-4 with the backbone's betas / weight decay / warmup (see ``OPTIMISER_DEFAULTS``; None picks them),
    cosine LR; EMA with power-0.75 warmup to 0.9999 after every update; image encoder: ResNet-18 with GroupNorm,
    32 spatial-softmax keypoints, one encoder per camera, 84x84 crops of 96x96 images (PushT image config).

    The U-Net (``chi_unet1d``) is the official ``ConditionalUnet1D`` layout: same parameter count (65,783,298 for
    2-d actions and a 40-d condition) and, with the official weights loaded, the same outputs to 6e-7 in float64
    (diffrl's sinusoidal frequencies are computed in float32). ``net="unet1d"`` is diffrl's temporal U-Net (condition
    MLP added to the time embedding, Janner et al.'s skips).

    Deviations: weight decay applies to every parameter (the official
    transformer exempts biases, norms and position embeddings); the transformer's time features use diffrl's
    continuous time (t in (0, 1] times 1000) rather than the integer step.
    """

    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    net: str = "chi_unet1d"
    dims: tuple[int, ...] = (256, 512, 1024)
    kernel_size: int = 5
    time_dim: int = 256
    d_model: int = 256
    n_layers: int = 8
    heads: int = 4
    p_drop_emb: float = 0.0
    p_drop_attn: float = 0.3
    causal_attn: bool = True
    hidden: int = 256
    depth: int = 3
    cameras: tuple[str, ...] = ()
    image_shape: tuple[int, int, int] = (3, 96, 96)
    crop_shape: tuple[int, int] = (84, 84)
    num_keypoints: int = 32
    encoder_width: int = 64
    shared_encoder: bool = False
    schedule: str = "ddpm-cosine"
    beta_min: float = 0.1
    beta_max: float = 20.0
    num_train_steps: int = 100
    prediction: str = "eps"
    solver: str = "ddim"
    steps: int = 10
    lr: float = 1e-4
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    lr_schedule: str = "cosine"
    warmup_steps: int | None = None
    total_steps: int | None = None  # learning-rate schedule horizon; None: the run's steps
    max_grad_norm: float | None = None
    ema_decay: float = 0.9999
    ema_power: float | None = 0.75
    ema_inv_gamma: float = 1.0
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
        for name, value in OPTIMISER_DEFAULTS.get(self.net, OPTIMISER_DEFAULTS["chi_unet1d"]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.cameras:
            self._check_images()

    def _check_images(self) -> None:
        names = list(self.cameras)
        if len(set(names)) != len(names) or STATE_KEY in names:
            raise ValueError(f"cameras must be distinct names other than {STATE_KEY!r}, got {names}")
        if self.net == "mlp":
            raise ValueError("image observations need a sequence backbone (chi_unet1d, unet1d, transformer or dit1d), "
                             "not mlp")
        if len(self.image_shape) != 3 or len(self.crop_shape) != 2 or min(*self.image_shape, *self.crop_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) and crop_shape (h, w), got {self.image_shape}, "
                             f"{self.crop_shape}")
        if self.crop_shape[0] > self.image_shape[1] or self.crop_shape[1] > self.image_shape[2]:
            raise ValueError(f"crop_shape {self.crop_shape} is larger than the images {self.image_shape[1:]}")


class EncodedDenoiser(nn.Module):
    """A backbone conditioned on encoded observations: ``(x_t, t, cond (B, n_obs_steps * in_dim))`` ->
    ``backbone(x_t, t, features (B, n_obs_steps * feature_dim))`` with the :class:`ObservationEncoder` applied to
    each step. The encoder is part of the denoiser, so it is trained, averaged and saved with the backbone. While
    sampling without gradients, the features of a condition tensor are computed once for all solver steps.
    """

    def __init__(self, x_dim: int, horizon: int, cond_dim: int, n_obs_steps: int, encoder: dict, backbone: str,
                 backbone_kwargs: dict):
        super().__init__()
        self.encoder = ObservationEncoder(**encoder)
        if cond_dim != n_obs_steps * self.encoder.in_dim:
            raise ValueError(f"cond_dim {cond_dim} is not n_obs_steps ({n_obs_steps}) x the observation size "
                             f"{self.encoder.in_dim}")
        self.n_obs_steps = n_obs_steps
        self.backbone = build_denoiser(backbone, x_dim, horizon, n_obs_steps * self.encoder.feature_dim,
                                       backbone_kwargs)
        self.x_shape = self.backbone.x_shape
        self._features: tuple[Tensor, int, Tensor] | None = None

    def encode(self, cond: Tensor) -> Tensor:
        """Features (B, n_obs_steps * feature_dim) of flat observation histories (B, n_obs_steps * in_dim)."""
        batch = cond.shape[0]
        return self.encoder(cond.reshape(batch * self.n_obs_steps, -1)).reshape(batch, -1)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        cached = self._features
        if cached is not None and cached[0] is cond and cached[1] == cond._version and not torch.is_grad_enabled():
            features = cached[2]
        else:
            features = self.encode(cond)
            self._features = None if torch.is_grad_enabled() else (cond, cond._version, features)
        return self.backbone(x_t, t, features)


# The backbones Diffusion Policy adds to the shared diffusion actor's table.
NETS.update(transformer=CausalTransformer1D, encoded=EncodedDenoiser)


def with_pixels(obs_normalizer: Any, obs_dim: int, config: Any) -> tuple[Any, int]:
    """The normaliser and size of observations whose state (``obs_dim``, normalised by ``obs_normalizer`` or not at
    all) is followed by the pixels of ``config.cameras``, mapped from [0, 1] to [-1, 1]."""
    from envs.datasets import Normalizer

    pixels = len(config.cameras) * math.prod(config.image_shape)
    state = obs_normalizer if obs_normalizer is not None else Normalizer.identity(obs_dim)
    half = torch.full((pixels,), 0.5, dtype=state.mean.dtype, device=state.mean.device)
    return Normalizer(torch.cat([state.mean, half]), torch.cat([state.std, half])), int(obs_dim) + pixels


def encoder_settings(config: Any, state_dim: int) -> dict:
    """The :class:`~diffrl.nets.vision.ObservationEncoder` arguments of a config with cameras."""
    return dict(state_dim=state_dim, cameras=len(config.cameras), image_shape=tuple(config.image_shape),
                crop_shape=tuple(config.crop_shape), num_keypoints=config.num_keypoints, width=config.encoder_width,
                shared=getattr(config, "shared_encoder", False))


def pack_observations(obs: dict[str, Any], cameras: Sequence[str], dtype: torch.dtype) -> Tensor:
    """Dict observations -> the flat vectors (..., D + cameras * C * H * W) of ``dtype``: the ``"state"`` (..., D),
    then each camera's images (..., C, H, W), uint8 divided by 255, floats (in [0, 1]) as they are."""
    missing = [key for key in (STATE_KEY, *cameras) if key not in obs]
    if missing:
        raise ValueError(f"observation dict lacks {missing}; expected keys {[STATE_KEY, *cameras]}")
    state = torch.as_tensor(np.asarray(obs[STATE_KEY]) if not isinstance(obs[STATE_KEY], Tensor) else obs[STATE_KEY])
    parts = [state.to(dtype)]
    for name in cameras:
        image = obs[name] if isinstance(obs[name], Tensor) else torch.as_tensor(np.asarray(obs[name]))
        if image.dim() < 3 or image.shape[:-3] != state.shape[:-1]:
            raise ValueError(f"camera {name!r} has shape {tuple(image.shape)}; expected (..., C, H, W) with the "
                             f"leading axes {tuple(state.shape[:-1])} of the state")
        scaled = image.to(dtype) / 255 if image.dtype == torch.uint8 else image.to(dtype)
        parts.append(scaled.flatten(-3).to(state.device))
    return torch.cat(parts, dim=-1)


class DictObservationPolicy:
    """A :class:`~agents.policy.Policy` that takes dict observations (see :func:`pack_observations`) in ``act``
    and ``predict_action_chunk``; every other attribute is the wrapped policy's."""

    def __init__(self, policy: Policy, cameras: Sequence[str]):
        self.policy, self.cameras = policy, tuple(cameras)

    def _flat(self, obs: dict[str, Any]) -> np.ndarray:
        return pack_observations(obs, self.cameras, self.policy.dtype).cpu().numpy()

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        return self.policy.act(self._flat(obs))

    def predict_action_chunk(self, obs_history: dict[str, Any]) -> np.ndarray:
        return self.policy.predict_action_chunk(self._flat(obs_history))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)


class DiffusionPolicy(DiffusionBC):
    """Observation history -> action chunk diffusion; ``update`` takes one denoising step on a window batch.

    ``obs_dim`` is the size of the state vector; with ``cameras`` the images come on top of it, and
    ``obs_normalizer`` (of the state) is extended to map the pixels from [0, 1] to [-1, 1].
    """

    kind = "diffusion_policy"

    def __init__(self, config: DiffusionPolicyConfig, obs_dim: int, act_dim: int, obs_normalizer: Any = None,
                 action_normalizer: Any = None):
        self.state_dim = int(obs_dim)
        if config.cameras:
            obs_normalizer, obs_dim = with_pixels(obs_normalizer, obs_dim, config)
        super().__init__(config, obs_dim, act_dim, obs_normalizer, action_normalizer)

    def actor_config(self) -> dict:
        c = self.config
        net, net_kwargs = c.net, {field: getattr(c, field) for field in NET_FIELDS[c.net]}
        if net in ("dit1d", "transformer"):
            net_kwargs["depth"] = net_kwargs.pop("n_layers")
        if net == "transformer":
            net_kwargs["n_obs_steps"] = c.n_obs_steps
        if net in ("chi_unet1d", "unet1d"):
            net_kwargs["dims"] = tuple(net_kwargs["dims"])
        if c.cameras:
            encoder = encoder_settings(c, self.state_dim)
            net, net_kwargs = "encoded", dict(n_obs_steps=c.n_obs_steps, encoder=encoder, backbone=net,
                                              backbone_kwargs=net_kwargs)
        return dict(obs_dim=self.obs_dim, act_dim=self.act_dim, n_obs_steps=c.n_obs_steps, horizon=c.horizon,
                    action_start=c.n_obs_steps - 1, net=net, net_kwargs=net_kwargs, schedule=c.schedule,
                    schedule_kwargs=schedule_kwargs(c.schedule, c.beta_min, c.beta_max, c.num_train_steps),
                    prediction=c.prediction, clip_x0=1.0, solver=c.solver, steps=c.steps)

    def make_learner(self, module: nn.Module, ema: bool = True) -> Learner:
        """AdamW with the config's betas; EMA (always kept) with the official warmup of its decay."""
        c = self.config
        return Learner(module, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay,
                       max_grad_norm=c.max_grad_norm, lr_schedule=c.lr_schedule, warmup_steps=c.warmup_steps,
                       total_steps=c.total_steps, ema_decay=c.ema_decay, ema_start=c.ema_start,
                       ema_update_every=c.ema_every, ema_power=c.ema_power, ema_inv_gamma=c.ema_inv_gamma)

    def batch_sampler(self, dataset: Any) -> Callable[[int, torch.Generator | None], dict[str, Tensor]]:
        """Uniform batches of the official windows (``pad_before = n_obs_steps - 1``, ``pad_after =
        n_action_steps - 1``) for ``Trainer``."""
        c = self.config
        return dataset.sequences(c.horizon, pad_before=c.n_obs_steps - 1, pad_after=c.n_action_steps - 1).sample

    def prepare(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(normalised action chunks (B, horizon, act_dim), normalised histories (B, n_obs_steps, obs_dim)).

        With ``cameras``, ``batch["observations"]`` is a dict of (B, T, ...) arrays (see :func:`pack_observations`).
        """
        obs = batch["observations"]
        if self.config.cameras:
            if not isinstance(obs, dict):
                raise ValueError(f"with cameras {list(self.config.cameras)} the batch's observations must be a dict "
                                 f"of {[STATE_KEY, *self.config.cameras]}, got {type(obs).__name__}")
            obs = pack_observations(obs, self.config.cameras, self.dtype)
        obs = self.obs_normalizer.normalize(obs[:, : self.config.n_obs_steps])
        actions = self.action_normalizer.normalize(batch["actions"]).clamp(-1.0, 1.0)
        return actions, obs

    def policy(self, seed: int | None = None, **overrides: Any) -> Policy | DictObservationPolicy:
        """The controller-facing policy; with ``cameras`` it takes dict observations."""
        policy = super().policy(seed, **overrides)
        return DictObservationPolicy(policy, self.config.cameras) if self.config.cameras else policy

    def policy_settings(self) -> dict:
        return {"n_obs_steps": self.config.n_obs_steps, "n_action_steps": self.config.n_action_steps}
