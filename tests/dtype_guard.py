"""A guard for float64 end-to-end tests: inside ``only_float64()`` every tensor an operator produces that is
floating point must be float64, so a tensor made with the default dtype (or cast to float32) anywhere in an update
or sampling path fails at the operator that made it. Optimiser steps are exempt: torch's optimisers keep their
step counters in float32 by design."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class DtypeLeak(AssertionError):
    """An operator produced a floating tensor of another dtype than float64."""


class _Float64Only(TorchDispatchMode):
    in_optimizer_step = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _Float64Only.in_optimizer_step:
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                raise DtypeLeak(f"{func} produced a {t.dtype} tensor of shape {tuple(t.shape)} in a float64 run")
        return out


def _enter_step(*_: object) -> None:
    _Float64Only.in_optimizer_step = True


def _leave_step(*_: object) -> None:
    _Float64Only.in_optimizer_step = False


class GuardedAgent:
    """Runs ``update`` of the wrapped agent inside the float64 guard (for a Trainer)."""

    def __init__(self, agent):
        self.agent = agent

    def update(self, batch):
        with only_float64():
            return self.agent.update(batch)

    def state_dict(self):
        return self.agent.state_dict()


class GuardedActor(torch.nn.Module):
    """An actor whose forward (the whole sampler) runs inside the float64 guard."""

    def __init__(self, actor):
        super().__init__()
        self.actor = actor

    def forward(self, obs, generator=None):
        with only_float64():
            return self.actor(obs, generator)


@contextlib.contextmanager
def only_float64() -> Iterator[None]:
    """Fail on the first floating tensor that is not float64 produced inside the block."""
    hooks = (register_optimizer_step_pre_hook(_enter_step), register_optimizer_step_post_hook(_leave_step))
    try:
        with _Float64Only():
            yield
    finally:
        for hook in hooks:
            hook.remove()
