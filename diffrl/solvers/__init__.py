"""Samplers behind one call: ``solver.sample(model, x_T, cond, steps, guidance, generator)``."""

from __future__ import annotations

from diffrl.solvers.base import AffineStep, Solver, gaussian_log_prob
from diffrl.solvers.consistency import ConsistencySampler
from diffrl.solvers.ddim import DDIM, DDPM, StepDistribution, Trajectory
from diffrl.solvers.dpm_solver import DPMSolverPP
from diffrl.solvers.grid import GridDDIM
from diffrl.solvers.ode import Euler, Heun
from diffrl.solvers.plan import SamplingPlan
from diffrl.solvers.sde import EulerMaruyama
from diffrl.solvers.timesteps import SPACINGS, make_timesteps

SOLVERS: dict[str, type[Solver]] = {
    cls.name: cls for cls in (DDPM, DDIM, DPMSolverPP, Euler, Heun, EulerMaruyama, GridDDIM, ConsistencySampler)
}


def solver_variants() -> dict[str, Solver]:
    """One instance of every sampler, DPM-Solver++ in each order and mode, by short label (for sweeps and tests)."""
    return {
        "ddpm": DDPM(),
        "ddim": DDIM(),
        "ddim-eta0.5": DDIM(eta=0.5),
        "dpm++1": DPMSolverPP(1),
        "dpm++2m": DPMSolverPP(2),
        "dpm++3m": DPMSolverPP(3),
        "dpm++2s": DPMSolverPP(2, multistep=False),
        "dpm++3s": DPMSolverPP(3, multistep=False),
        "euler": Euler(),
        "heun": Heun(),
        "euler-maruyama": EulerMaruyama(),
    }


def make_solver(solver: Solver | str, **kwargs) -> Solver:
    """A solver instance from its name (see ``SOLVERS``) and keyword options, or the instance itself."""
    if isinstance(solver, Solver):
        return solver
    try:
        return SOLVERS[solver](**kwargs)
    except KeyError:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}") from None


__all__ = [
    "AffineStep", "ConsistencySampler", "DDIM", "DDPM", "DPMSolverPP", "Euler", "EulerMaruyama", "GridDDIM", "Heun",
    "SOLVERS", "SPACINGS",
    "SamplingPlan", "Solver", "StepDistribution", "Trajectory", "gaussian_log_prob", "make_solver", "make_timesteps",
    "solver_variants",
]
