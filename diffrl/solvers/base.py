"""The sampler interface: a solver owns the loop from the prior to data; guidance is a hook it calls each step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffrl.guidance import Guidance, as_guidance
from diffrl.schedules import expand_like
from diffrl.solvers.timesteps import make_timesteps

if TYPE_CHECKING:
    from diffrl.model import DiffusionModel


@dataclass(frozen=True)
class AffineStep:
    """One grid interval written as ``x_s = x * x_t + eps * eps_i + sum_j x0[j] * x0_{i-j} + noise * z``.

    ``x0_{i-j}`` is the (guided, clipped) data estimate j grid points back, ``eps_i`` the noise estimate at the
    current point and z ~ N(0, I), drawn only when ``noise`` is not None (as the solver's own step draws it).
    Solvers whose interval is such an update for fixed times expose it through :meth:`Solver.affine_step`, so
    that a :class:`~diffrl.solvers.plan.SamplingPlan` can precompute it.
    """

    x: float
    eps: float
    x0: tuple[float, ...]
    noise: float | None = None


class Solver(ABC):
    """Integrates from ``t_max`` to ``t_min`` on a grid of ``steps`` points, then returns the x0 prediction there.

    Subclasses implement :meth:`step` for one grid interval (t -> s, s < t); ``state`` is a per-run dict holding
    ``remaining`` (intervals left after this one) and whatever multistep methods keep between steps. With one
    model call per interval, ``steps`` equals the number of network evaluations.
    """

    name: str = "solver"
    #: Network evaluations per grid interval.
    calls_per_step: int = 1

    def __init__(self, spacing: str = "uniform"):
        self.spacing = spacing

    @abstractmethod
    def step(self, model: DiffusionModel, x: Tensor, t: Tensor, s: Tensor, cond, guidance: Guidance,
             generator: torch.Generator | None, state: dict) -> Tensor:
        """Advance ``x`` from time t to time s (both (B,) tensors)."""

    def nfe(self, steps: int) -> int:
        """Network evaluations used by :meth:`sample` with ``steps`` grid points."""
        return self.calls_per_step * (steps - 1) + 1

    def timesteps(self, model: DiffusionModel, steps: int) -> Tensor:
        return make_timesteps(model.schedule, steps, self.spacing)

    def affine_step(self, model: DiffusionModel, grid: Tensor, i: int) -> AffineStep | None:
        """The interval ``grid[i] -> grid[i + 1]`` of a ``len(grid)``-point run as an :class:`AffineStep`, or None
        where this solver's step is not one (e.g. several network calls per interval)."""
        return None

    def sample(self, model: DiffusionModel, x_T: Tensor, cond=None, steps: int = 20,
               guidance: Guidance | None = None, generator: torch.Generator | None = None,
               grad: bool = False) -> Tensor:
        """Run the sampler from ``x_T`` (a prior draw) and return samples of the data.

        Runs without gradients unless ``grad=True``, which keeps the graph through every step.
        """
        with torch.set_grad_enabled(grad):
            return self._sample(model, x_T, cond, steps, guidance, generator)

    def _sample(self, model: DiffusionModel, x_T: Tensor, cond, steps: int, guidance: Guidance | None,
                generator: torch.Generator | None) -> Tensor:
        guidance = as_guidance(guidance)
        grid = self.timesteps(model, steps).to(device=x_T.device, dtype=x_T.dtype)
        batch = x_T.shape[0]
        x = guidance.project(x_T, grid[0].expand(batch))
        state: dict = {}
        for i in range(steps - 1):
            t, s = grid[i].expand(batch), grid[i + 1].expand(batch)
            state["remaining"] = steps - 2 - i
            x = guidance.project(self.step(model, x, t, s, cond, guidance, generator, state), s)
        x0, _ = model.denoise(x, grid[-1].expand(batch), cond, guidance)
        return guidance.project(x0, torch.zeros_like(grid[-1]).expand(batch))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spacing={self.spacing!r})"


def coefs(model: DiffusionModel, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """alpha(t), sigma(t) shaped to broadcast against ``like``."""
    return expand_like(model.schedule.alpha(t), like), expand_like(model.schedule.sigma(t), like)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Log-density of a diagonal Gaussian, summed over all but the batch dimension."""
    var = std * std
    lp = -((x - mean) ** 2) / (2 * var) - torch.log(std) - 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=x.dtype))
    return lp.flatten(1).sum(1)
