"""Offline datasets, environments and evaluation for diffrl (independent of the diffusion core)."""

from envs.datasets import Normalizer, OfflineDataset, SequenceDataset, load_dataset
from envs.evaluation import EvalResult, SB3PolicyAdapter, evaluate
from envs.minari_io import make_env

__all__ = [
    "EvalResult",
    "Normalizer",
    "OfflineDataset",
    "SB3PolicyAdapter",
    "SequenceDataset",
    "collect",
    "evaluate",
    "load_dataset",
    "make_env",
]


def __getattr__(name: str):
    # `collect` imports stable-baselines3 (slow); load it on first use.
    if name == "collect":
        from envs.collect import collect

        return collect
    raise AttributeError(f"module 'envs' has no attribute {name!r}")
