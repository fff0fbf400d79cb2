"""Denoiser backbones: every net is called as ``net(x_t, t, cond=None)`` and returns a tensor shaped like x_t."""

from diffrl.nets.embeddings import (
    ClassEmbedding,
    ConditionEncoder,
    FourierTimeEmbedding,
    NullCondition,
    SinusoidalTimeEmbedding,
    TimeCondEmbedding,
    TimeMLP,
)
from diffrl.nets.mlp import ResidualMLP

__all__ = [
    "ClassEmbedding",
    "ConditionEncoder",
    "FourierTimeEmbedding",
    "NullCondition",
    "ResidualMLP",
    "SinusoidalTimeEmbedding",
    "TimeCondEmbedding",
    "TimeMLP",
]
