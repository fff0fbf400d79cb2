"""Offline datasets, environments and evaluation for diffrl (independent of the diffusion core)."""

from envs.collect import collect
from envs.datasets import Normalizer, OfflineDataset, SequenceDataset, load_dataset
from envs.evaluation import EvalResult, SB3PolicyAdapter, check_env, evaluate
from envs.minari_io import make_env

__all__ = [
    "EvalResult",
    "Normalizer",
    "OfflineDataset",
    "SB3PolicyAdapter",
    "SequenceDataset",
    "check_env",
    "collect",
    "evaluate",
    "load_dataset",
    "make_env",
]
