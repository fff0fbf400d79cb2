"""Run diffusers U-Nets inside diffrl, so the DDPO trainer fine-tunes them like the package's own image model.

A diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` becomes a denoiser ``net(x_t, t, cond)`` on diffrl's
continuous time, and the scheduler's betas become a :class:`DiscreteVP`. diffusers' timestep index k adds noise
with ``alphas_cumprod[k]``, the product of the first k + 1 factors (1 - beta), which is step n = k + 1 of the
DiscreteVP chain, at t = (k + 1) / T; so the U-Net is called at timestep ``t * T - 1``.

Conditions are prompt/class ids (LongTensor (B,)), ``None`` meaning the unconditional (null) prompt:
for a ``UNet2DModel`` with class embeddings they are its ``class_labels`` and ``null_class`` stands for None;
for a ``UNet2DConditionModel`` they index ``prompt_embeds`` (num_prompts, L, D), with ``null_embed`` (L, D) for
None. diffusers is an optional dependency (``pip install diffrl[diffusers]``), imported only when used.
Prompt embeddings are kept on the U-Net's device and in its dtype (and follow it with ``.to``); timesteps are
computed on the device of x_t, in the dtype of t but at least float32 (bf16 cannot tell timestep 998 from 999).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffrl.device import module_device, module_dtype
from diffrl.model import DiffusionModel
from diffrl.schedules import DiscreteVP

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


class DiffusersDenoiser(nn.Module):
    """``(x_t, t in [0, 1], cond ids | None) -> unet output`` for a diffusers U-Net trained on T timesteps."""

    def __init__(self, unet: nn.Module, num_train_timesteps: int, null_class: int | None = None,
                 prompt_embeds: Tensor | None = None, null_embed: Tensor | None = None):
        super().__init__()
        self.unet, self.num_train_timesteps = unet, num_train_timesteps
        self.cross_attention = getattr(unet.config, "cross_attention_dim", None) is not None
        if self.cross_attention:
            if prompt_embeds is None or null_embed is None or prompt_embeds.shape[1:] != null_embed.shape:
                raise ValueError("a UNet2DConditionModel needs prompt_embeds (P, L, D) and null_embed (L, D)")
            place = {"device": module_device(unet), "dtype": module_dtype(unet)}
            self.register_buffer("prompt_embeds", prompt_embeds.detach().to(**place, copy=True))
            self.register_buffer("null_embed", null_embed.detach().to(**place, copy=True))
        elif prompt_embeds is not None or null_embed is not None:
            raise ValueError("prompt_embeds / null_embed apply to UNet2DConditionModel only")
        self.null_class = null_class

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        batch = x_t.shape[0]
        t = t.to(device=x_t.device, dtype=torch.promote_types(t.dtype, torch.float32))
        timestep = (t.reshape(-1).expand(batch) * self.num_train_timesteps - 1.0).clamp_min(0.0)
        if self.cross_attention:
            hidden = self.null_embed.expand(batch, *self.null_embed.shape) if cond is None else self.prompt_embeds[cond]
            return self.unet(x_t, timestep, encoder_hidden_states=hidden).sample
        if cond is None and self.null_class is not None:
            cond = torch.full((batch,), self.null_class, dtype=torch.long, device=x_t.device)
        return self.unet(x_t, timestep, class_labels=cond).sample


def schedule_from_scheduler(scheduler) -> DiscreteVP:
    """The DiscreteVP chain of a diffusers scheduler's betas (alpha_bar at t = (k + 1) / T is alphas_cumprod[k])."""
    return DiscreteVP(torch.as_tensor(scheduler.betas, dtype=torch.float64))


def from_diffusers(unet: nn.Module, scheduler, null_class: int | None = None, prompt_embeds: Tensor | None = None,
                   null_embed: Tensor | None = None, clip_x0: float | None = 1.0) -> DiffusionModel:
    """A :class:`DiffusionModel` around a diffusers U-Net and its scheduler (e.g. ``DDIMScheduler``)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTIONS:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; supported: {sorted(PREDICTIONS)}")
    steps = scheduler.config.num_train_timesteps
    denoiser = DiffusersDenoiser(unet, steps, null_class, prompt_embeds, null_embed)
    return DiffusionModel(denoiser, schedule_from_scheduler(scheduler), PREDICTIONS[prediction_type], clip_x0=clip_x0)
