"""Sampling with everything that depends only on the time grid computed once: the fast path for control loops.

For a solver whose every interval is an :class:`~diffrl.solvers.base.AffineStep`, a run without guidance is
``out = net(x, t_i, cond)``, ``x0 = p_x x + p_out out`` (every prediction type converts linearly), optional clipping,
then the affine update. :class:`SamplingPlan` stores the network times and these coefficients as python floats,
so one interval costs the network call plus a handful of tensor operations, with the same result (and the same
random draws) as ``solver.sample``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffrl.solvers.base import AffineStep, Solver

if TYPE_CHECKING:
    from diffrl.model import DiffusionModel


class SamplingPlan:
    """A precomputed ``solver.sample(model, x_T, cond, steps)`` without guidance; build with :meth:`build`."""

    def __init__(self, model: DiffusionModel, times: list[Tensor], to_x0: list[tuple[float, float]],
                 updates: list[tuple[float, tuple[float, ...], float | None]]):
        self.model, self.times, self.to_x0, self.updates = model, times, to_x0, updates
        self._depth = max((len(x0) for _, x0, _ in updates), default=0)  # data estimates kept for multistep

    @classmethod
    def build(cls, model: DiffusionModel, solver: Solver, steps: int) -> SamplingPlan | None:
        """The plan, or None where ``solver`` has no affine form (then use ``solver.sample``)."""
        with torch.inference_mode(False):  # schedules may differentiate alpha(t), sigma(t) by autograd
            return cls._build(model, solver, steps)

    @classmethod
    def _build(cls, model: DiffusionModel, solver: Solver, steps: int) -> SamplingPlan | None:
        grid = solver.timesteps(model, steps)
        steps_ = [solver.affine_step(model, grid, i) for i in range(steps - 1)]
        if any(step is None for step in steps_):
            return None
        param = next(model.parameters(), None)
        device, dtype = (param.device, param.dtype) if param is not None else (None, torch.float32)
        times, to_x0, updates = [], [], []
        for i, t in enumerate(grid):
            t1 = t.reshape(1)
            # to_x0_eps is linear in (out, x_t) at fixed t: read off the two weights of x0.
            p_x, _ = model.prediction.to_x0_eps(t1.new_zeros(1), t1.new_ones(1), t1, model.schedule)
            p_out, _ = model.prediction.to_x0_eps(t1.new_ones(1), t1.new_zeros(1), t1, model.schedule)
            times.append(t1.to(device=device, dtype=dtype))
            to_x0.append((float(p_x), float(p_out)))
            if i < steps - 1:
                updates.append(cls._fold_eps(steps_[i], float(model.schedule.alpha(t)), float(model.schedule.sigma(t))))
        return cls(model, times, to_x0, updates)

    @staticmethod
    def _fold_eps(step: AffineStep, alpha: float, sigma: float) -> tuple[float, tuple[float, ...], float | None]:
        """Write eps = (x - alpha x0) / sigma into the update: (x weight, x0 weights newest first, noise std)."""
        x0 = (step.x0[0] - step.eps * alpha / sigma, *step.x0[1:])
        return step.x + step.eps / sigma, x0, step.noise

    @property
    def steps(self) -> int:
        return len(self.times)

    def __call__(self, x_T: Tensor, cond=None, generator: torch.Generator | None = None) -> Tensor:
        """Samples from the prior draw ``x_T``."""
        denoiser, clip = self.model.denoiser, self.model.clip_x0
        x, history, batch = x_T, [], x_T.shape[0]
        for i, (t, (p_x, p_out)) in enumerate(zip(self.times, self.to_x0, strict=True)):
            x0 = torch.add(x * p_x, denoiser(x, t.expand(batch), cond), alpha=p_out)
            if clip is not None:
                x0 = x0.clamp_(-clip, clip)
            if i == len(self.updates):
                return x0
            x_coef, x0_coefs, noise = self.updates[i]
            history = [x0, *history][: self._depth]
            x = x * x_coef
            for c, m in zip(x0_coefs, history, strict=False):
                x = x.add_(m, alpha=c)
            if noise is not None:
                x = x.add_(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype), alpha=noise)
        raise AssertionError("unreachable: a plan has at least one grid point")
