"""Few-step students of a trained diffusion model, for control loops that cannot afford many network calls.

- ``progressive`` (Salimans & Ho 2022): the student learns in one DDIM step what the teacher does in two; each
  round halves the steps and the student becomes the next teacher.
- ``consistency`` / ``consistency-training`` (Song et al. 2023): a consistency function f(x_t, t) -> data with the
  boundary-condition parametrisation (prediction ``consistency``), trained against an EMA target network on
  adjacent grid times joined by one teacher DDIM step (distillation) or by the same noise (training, no teacher);
  sampled in one or a few steps by :class:`~diffrl.solvers.ConsistencySampler`.
- ``reflow`` (Liu et al. 2022): (noise, sample) pairs from the teacher's ODE, and the velocity field retrained on
  the straight paths between them; LinearFlow models only.

Nothing here knows agents: a :class:`Distiller` holds a teacher :class:`~diffrl.model.DiffusionModel`, a student
and the training data ``{"x0": (N, ...) clean samples, "cond": (N, ...) conditions}``, and is driven like an agent
by :class:`~diffrl.training.Trainer` (``batch_sampler``, ``update``, ``state_dict``). :meth:`Distiller.sampling`
gives the student's sampler settings (solver, its options, steps, prediction), which travel with its weights.

Times are continuous in [0, 1] with t = 0 the data. A discrete chain (``DiscreteVP``) is only trained at its own
grid n / T, so every grid used with it is a subset of that grid plus t = 0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffrl.losses import denoising_loss
from diffrl.model import DiffusionModel
from diffrl.predictions import ConsistencyPrediction, noise_level
from diffrl.schedules import DiscreteVP, LinearFlow, NoiseSchedule, expand_like
from diffrl.solvers import DDIM, make_solver
from diffrl.solvers.consistency import karras_times
from diffrl.solvers.grid import uniform_to_data
from diffrl.training import EMA, Learner

#: Progressive teachers of continuous-time models start from this many DDIM steps.
DEFAULT_TEACHER_STEPS = 16


@dataclass
class DistillConfig:
    """How a student is distilled; the method defaults are the papers' (official code) settings.

    ``steps``: network calls of the student's sampler. ``iterations``: updates per progressive round, or in all for
    the other methods. ``teacher_steps``: progressive, the DDIM steps of the first teacher (default: a discrete
    chain's own steps, else 16); reflow, the steps of ``pair_solver`` that produce the pairs (default 20).
    ``scales``: consistency distillation, the discretisation N (default: a chain's steps, else 18 as for CIFAR-10 in
    Song et al. 2023); consistency training, the final N of the schedule N(k) that grows from ``start_scales``
    (default 150, s0 = 2, as in the official LSUN runs). ``target_ema``: the target network's decay, fixed for
    distillation (0.95, official) and mu0 of the adaptive mu(k) = exp(s0 log mu0 / N(k)) for training. ``rho``: the
    Karras grid exponent (7). ``n_pairs``: reflow pairs, one per condition drawn from the data. ``anneal_lr`` and
    ``max_grad_norm`` (progressive): the learning rate decays linearly to 0 within each round and gradients are
    clipped to norm 1, as in the official configs (google-research ``diffusion_distillation``, e.g.
    ``cifar_distill.py``: linear annealing over ``steps_per_iter``, ``grad_clip=1.0``).

    Deviations: ``lr`` 3e-4 and a few thousand iterations fit the small control networks here (the papers train
    image U-Nets for 10^5 updates at lower rates); the consistency teacher step is DDIM (the Euler step of the paper's
    EDM variables) instead of Heun, whose second evaluation at the data end is undefined; consistency training
    starts from the run's weights rather than from scratch; the consistency boundary is at t = 0 (see
    :class:`~diffrl.predictions.ConsistencyPrediction`); the student keeps the teacher's prediction type (progressive,
    reflow) so that round one starts at the teacher, trained with the paper's x0 target and max(SNR, 1) weight.
    """

    method: str = "progressive"
    steps: int = 2
    iterations: int = 2000
    lr: float = 3e-4
    teacher_steps: int | None = None
    scales: int | None = None
    start_scales: int = 2
    target_ema: float = 0.95
    rho: float = 7.0
    n_pairs: int = 20_000
    pair_solver: str = "dpm-solver++"
    anneal_lr: bool = True
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.method not in DISTILLERS:
            raise ValueError(f"unknown distillation method {self.method!r}; choose one of {', '.join(DISTILLERS)}")
        positive = {"steps": self.steps, "iterations": self.iterations, "start_scales": self.start_scales,
                    "n_pairs": self.n_pairs, "teacher_steps": self.teacher_steps or 1, "scales": self.scales or 1}
        bad = [f"{k}={v}" for k, v in positive.items() if v < 1]
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            bad.append(f"max_grad_norm={self.max_grad_norm}")
        if bad or not (self.lr > 0 and self.rho > 0 and 0.0 <= self.target_ema < 1.0):
            raise ValueError(f"invalid distillation settings {bad or ''} (lr {self.lr}, rho {self.rho} must be > 0, "
                             f"target_ema {self.target_ema} in [0, 1))")


def chain_steps(schedule: NoiseSchedule) -> int | None:
    """The number of steps of a discrete chain, None for continuous-time processes."""
    return schedule.num_steps if isinstance(schedule, DiscreteVP) else None


def to_data(grid: Tensor) -> Tensor:
    """A decreasing grid with t = 0 (the data) appended."""
    return torch.cat([grid, grid.new_zeros(1)])


def halving(points: int) -> list[int]:
    """Indices of the points of a grid with ``points - 1`` intervals that a student with half as many keeps: every
    other one, and the last (for an odd number of intervals the student's last step is one teacher step)."""
    keep = list(range(0, points, 2))
    return keep if keep[-1] == points - 1 else [*keep, points - 1]


def frozen_copy(model: DiffusionModel) -> DiffusionModel:
    """A copy of ``model`` without gradients, in eval mode."""
    return copy.deepcopy(model).requires_grad_(False).eval()


def ddim_step(model: DiffusionModel, x: Tensor, t: Tensor, s: Tensor, cond=None) -> Tensor:
    """One deterministic DDIM step t -> s of ``model`` (s = 0 gives its x0 estimate for VP processes and flows)."""
    return DDIM().step_distribution(model, x, t, s, cond).mean


def progressive_target(teacher: DiffusionModel, x_t: Tensor, t: Tensor, mid: Tensor, s: Tensor, cond=None) -> Tensor:
    """The x0 a student must predict at (x_t, t) so that one DDIM step t -> s lands where the teacher's two steps
    t -> mid -> s land (Salimans & Ho 2022, Algorithm 2): x = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s -
    (sigma_s / sigma_t) alpha_t). Rows with ``mid == s`` take one teacher step."""
    z_mid = ddim_step(teacher, x_t, t, mid, cond)
    z_s = torch.where(expand_like(mid == s, x_t), z_mid, ddim_step(teacher, z_mid, mid, s, cond))
    schedule = teacher.schedule
    ratio = expand_like(schedule.sigma(s) / schedule.sigma(t), x_t)
    a_t, a_s = expand_like(schedule.alpha(t), x_t), expand_like(schedule.alpha(s), x_t)
    return (z_s - ratio * x_t) / (a_s - ratio * a_t)


class Distiller:
    """Base of the methods: the frozen teacher, the student with its Learner, and the data. The student starts as a
    copy of ``student`` (same schedule as the teacher), by default of the teacher itself."""

    kind = "distill"  # the name in its training checkpoints

    def __init__(self, teacher: DiffusionModel, config: DistillConfig, data: dict[str, Tensor],
                 student: DiffusionModel | None = None):
        self.config, self.data = config, data
        self.teacher = frozen_copy(teacher)
        self.student = copy.deepcopy(student if student is not None else teacher).requires_grad_(True).train()
        self.learner = Learner(self.student.denoiser, lr=config.lr, **self.learner_settings())

    def learner_settings(self) -> dict:
        """The method's further :class:`~diffrl.training.Learner` settings (none by default)."""
        return {}

    @property
    def schedule(self) -> NoiseSchedule:
        return self.teacher.schedule

    @property
    def total_iterations(self) -> int:
        return self.config.iterations

    def batch_sampler(self) -> Callable[[int, torch.Generator | None], dict[str, Tensor]]:
        """Uniform rows of the data (all tensors indexed alike)."""
        first = next(iter(self.data.values()))

        def sample(batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
            rows = torch.randint(0, len(first), (batch_size,), generator=generator, device=first.device)
            return {k: v[rows] for k, v in self.data.items()}

        return sample

    def sampling(self) -> dict:
        """The student's sampler settings: solver, solver_kwargs, steps and prediction."""
        raise NotImplementedError

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"student": self.student.denoiser.state_dict(), "teacher": self.teacher.denoiser.state_dict(),
                "learner": self.learner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.student.denoiser.load_state_dict(state["student"])
        self.teacher.denoiser.load_state_dict(state["teacher"])
        self.learner.load_state_dict(state["learner"])


class ProgressiveDistiller(Distiller):
    """Rounds of ``iterations`` updates, each halving the DDIM grid, from ``teacher_steps`` down to ``steps``."""

    def __init__(self, teacher: DiffusionModel, config: DistillConfig, data: dict[str, Tensor],
                 student: DiffusionModel | None = None):
        super().__init__(teacher, config, data, student)
        first = config.teacher_steps or chain_steps(self.schedule) or DEFAULT_TEACHER_STEPS
        if config.steps >= first:
            raise ValueError(f"progressive distillation halves the teacher's {first} DDIM steps, so steps must be "
                             f"below that, got {config.steps}; raise teacher_steps")
        chain = chain_steps(self.schedule)
        if chain is not None and chain % first:
            raise ValueError(f"teacher_steps={first} is not a divisor of the {chain} steps of the model's discrete "
                             "chain, which is trained on its own grid only")
        self.grids = [to_data(uniform_to_data(self.schedule, first))]
        self.keep: list[Tensor] = []
        while len(self.grids[-1]) - 1 > config.steps:
            keep = torch.tensor(halving(len(self.grids[-1])))
            self.keep.append(keep)
            self.grids.append(self.grids[-1][keep])
        self.round = 0

    @property
    def total_iterations(self) -> int:
        return self.config.iterations * len(self.keep)

    def learner_settings(self) -> dict:
        """Gradient clipping and, with ``anneal_lr``, a linear decay to 0 that starts again with every round."""
        rounds = {"lr_schedule": "linear", "total_steps": self.config.iterations,
                  "restart_every": self.config.iterations} if self.config.anneal_lr else {}
        return {"max_grad_norm": self.config.max_grad_norm, **rounds}

    def sampling(self) -> dict:
        times = self.grids[-1][:-1]
        return {"solver": "ddim-grid", "solver_kwargs": {"times": times.tolist()}, "steps": len(times),
                "prediction": self.student.prediction.name}

    def update(self, batch):
        r = min(self.learner.num_steps // self.config.iterations, len(self.keep) - 1)
        if r != self.round:  # a new round: the student so far is the teacher
            self.teacher = frozen_copy(self.student)
            self.round = r
        x0, cond = batch["x0"], batch["cond"]
        teacher_grid, keep = self.grids[r].to(x0), self.keep[r].to(x0.device)
        k = torch.randint(0, len(keep) - 1, (x0.shape[0],), device=x0.device)
        t, mid, s = teacher_grid[keep[k]], teacher_grid[keep[k] + 1], teacher_grid[keep[k + 1]]
        x_t = self.schedule.marginal(x0, t, torch.randn_like(x0))
        with torch.no_grad():
            target = progressive_target(self.teacher, x_t, t, mid, s, cond)
        x0_student, _ = self.student.x0_eps(x_t, t, cond)
        weight = self.schedule.log_snr(t).exp().clamp_min(1.0)  # "truncated SNR", max(SNR, 1)
        loss = (weight * (x0_student - target).pow(2).flatten(1).mean(1)).mean()
        return {"loss": loss.detach(), "round": float(r), **self.learner.step(loss)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "round": self.round}

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state["round"])
        if self.round > 0:
            self.teacher = frozen_copy(self.student)
        super().load_state_dict(state)


class ConsistencyDistiller(Distiller):
    """Consistency distillation (``training=False``) or consistency training (``training=True``)."""

    def __init__(self, teacher: DiffusionModel, config: DistillConfig, data: dict[str, Tensor],
                 student: DiffusionModel | None = None, training: bool = False):
        super().__init__(teacher, config, data, student)
        self.training = training
        self.student.prediction = ConsistencyPrediction()
        self.target = EMA(self.student.denoiser, config.target_ema)
        self.final_scales = chain_steps(self.schedule) or config.scales or (150 if training else 18)

    def scales_and_decay(self, k: int) -> tuple[int, float]:
        """(N, target decay) at update ``k``: fixed for distillation; for training the official schedule,
        N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 and mu(k) = exp(s0 log mu0 / N(k))."""
        c = self.config
        if not self.training or chain_steps(self.schedule) is not None:
            return self.final_scales, c.target_ema
        s0, s1 = c.start_scales, self.final_scales
        n = max(math.ceil(math.sqrt(k / c.iterations * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1), 1)
        return n + 1, math.exp(s0 * math.log(c.target_ema) / n) if c.target_ema > 0 else 0.0

    def grid(self, scales: int) -> Tensor:
        """``scales`` times from t_max down to t_min (a chain's own grid, else Karras) and then t = 0."""
        if chain_steps(self.schedule) is not None:
            return to_data(uniform_to_data(self.schedule, scales))
        t_min = torch.tensor(self.schedule.t_min, dtype=torch.float64)
        return to_data(karras_times(self.schedule, scales, float(noise_level(self.schedule, t_min)), self.config.rho))

    def sampling(self) -> dict:
        grid = self.grid(self.final_scales)
        picks = torch.linspace(0, len(grid) - 1, self.config.steps + 1).round().long()[:-1]
        times = grid[picks]
        return {"solver": "consistency", "solver_kwargs": {"times": times.tolist()}, "steps": len(times),
                "prediction": "consistency"}

    def update(self, batch):
        x0, cond = batch["x0"], batch["cond"]
        scales, decay = self.scales_and_decay(self.learner.num_steps)
        grid = self.grid(scales).to(x0)
        n = torch.randint(0, len(grid) - 1, (x0.shape[0],), device=x0.device)
        t, s = grid[n], grid[n + 1]
        noise = torch.randn_like(x0)
        x_t = self.schedule.marginal(x0, t, noise)
        with torch.no_grad():
            x_s = self.schedule.marginal(x0, s, noise) if self.training else ddim_step(self.teacher, x_t, t, s, cond)
            target = self.student.prediction.to_x0_eps(self.target.module(x_s, s, cond), x_s, s, self.schedule)[0]
        pred, _ = self.student.x0_eps(x_t, t, cond)
        loss = (pred - target).pow(2).flatten(1).mean(1).mean()
        info = self.learner.step(loss)
        self.target.decay = decay
        self.target.update()
        return {"loss": loss.detach(), "scales": float(scales), "target_decay": decay, **info}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "target": self.target.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.target.load_state_dict(state["target"])


class ReflowDistiller(Distiller):
    """Pairs (noise z, teacher ODE solution from z) for ``n_pairs`` conditions of the data, then flow matching on
    the straight path between them: x_t = (1 - t) x + t z, velocity target z - x."""

    def __init__(self, teacher: DiffusionModel, config: DistillConfig, data: dict[str, Tensor],
                 student: DiffusionModel | None = None, generator: torch.Generator | None = None, chunk: int = 4096):
        if not isinstance(teacher.schedule, LinearFlow):
            raise ValueError(f"reflow retrains a rectified flow and needs a LinearFlow model (schedule linear-flow); "
                             f"this model uses {type(teacher.schedule).__name__}")
        super().__init__(teacher, config, {}, student)
        cond_pool = data["cond"]
        rows = torch.randint(0, len(cond_pool), (config.n_pairs,), generator=generator, device=cond_pool.device)
        cond = cond_pool[rows]
        x0 = data["x0"]
        noise = torch.randn((config.n_pairs, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)
        self.data = {"noise": noise, "x0": reflow_pairs(self.teacher, noise, cond, make_solver(config.pair_solver),
                                                         config.teacher_steps or 20, chunk), "cond": cond}

    def sampling(self) -> dict:
        times = uniform_to_data(self.schedule, self.config.steps)
        return {"solver": "ddim-grid", "solver_kwargs": {"times": times.tolist()}, "steps": len(times),
                "prediction": self.student.prediction.name}

    def update(self, batch):
        loss = denoising_loss(self.student.denoiser, self.schedule, self.student.prediction, batch["x0"],
                              batch["cond"], noise=batch["noise"])
        return {"loss": loss.detach(), **self.learner.step(loss)}


def reflow_pairs(teacher: DiffusionModel, noise: Tensor, cond: Tensor, solver, steps: int,
                 chunk: int = 4096) -> Tensor:
    """The teacher's ODE solutions from the prior draws ``noise`` (rows of ``cond``), in chunks."""
    parts = [teacher.sample(noise[i:i + chunk].shape, cond[i:i + chunk], solver=solver, steps=steps,
                            x_T=noise[i:i + chunk]) for i in range(0, len(noise), chunk)]
    return torch.cat(parts)


DISTILLERS: dict[str, Callable[..., Distiller]] = {
    "progressive": ProgressiveDistiller,
    "consistency": ConsistencyDistiller,
    "consistency-training": lambda *args, **kwargs: ConsistencyDistiller(*args, **kwargs, training=True),
    "reflow": ReflowDistiller,
}


def make_distiller(teacher: DiffusionModel, config: DistillConfig, data: dict[str, Tensor],
                   student: DiffusionModel | None = None) -> Distiller:
    """The distiller of ``config.method`` for ``teacher`` on ``data`` ({"x0": ..., "cond": ...}), its student
    starting from ``student`` (default: the teacher)."""
    return DISTILLERS[config.method](teacher, config, data, student)
