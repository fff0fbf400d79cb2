"""DPM-Solver++ (Lu et al. 2022): exponential-integrator solvers of the diffusion ODE in data-prediction form.

With lambda = log(alpha / sigma) and h = lambda_s - lambda_t, the exact solution is
x_s = (sigma_s / sigma_t) x_t + sigma_s * int_{lambda_t}^{lambda_s} e^lambda x0(lambda) d lambda; the solvers expand
x0(lambda) to order 1-3, either from earlier grid points (multistep) or from extra evaluations inside the interval
(singlestep).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffrl.schedules import expand_like
from diffrl.solvers.base import AffineStep, Solver, coefs


def _lam(model, t: Tensor) -> Tensor:
    return 0.5 * model.schedule.log_snr(t)


class DPMSolverPP(Solver):
    """DPM-Solver++ of ``order`` 1, 2 or 3, ``multistep`` (one call per step) or singlestep (``order`` calls)."""

    name = "dpm-solver++"

    def __init__(self, order: int = 2, multistep: bool = True, spacing: str = "logsnr", lower_order_final: bool = True):
        super().__init__(spacing)
        self.lower_order_final = lower_order_final
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order}")
        self.order, self.multistep = order, multistep
        self.calls_per_step = 1 if multistep else order

    def step(self, model, x, t, s, cond, guidance, generator, state):
        x0, _ = model.denoise(x, t, cond, guidance)
        if self.multistep:
            history = state.setdefault("history", [])
            history.append((_lam(model, t), x0))
            del history[: -self.order]
            # Lower the order over the final intervals, which keeps short runs stable (Lu et al. 2022).
            order = min(len(history), state["remaining"] + 1) if self.lower_order_final else len(history)
            return self._multistep(model, x, t, s, history[-order:])
        return self._singlestep(model, x, t, s, x0, cond, guidance)

    def _first_order(self, model, x: Tensor, t: Tensor, s: Tensor, x0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """First-order update plus (alpha_s, phi_1 = expm1(-h), h) for the higher-order corrections."""
        _, sig_t = coefs(model, t, x)
        a_s, sig_s = coefs(model, s, x)
        h = expand_like(_lam(model, s) - _lam(model, t), x)
        phi_1 = torch.expm1(-h)
        return (sig_s / sig_t) * x - a_s * phi_1 * x0, a_s, phi_1, h

    def _multistep(self, model, x, t, s, history) -> Tensor:
        x_coef, m_coefs = self._multistep_coefs(model, t, s, [lam for lam, _ in reversed(history)])
        x_s = expand_like(x_coef, x) * x
        for c, (_, m) in zip(m_coefs, reversed(history), strict=True):
            x_s = x_s + expand_like(c, x) * m
        return x_s

    def _multistep_coefs(self, model, t: Tensor, s: Tensor, lams: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """(c_x, [c_0, c_1, ...]) with x_s = c_x x_t + sum_j c_j m_j, for data estimates m_j at log-SNR/2 ``lams[j]``
        (newest first; their number is the order)."""
        a_s, sig_s = model.schedule.alpha(s), model.schedule.sigma(s)
        h = _lam(model, s) - lams[0]
        phi_1 = torch.expm1(-h)
        coefs = [-a_s * phi_1]
        if len(lams) == 1:
            return sig_s / model.schedule.sigma(t), coefs
        r0 = (lams[0] - lams[1]) / h
        d1_0 = [1.0 / r0, -1.0 / r0, 0.0]  # (m0 - m1) / r0 as weights on (m0, m1, m2)
        if len(lams) == 2:
            d = [-0.5 * a_s * phi_1 * w for w in d1_0[:2]]
        else:
            r1 = (lams[1] - lams[2]) / h
            d1_1 = [0.0, 1.0 / r1, -1.0 / r1]
            diff = [u - v for u, v in zip(d1_0, d1_1, strict=True)]
            d1 = [u + r0 / (r0 + r1) * w for u, w in zip(d1_0, diff, strict=True)]
            d2 = [w / (r0 + r1) for w in diff]
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            d = [a_s * (phi_2 * u - phi_3 * v) for u, v in zip(d1, d2, strict=True)]
        return sig_s / model.schedule.sigma(t), [coefs[0] + d[0], *d[1:]]

    def affine_step(self, model, grid, i):
        if not self.multistep:
            return None
        remaining = len(grid) - 2 - i
        order = min(i + 1, self.order, remaining + 1) if self.lower_order_final else min(i + 1, self.order)
        lams = [_lam(model, grid[i - j]) for j in range(order)]
        x_coef, m_coefs = self._multistep_coefs(model, grid[i], grid[i + 1], lams)
        return AffineStep(x=float(x_coef), eps=0.0, x0=tuple(float(c) for c in m_coefs))

    def _intermediate(self, model, x, t, s, r: float) -> Tensor:
        """The time whose lambda lies a fraction r of the way from t to s."""
        lam_t, lam_s = _lam(model, t), _lam(model, s)
        return model.schedule.t_from_log_snr(2.0 * (lam_t + r * (lam_s - lam_t)))

    def _singlestep(self, model, x, t, s, x0, cond, guidance) -> Tensor:
        x_s, a_s, phi_1, h = self._first_order(model, x, t, s, x0)
        if self.order == 1:
            return x_s
        if self.order == 2:
            r1 = 0.5
            s1 = self._intermediate(model, x, t, s, r1)
            x_s1, _, _, _ = self._first_order(model, x, t, s1, x0)
            m1, _ = model.denoise(x_s1, s1, cond, guidance)
            return x_s - (0.5 / r1) * a_s * phi_1 * (m1 - x0)
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        s1 = self._intermediate(model, x, t, s, r1)
        s2 = self._intermediate(model, x, t, s, r2)
        x_s1, _, _, _ = self._first_order(model, x, t, s1, x0)
        m1, _ = model.denoise(x_s1, s1, cond, guidance)
        x_s2, a_s2, phi_12, _ = self._first_order(model, x, t, s2, x0)
        phi_22 = phi_12 / (r2 * h) + 1.0
        x_s2 = x_s2 + (r2 / r1) * a_s2 * phi_22 * (m1 - x0)
        m2, _ = model.denoise(x_s2, s2, cond, guidance)
        phi_2 = phi_1 / h + 1.0
        return x_s + (1.0 / r2) * a_s * phi_2 * (m2 - x0)

    def __repr__(self) -> str:
        return f"DPMSolverPP(order={self.order}, multistep={self.multistep}, spacing={self.spacing!r})"
