"""Convolutional U-Net body shared by the 1-D temporal U-Net and the 2-D image U-Net.

Residual blocks are ``Conv -> GroupNorm -> Mish`` twice, with FiLM conditioning (per-channel scale and shift
from the time/condition embedding) between the two convolutions. Inputs are padded at the end of every spatial
axis to a multiple of ``2 ** (levels - 1)`` and the output is cropped back, so any size works.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from diffrl.nets.activations import Mish, mish
from diffrl.nets.transformer import SelfAttention

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}


def group_norm(channels: int, groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with up to ``groups`` groups (the largest count dividing ``channels``)."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ConvBlock(nn.Sequential):
    """``Conv(k, same padding) -> GroupNorm -> Mish``."""

    def __init__(self, c_in: int, c_out: int, nd: int, kernel_size: int):
        super().__init__(_CONV[nd](c_in, c_out, kernel_size, padding=kernel_size // 2), group_norm(c_out), Mish())


class ResBlock(nn.Module):
    """Two ConvBlocks with FiLM conditioning between them (``h * (scale_offset + scale) + shift``) and a (1x1 conv)
    residual path.

    ``emb_act`` is the activated embedding ``mish(emb)`` of shape (B, emb_dim), computed once per forward.
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, nd: int, kernel_size: int, scale_offset: float = 1.0):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the length, got {kernel_size}")
        self.block1 = ConvBlock(c_in, c_out, nd, kernel_size)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.block2 = ConvBlock(c_out, c_out, nd, kernel_size)
        self.skip = _CONV[nd](c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.spatial = (...,) + (None,) * nd
        self.scale_offset = scale_offset

    def forward(self, x: Tensor, emb_act: Tensor) -> Tensor:
        scale, shift = self.film(emb_act)[self.spatial].chunk(2, dim=1)
        h = self.block1(x) * (self.scale_offset + scale) + shift
        return self.block2(h) + self.skip(x)


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over all positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.norm = group_norm(channels)
        self.attn = SelfAttention(channels, heads)

    def forward(self, x: Tensor) -> Tensor:
        out = self.attn(self.norm(x).flatten(2).transpose(1, 2))
        return x + out.transpose(1, 2).reshape(x.shape)


class DownPath(nn.Module):
    """Encoder half: per level two ResBlocks, then (except at the last level) a stride-2 convolution.

    Returns the bottom features and the pre-downsampling features of every level but the last (the skips).
    """

    def __init__(self, in_channels: int, dims: tuple[int, ...], emb_dim: int, nd: int, kernel_size: int):
        super().__init__()
        if len(dims) < 1 or min(dims) <= 0:
            raise ValueError(f"dims must be a non-empty tuple of positive widths, got {dims}")
        chans = (in_channels, *dims)
        self.blocks = nn.ModuleList(
            nn.ModuleList([ResBlock(a, b, emb_dim, nd, kernel_size), ResBlock(b, b, emb_dim, nd, kernel_size)])
            for a, b in zip(chans[:-1], chans[1:], strict=True)
        )
        self.downs = nn.ModuleList(_CONV[nd](c, c, 3, stride=2, padding=1) for c in dims[:-1])
        self.multiple = 2 ** (len(dims) - 1)

    def forward(self, x: Tensor, emb_act: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, (res1, res2) in enumerate(self.blocks):
            x = res2(res1(x, emb_act), emb_act)
            if i < len(self.downs):
                skips.append(x)
                x = self.downs[i](x)
        return x, skips


def pad_to_multiple(x: Tensor, multiple: int, nd: int) -> Tensor:
    """Zero-pad the last ``nd`` axes of ``x`` at their end up to a multiple of ``multiple``."""
    pads: list[int] = []
    for size in reversed(x.shape[-nd:]):
        pads += [0, (-size) % multiple]
    return F.pad(x, pads)


class UNetCore(nn.Module):
    """U-Net on channel-first inputs ``(B, in_channels, *spatial) -> (B, out_channels, *spatial)``.

    Decoder levels upsample with a stride-2 transposed convolution, concatenate the encoder skip of the same
    resolution and apply two ResBlocks. The bottleneck is ResBlock, optional self-attention, ResBlock.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dims: tuple[int, ...],
        emb_dim: int,
        nd: int,
        kernel_size: int,
        attention_heads: int = 0,
    ):
        super().__init__()
        self.nd = nd
        self.down = DownPath(in_channels, dims, emb_dim, nd, kernel_size)
        bottom = dims[-1]
        self.mid1 = ResBlock(bottom, bottom, emb_dim, nd, kernel_size)
        self.mid_attn = SpatialSelfAttention(bottom, attention_heads) if attention_heads else nn.Identity()
        self.mid2 = ResBlock(bottom, bottom, emb_dim, nd, kernel_size)
        self.ups = nn.ModuleList(_CONV_T[nd](c, c, 4, stride=2, padding=1) for c in reversed(dims[1:]))
        self.up_blocks = nn.ModuleList(
            nn.ModuleList([ResBlock(hi + lo, lo, emb_dim, nd, kernel_size), ResBlock(lo, lo, emb_dim, nd, kernel_size)])
            for hi, lo in zip(reversed(dims[1:]), reversed(dims[:-1]), strict=True)
        )
        self.head = nn.Sequential(ConvBlock(dims[0], dims[0], nd, kernel_size), _CONV[nd](dims[0], out_channels, 1))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        spatial = x.shape[-self.nd :]
        emb_act = mish(emb)
        h, skips = self.down(pad_to_multiple(x, self.down.multiple, self.nd), emb_act)
        h = self.mid2(self.mid_attn(self.mid1(h, emb_act)), emb_act)
        for up, (res1, res2), skip in zip(self.ups, self.up_blocks, reversed(skips), strict=True):
            h = res2(res1(torch.cat([up(h), skip], dim=1), emb_act), emb_act)
        out = self.head(h)
        return out[(..., *(slice(0, s) for s in spatial))]
