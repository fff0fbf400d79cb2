"""LayerNorm residual MLP denoiser: the IDQL actor (Hansen-Estruch et al. 2023, "LN_Resnet").

Layout, as in the official IDQL code (philippe-eecs/IDQL, jaxrl5/networks/resnet.py:MLPResNet and
jaxrl5/networks/diffusion.py:DDPM, FourierFeatures):

- time: learned Fourier features ``[cos(2 pi t' W^T), sin(2 pi t' W^T)]`` of ``t' = time_scale * t + time_offset``
  (``W`` of shape (time_dim / 2, 1), initialised N(0, 0.2^2)), then an MLP ``time_dim -> 2 time_dim -> 2 time_dim``
  with one activation in between;
- input ``concat(x_t, cond, time embedding)`` -> Linear(hidden);
- ``blocks`` residual blocks ``h + W2 act(W1 LayerNorm(Dropout(h)))`` with ``W1`` of width ``expansion * hidden``;
- ``act`` -> Linear(x_dim).

Initialisation follows the official one (Flax defaults): Xavier-uniform for the input, output and time-MLP layers,
LeCun-normal (truncated) for the block layers, zero biases, LayerNorm eps 1e-6.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffrl.nets.activations import ACTIVATIONS
from diffrl.nets.checks import check_shape
from diffrl.nets.embeddings import NullCondition, broadcast_time

#: Flax's LayerNorm epsilon.
LAYER_NORM_EPS = 1e-6
# std of a unit normal truncated to [-2, 2]: Flax's lecun_normal divides by it so the variance is 1 / fan_in.
_TRUNC_STD = 0.87962566103423978


def _xavier(layer: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _lecun_normal(layer: nn.Linear) -> nn.Linear:
    std = math.sqrt(1.0 / layer.in_features) / _TRUNC_STD
    nn.init.trunc_normal_(layer.weight, std=std, a=-2.0 * std, b=2.0 * std)
    nn.init.zeros_(layer.bias)
    return layer


class LearnedFourierTime(nn.Module):
    """``(B,) -> (B, dim)``: ``[cos(2 pi t W^T), sin(2 pi t W^T)]`` with a learned ``W`` (dim / 2, 1)."""

    def __init__(self, dim: int, std: float = 0.2):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"LearnedFourierTime needs an even dim >= 2, got {dim}")
        self.kernel = nn.Parameter(std * torch.randn(dim // 2, 1))

    def forward(self, t: Tensor) -> Tensor:
        f = 2.0 * math.pi * t[:, None].to(self.kernel.dtype) @ self.kernel.T
        return torch.cat([torch.cos(f), torch.sin(f)], dim=-1)


class LNResBlock(nn.Module):
    """``h + W2 act(W1 norm(dropout(h)))``, ``W1`` widening to ``expansion * width``."""

    def __init__(self, width: int, expansion: int = 4, dropout: float = 0.0, layer_norm: bool = True,
                 activation: str = "silu"):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS) if layer_norm else nn.Identity()
        self.fc1 = _lecun_normal(nn.Linear(width, expansion * width))
        self.fc2 = _lecun_normal(nn.Linear(expansion * width, width))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.fc2(self.act(self.fc1(self.norm(self.dropout(h)))))


class LNResNet(nn.Module):
    """Denoiser ``(x_t (B, x_dim), t (B,), cond (B, cond_dim) | None) -> (B, x_dim)`` (see the module docstring).

    ``cond=None`` substitutes a learned null vector for the condition (as :class:`~diffrl.nets.ResidualMLP`).
    ``time_scale`` / ``time_offset`` map the package's diffusion time to what the time features see: a T-step
    discrete chain at t = n / T with ``time_scale=T, time_offset=-1`` gives the step index n - 1 in 0..T-1, the
    official IDQL network input.
    """

    def __init__(
        self,
        x_dim: int,
        cond_dim: int = 0,
        hidden: int = 256,
        blocks: int = 3,
        time_dim: int = 128,
        dropout: float = 0.1,
        layer_norm: bool = True,
        activation: str = "silu",
        expansion: int = 4,
        time_scale: float = 1.0,
        time_offset: float = 0.0,
        cond_drop_prob: float = 0.0,
    ):
        super().__init__()
        if x_dim <= 0 or cond_dim < 0 or hidden <= 0 or blocks < 0 or expansion < 1:
            raise ValueError(f"invalid LNResNet: x_dim={x_dim}, cond_dim={cond_dim}, hidden={hidden}, "
                             f"blocks={blocks}, expansion={expansion}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.x_dim, self.cond_dim = x_dim, cond_dim
        self.x_shape = (x_dim,)
        self.time_scale, self.time_offset = float(time_scale), float(time_offset)
        self.act = ACTIVATIONS[activation]
        self.time_features = LearnedFourierTime(time_dim)
        self.time_fc1 = _xavier(nn.Linear(time_dim, 2 * time_dim))
        self.time_fc2 = _xavier(nn.Linear(2 * time_dim, 2 * time_dim))
        self.null_cond = NullCondition(cond_dim, cond_drop_prob) if cond_dim > 0 else None
        self.stem = _xavier(nn.Linear(x_dim + cond_dim + 2 * time_dim, hidden))
        self.blocks = nn.ModuleList(LNResBlock(hidden, expansion, dropout, layer_norm, activation)
                                    for _ in range(blocks))
        self.head = _xavier(nn.Linear(hidden, x_dim))

    def time_embedding(self, t: Tensor) -> Tensor:
        """(B,) diffusion times -> (B, 2 time_dim)."""
        t = t * self.time_scale + self.time_offset
        return self.time_fc2(self.act(self.time_fc1(self.time_features(t))))

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        check_shape(x_t, (None, self.x_dim), "x_t")
        batch = x_t.shape[0]
        features = [x_t]
        if self.null_cond is not None:
            if cond is not None:
                check_shape(cond, (batch, self.cond_dim), "cond")
            features.append(self.null_cond(cond, batch))
        features.append(self.time_embedding(broadcast_time(t, batch)))
        h = self.stem(torch.cat(features, dim=-1))
        for block in self.blocks:
            h = block(h)
        return self.head(self.act(h))
