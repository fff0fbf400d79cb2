"""DiffusionModel: a denoiser network, a noise process and a prediction type, trained and sampled as one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffrl.guidance import Guidance, as_guidance
from diffrl.losses import Weighting, denoising_loss, uniform_weighting
from diffrl.predictions import Prediction, make_prediction
from diffrl.schedules import NoiseSchedule, expand_like
from diffrl.solvers import SamplingPlan, Solver, make_solver


class DiffusionModel(nn.Module):
    """``denoiser(x_t, t, cond)`` trained to output ``prediction`` under ``schedule``.

    ``clip_x0`` clamps the x0 estimate to [-clip_x0, clip_x0] while sampling (e.g. actions normalised to [-1, 1]).
    """

    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule, prediction: Prediction | str = "eps",
                 weighting: Weighting = uniform_weighting, clip_x0: float | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.schedule = schedule
        self.prediction = make_prediction(prediction)
        self.weighting = weighting
        self.clip_x0 = clip_x0
        self._plan: tuple | None = None  # (key, SamplingPlan | None) of the last unguided solver run

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        return self.denoiser(x_t, t, cond)

    def x0_eps(self, x_t: Tensor, t: Tensor, cond=None) -> tuple[Tensor, Tensor]:
        """The network's estimate of (x0, eps) at (x_t, t)."""
        return self.prediction.to_x0_eps(self.denoiser(x_t, t, cond), x_t, t, self.schedule)

    def denoise(self, x_t: Tensor, t: Tensor, cond=None, guidance: Guidance | None = None) -> tuple[Tensor, Tensor]:
        """(x0, eps) after guidance and x0 clipping: what solvers consume."""
        x0, eps = self.x0_eps(x_t, t, cond)
        if guidance is not None:
            x0, eps = guidance.apply(self, x_t, t, cond, x0, eps)
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            a, s = expand_like(self.schedule.alpha(t), x_t), expand_like(self.schedule.sigma(t), x_t)
            eps = (x_t - a * x0) / s
        return x0, eps

    def loss(self, x0: Tensor, cond=None, *, generator: torch.Generator | None = None,
             reduction: str = "mean") -> Tensor:
        """Denoising loss at random times (per-sample with ``reduction='none'``)."""
        return denoising_loss(self.denoiser, self.schedule, self.prediction, x0, cond, weighting=self.weighting,
                              generator=generator, reduction=reduction)

    def sample(self, shape: Sequence[int], cond=None, *, solver: Solver | str | None = None, steps: int = 20,
               guidance: Guidance | Sequence[Guidance] | None = None, generator: torch.Generator | None = None,
               x_T: Tensor | None = None, grad: bool = False) -> Tensor:
        """Draw samples of ``shape`` (batch first) with ``solver`` in ``steps`` grid points.

        ``grad=True`` records the autograd graph through the whole chain (e.g. to backpropagate a critic's value
        of the samples into the denoiser, as in Diffusion-QL); by default sampling runs without gradients.
        """
        solver = make_solver(solver or "dpm-solver++")
        param = next(self.parameters(), None)
        device, dtype = (param.device, param.dtype) if param is not None else (None, None)
        if x_T is None:
            x_T = self.schedule.prior(tuple(shape), generator=generator, device=device, dtype=dtype)
        plan = self.sampling_plan(solver, steps) if guidance is None else None
        if plan is not None:
            with torch.set_grad_enabled(grad):
                return plan(x_T, cond, generator)
        return solver.sample(self, x_T, cond, steps=steps, guidance=as_guidance(guidance), generator=generator,
                             grad=grad)

    def sampling_plan(self, solver: Solver, steps: int) -> SamplingPlan | None:
        """The precomputed run of ``solver`` over ``steps`` grid points (None where it has no affine form).

        Unguided :meth:`sample` calls go through it: the same samples and random draws as ``solver.sample`` with
        the per-step schedule arithmetic done once. The last plan is kept for the same kind of solver (class and
        settings), steps, device and dtype.
        """
        param = next(self.parameters(), None)
        key = (type(solver), dict(vars(solver)), steps, None if param is None else (param.device, param.dtype))
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, SamplingPlan.build(self, solver, steps))
        return self._plan[1]
