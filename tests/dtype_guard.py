"""A guard for float64 end-to-end tests: inside ``only_float64()`` every tensor an operator produces that is
floating point must be float64, so a tensor made with the default dtype (or cast to float32) anywhere in an update
or sampling path fails at the operator that made it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class DtypeLeak(AssertionError):
    """An operator produced a floating tensor of another dtype than float64."""


class _Float64Only(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                raise DtypeLeak(f"{func} produced a {t.dtype} tensor of shape {tuple(t.shape)} in a float64 run")
        return out


@contextlib.contextmanager
def only_float64() -> Iterator[None]:
    """Fail on the first floating tensor that is not float64 produced inside the block."""
    with _Float64Only():
        yield
