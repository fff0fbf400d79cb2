"""Seeding and capture/restore of the global random number generators (python, numpy, torch, CUDA)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for the stream named by ``keys`` (e.g. a rank) under a base ``seed``."""
    entropy = [int(k) for k in (seed, *keys)]
    if any(k < 0 for k in entropy):
        raise ValueError(f"seeds and keys must be non-negative, got {entropy}")
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def get_rng_state() -> dict:
    """States of all global generators as tensors and plain python values (safe for ``weights_only`` loading)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore the generators captured by :func:`get_rng_state`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Run a block (e.g. an evaluation) without changing the global generators seen by the code after it."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
