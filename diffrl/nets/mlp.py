"""Residual MLP denoiser for low-dimensional samples (the Diffusion-QL / IDQL actor)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffrl.nets.activations import ACTIVATIONS
from diffrl.nets.checks import check_shape
from diffrl.nets.embeddings import NullCondition, TimeMLP, broadcast_time


class ResidualMLP(nn.Module):
    """Denoiser ``(x_t (B, x_dim), t (B,), cond (B, cond_dim) | None) -> (B, x_dim)``.

    The input is ``concat(x_t, time features, cond)`` as in the Diffusion-QL actor (Wang et al. 2023): the raw
    condition (e.g. the state) enters directly; ``cond=None`` and condition dropout substitute a learned null
    vector for it. ``depth`` counts hidden layers of width ``hidden``: an input layer, then ``depth - 1``
    pre-activation residual layers ``h + W act(norm(h))`` (norm = LayerNorm if ``layer_norm``, else none), so
    ``depth=3, hidden=256`` has the layer sizes of the "3x256" actor.
    """

    def __init__(
        self,
        x_dim: int,
        cond_dim: int = 0,
        hidden: int = 256,
        depth: int = 3,
        time_dim: int = 16,
        cond_drop_prob: float = 0.0,
        activation: str = "mish",
        layer_norm: bool = False,
    ):
        super().__init__()
        if x_dim <= 0 or cond_dim < 0 or hidden <= 0 or depth < 1:
            raise ValueError(f"invalid ResidualMLP: x_dim={x_dim}, cond_dim={cond_dim}, hidden={hidden}, depth={depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.x_dim, self.cond_dim = x_dim, cond_dim
        self.x_shape = (x_dim,)
        self.act = ACTIVATIONS[activation]
        self.time = TimeMLP(time_dim)
        self.null_cond = NullCondition(cond_dim, cond_drop_prob) if cond_dim > 0 else None
        self.stem = nn.Linear(x_dim + time_dim + cond_dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(depth - 1)) if layer_norm else None
        self.head = nn.Linear(hidden, x_dim)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        check_shape(x_t, (None, self.x_dim), "x_t")
        batch = x_t.shape[0]
        features = [x_t, self.time(broadcast_time(t, batch))]
        if self.null_cond is not None:
            if cond is not None:
                check_shape(cond, (batch, self.cond_dim), "cond")
            features.append(self.null_cond(cond, batch))
        h = self.stem(torch.cat(features, dim=-1))
        for i, layer in enumerate(self.layers):
            h = h + layer(self.act(h) if self.norms is None else self.act(self.norms[i](h)))
        return self.head(self.act(h))
