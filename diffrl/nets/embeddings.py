"""Time features and condition encoders shared by the denoiser backbones.

Every condition encoder has the call ``encoder(cond, batch_size) -> (B, embed_dim)``. ``cond=None`` means
"unconditional" and yields a learned null embedding; in training mode each sample's embedding is replaced by
the null embedding with probability ``drop_prob`` (condition dropout for classifier-free guidance).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffrl.nets.activations import Mish, mish
from diffrl.nets.checks import check_shape


def broadcast_time(t: Tensor, batch_size: int) -> Tensor:
    """Diffusion times as a floating tensor of shape (batch_size,), from a scalar or a (B,) tensor (integer steps
    become float32; floating times keep their dtype)."""
    t = t.reshape(-1).expand(batch_size)
    return t if t.is_floating_point() else t.float()


class _PhaseFeatures(nn.Module):
    """``sin(t * freqs + phase)``: sin and cos features in one op, with ``phase`` = 0 for sin and pi/2 for cos."""

    def __init__(self, freqs: Tensor, persistent: bool):
        super().__init__()
        self.register_buffer("freqs", torch.cat([freqs, freqs]), persistent=persistent)
        phase = torch.cat([torch.zeros_like(freqs), torch.full_like(freqs, math.pi / 2)])
        self.register_buffer("phase", phase, persistent=False)
        self.dim = 2 * freqs.numel()

    def forward(self, t: Tensor) -> Tensor:
        return torch.sin(torch.addcmul(self.phase, t[:, None].to(self.freqs.dtype), self.freqs))


def _check_even(dim: int, name: str) -> int:
    if dim < 2 or dim % 2:
        raise ValueError(f"{name} needs an even dim >= 2, got {dim}")
    return dim // 2


class SinusoidalTimeEmbedding(_PhaseFeatures):
    """Transformer-style ``[sin, cos]`` features of ``scale * t`` at geometrically spaced frequencies."""

    def __init__(self, dim: int, scale: float = 1000.0):
        half = _check_even(dim, "SinusoidalTimeEmbedding")
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        super().__init__(scale * freqs, persistent=False)


class FourierTimeEmbedding(_PhaseFeatures):
    """Random Fourier features ``[sin(2 pi w t), cos(2 pi w t)]``, fixed ``w ~ N(0, std^2)``."""

    def __init__(self, dim: int, std: float = 16.0):
        half = _check_even(dim, "FourierTimeEmbedding")
        super().__init__(2 * math.pi * std * torch.randn(half), persistent=True)


class TimeMLP(nn.Module):
    """Sinusoidal (or Fourier) features of t followed by a two-layer Mish MLP: ``(B,) -> (B, out_dim)``."""

    def __init__(self, dim: int, out_dim: int | None = None, fourier_std: float | None = None):
        super().__init__()
        out_dim = out_dim or dim
        if fourier_std is None:
            self.features: nn.Module = SinusoidalTimeEmbedding(dim)
        else:
            self.features = FourierTimeEmbedding(dim, fourier_std)
        self.fc1 = nn.Linear(dim, 2 * out_dim)
        self.fc2 = nn.Linear(2 * out_dim, out_dim)

    def forward(self, t: Tensor) -> Tensor:
        return self.fc2(mish(self.fc1(self.features(t))))


class NullCondition(nn.Module):
    """Learned null embedding plus per-sample condition dropout: the shared core of the condition encoders."""

    def __init__(self, embed_dim: int, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"condition drop probability must lie in [0, 1], got {drop_prob}")
        self.null = nn.Parameter(0.02 * torch.randn(embed_dim))
        self.drop_prob = drop_prob

    def forward(self, emb: Tensor | None, batch_size: int) -> Tensor:
        if emb is None:
            return self.null.expand(batch_size, -1)
        if self.training and self.drop_prob > 0.0:
            drop = torch.rand(emb.shape[0], 1, device=emb.device, dtype=emb.dtype) < self.drop_prob
            emb = torch.where(drop, self.null.to(emb.dtype), emb)
        return emb


class ConditionEncoder(nn.Module):
    """MLP encoder of a (B, cond_dim) condition vector with null embedding and condition dropout."""

    def __init__(self, cond_dim: int, embed_dim: int, hidden: int = 256, drop_prob: float = 0.0):
        super().__init__()
        if cond_dim <= 0:
            raise ValueError(f"ConditionEncoder needs cond_dim > 0, got {cond_dim}")
        self.cond_dim = cond_dim
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden), Mish(), nn.Linear(hidden, embed_dim))
        self.null = NullCondition(embed_dim, drop_prob)

    def forward(self, cond: Tensor | None, batch_size: int) -> Tensor:
        if cond is None:
            return self.null(None, batch_size)
        check_shape(cond, (batch_size, self.cond_dim), "cond")
        return self.null(self.mlp(cond), batch_size)


class ClassEmbedding(nn.Module):
    """Embedding of integer class labels (B,) with a learned null embedding and label dropout."""

    def __init__(self, num_classes: int, embed_dim: int, drop_prob: float = 0.0):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"ClassEmbedding needs num_classes > 0, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes, embed_dim)
        self.null = NullCondition(embed_dim, drop_prob)

    def forward(self, cond: Tensor | None, batch_size: int) -> Tensor:
        if cond is None:
            return self.null(None, batch_size)
        check_shape(cond, (batch_size,), "class labels")
        if cond.is_floating_point():
            raise ValueError(f"class labels must be an integer tensor, got {cond.dtype}")
        return self.null(self.table(cond.long()), batch_size)


class TimeCondEmbedding(nn.Module):
    """Sum of a time embedding and an optional condition embedding: ``(t, cond) -> (B, embed_dim)``.

    ``cond_encoder`` is any module with the ``(cond, batch_size)`` call (ConditionEncoder, ClassEmbedding), or
    None, in which case ``cond`` is ignored.
    """

    def __init__(
        self, embed_dim: int, cond_encoder: nn.Module | None = None, fourier_std: float | None = None
    ):
        super().__init__()
        self.time = TimeMLP(embed_dim, fourier_std=fourier_std)
        self.cond_encoder = cond_encoder

    def forward(self, t: Tensor, cond: Tensor | None, batch_size: int) -> Tensor:
        emb = self.time(broadcast_time(t, batch_size))
        if self.cond_encoder is not None:
            emb = emb + self.cond_encoder(cond, batch_size)
        return emb
