"""Denoiser backbones: every net is called as ``net(x_t, t, cond=None)`` and returns a tensor shaped like x_t."""

from diffrl.nets.chi_unet1d import ChiUNet1D
from diffrl.nets.embeddings import (
    ClassEmbedding,
    ConditionEncoder,
    FourierTimeEmbedding,
    NullCondition,
    SinusoidalTimeEmbedding,
    TimeCondEmbedding,
    TimeMLP,
)
from diffrl.nets.ln_resnet import LNResNet
from diffrl.nets.mlp import ResidualMLP
from diffrl.nets.transformer import DiT1D
from diffrl.nets.unet1d import TemporalUNet1D, TemporalValueNet1D
from diffrl.nets.unet2d import UNet2D

__all__ = [
    "ChiUNet1D",
    "ClassEmbedding",
    "ConditionEncoder",
    "DiT1D",
    "FourierTimeEmbedding",
    "LNResNet",
    "NullCondition",
    "ResidualMLP",
    "SinusoidalTimeEmbedding",
    "TimeCondEmbedding",
    "TemporalUNet1D",
    "TemporalValueNet1D",
    "TimeMLP",
    "UNet2D",
]
