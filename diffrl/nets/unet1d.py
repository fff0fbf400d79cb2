"""Temporal U-Net over sequences (Diffuser trajectories, Diffusion Policy action chunks) and its value head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffrl.nets.activations import Mish, mish
from diffrl.nets.checks import check_shape
from diffrl.nets.conv_unet import DownPath, UNetCore, pad_to_multiple
from diffrl.nets.embeddings import ConditionEncoder, TimeCondEmbedding


def _time_cond_embedding(time_dim: int, cond_dim: int, cond_drop_prob: float) -> TimeCondEmbedding:
    encoder = ConditionEncoder(cond_dim, time_dim, hidden=4 * time_dim, drop_prob=cond_drop_prob) if cond_dim else None
    return TimeCondEmbedding(time_dim, encoder)


class TemporalUNet1D(nn.Module):
    """Denoiser ``(x_t (B, horizon, x_dim), t (B,), cond (B, cond_dim) | None) -> (B, horizon, x_dim)``.

    Convolutions run along the time axis with ``x_dim`` as channels (Janner et al. 2022; Chi et al. 2023).
    The time and condition embeddings are summed and modulate every residual block (FiLM). The network is
    fully convolutional: ``horizon`` sets ``x_shape``, but any sequence length works (padded internally).
    """

    def __init__(
        self,
        x_dim: int,
        horizon: int,
        cond_dim: int = 0,
        dims: tuple[int, ...] = (32, 64, 128),
        kernel_size: int = 5,
        time_dim: int = 32,
        cond_drop_prob: float = 0.0,
    ):
        super().__init__()
        if x_dim <= 0 or horizon <= 0 or cond_dim < 0:
            raise ValueError(f"invalid TemporalUNet1D: x_dim={x_dim}, horizon={horizon}, cond_dim={cond_dim}")
        self.x_dim, self.horizon, self.cond_dim = x_dim, horizon, cond_dim
        self.x_shape = (horizon, x_dim)
        self.embed = _time_cond_embedding(time_dim, cond_dim, cond_drop_prob)
        self.unet = UNetCore(x_dim, x_dim, tuple(dims), time_dim, nd=1, kernel_size=kernel_size)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        check_shape(x_t, (None, None, self.x_dim), "x_t")
        emb = self.embed(t, cond, x_t.shape[0])
        return self.unet(x_t.transpose(1, 2), emb).transpose(1, 2)


class TemporalValueNet1D(nn.Module):
    """Value of a noisy sequence: ``(x_t (B, horizon, x_dim), t (B,), cond | None) -> (B,)``.

    The temporal U-Net's encoder, then the flattened bottom features together with the time/condition
    embedding go through a two-layer MLP (the Diffuser return model, Janner et al. 2022).
    """

    def __init__(
        self,
        x_dim: int,
        horizon: int,
        dims: tuple[int, ...] = (32, 64, 128),
        cond_dim: int = 0,
        kernel_size: int = 5,
        time_dim: int = 32,
        hidden: int = 256,
        cond_drop_prob: float = 0.0,
    ):
        super().__init__()
        if x_dim <= 0 or horizon <= 0 or cond_dim < 0:
            raise ValueError(f"invalid TemporalValueNet1D: x_dim={x_dim}, horizon={horizon}, cond_dim={cond_dim}")
        self.x_dim, self.horizon, self.cond_dim = x_dim, horizon, cond_dim
        self.x_shape = (horizon, x_dim)
        self.embed = _time_cond_embedding(time_dim, cond_dim, cond_drop_prob)
        self.encoder = DownPath(x_dim, tuple(dims), time_dim, nd=1, kernel_size=kernel_size)
        bottom_len = -(-horizon // self.encoder.multiple)
        self.head = nn.Sequential(
            nn.Linear(dims[-1] * bottom_len + time_dim, hidden), Mish(), nn.Linear(hidden, 1)
        )

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        check_shape(x_t, (None, self.horizon, self.x_dim), "x_t")
        emb = self.embed(t, cond, x_t.shape[0])
        x = pad_to_multiple(x_t.transpose(1, 2), self.encoder.multiple, nd=1)
        h, _ = self.encoder(x, mish(emb))
        return self.head(torch.cat([h.flatten(1), emb], dim=1)).squeeze(-1)
