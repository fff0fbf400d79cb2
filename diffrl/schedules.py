"""Noise processes x_t = alpha(t) x_0 + sigma(t) eps on continuous time t in [0, 1].

Every process shares one interface: ``alpha``, ``sigma``, ``log_snr`` (log alpha^2 / sigma^2) and its exact inverse
``t_from_log_snr``, the prior at ``t = 1``, the SDE view (``drift_coef`` f(t), ``diffusion_coef`` g(t)) and the time
derivatives of alpha and sigma used by ODE solvers and the ``velocity`` prediction. ``t = 0`` is clean data; training
draws ``t`` from ``sample_t`` and samplers integrate from ``t_max`` down to ``t_min`` and then predict x_0.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


class NoiseSchedule(ABC):
    """Base class of a Gaussian noise process."""

    #: Smallest time used in training and as the last grid point of samplers (log-SNR is finite there).
    t_min: float = 1e-3
    #: Largest time (the prior end).
    t_max: float = 1.0

    @abstractmethod
    def log_alpha(self, t: Tensor) -> Tensor:
        """log alpha(t)."""

    @abstractmethod
    def log_sigma(self, t: Tensor) -> Tensor:
        """log sigma(t)."""

    @abstractmethod
    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """Exact inverse of :meth:`log_snr`."""

    def alpha(self, t: Tensor) -> Tensor:
        return self.log_alpha(t).exp()

    def sigma(self, t: Tensor) -> Tensor:
        return self.log_sigma(t).exp()

    def log_snr(self, t: Tensor) -> Tensor:
        return 2.0 * (self.log_alpha(t) - self.log_sigma(t))

    def prior_std(self) -> float:
        """Standard deviation of the Gaussian prior at ``t_max``."""
        return 1.0

    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
              device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Draw x at ``t_max`` from the prior N(0, prior_std^2 I) (``dtype`` defaults to torch's default)."""
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return noise * self.prior_std()

    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None,
                 dtype: torch.dtype | None = None) -> Tensor:
        """Training times, uniform on [t_min, t_max]."""
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)
        return self.t_min + (self.t_max - self.t_min) * u

    def marginal(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t given x_0 and standard normal ``noise``."""
        return expand_like(self.alpha(t), x0) * x0 + expand_like(self.sigma(t), x0) * noise

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(d alpha / dt, d sigma / dt), by autograd unless a subclass has a closed form."""
        with torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            a, s = self.alpha(tt), self.sigma(tt)
            da, = torch.autograd.grad(a.sum(), tt, retain_graph=True)
            ds, = torch.autograd.grad(s.sum(), tt)
        return da, ds

    def drift_coef(self, t: Tensor) -> Tensor:
        """f(t) = d log alpha / dt of the forward SDE dx = f x dt + g dw."""
        da, _ = self.derivatives(t)
        return da / self.alpha(t)

    def diffusion_coef(self, t: Tensor) -> Tensor:
        """g(t) with g^2 = d sigma^2/dt - 2 f sigma^2."""
        da, ds = self.derivatives(t)
        a, s = self.alpha(t), self.sigma(t)
        g2 = 2.0 * s * ds - 2.0 * (da / a) * s * s
        return g2.clamp_min(0.0).sqrt()


def expand_like(coef: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample coefficient (B,) or scalar to broadcast against ``like``."""
    if coef.dim() == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (like.dim() - coef.dim()))


class DiscreteVP(NoiseSchedule):
    """DDPM's discrete variance-preserving chain with T steps, seen in continuous time.

    Step n (1..T) sits at t = n / T with alpha_bar_n = prod_{i<=n} (1 - beta_i); t = 0 is the data
    (alpha_bar = 1). log alpha is interpolated linearly in t between grid points, so every grid point is exact
    and the log-SNR inverse is exact too.
    """

    def __init__(self, betas: Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        self.betas = betas
        self.num_steps = len(betas)
        log_alpha_bar = 0.5 * torch.cumsum(torch.log1p(-betas), 0)
        self._log_alpha_grid = torch.cat([torch.zeros(1, dtype=torch.float64), log_alpha_bar])
        self.t_min = 1.0 / self.num_steps
        self.t_max = 1.0
        self._grids: dict[torch.device, Tensor] = {}

    def _grid_on(self, device: torch.device) -> Tensor:
        """log alpha on the step grid, copied to ``device`` once (not at every call)."""
        if device not in self._grids:
            self._grids[device] = self._log_alpha_grid.to(device)
        return self._grids[device]

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteVP:
        """Linear betas (Ho et al. 2020); endpoints are rescaled by 1000 / T so short chains stay sensible."""
        scale = 1000.0 / num_steps
        return cls(torch.linspace(beta_start * scale, min(beta_end * scale, 0.999), num_steps, dtype=torch.float64))

    @classmethod
    def cosine(cls, num_steps: int = 1000, s: float = 0.008) -> DiscreteVP:
        """Cosine alpha_bar (Nichol & Dhariwal 2021), betas clipped at 0.999."""
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(1e-8, 0.999)
        return cls(betas)

    @classmethod
    def vp(cls, num_steps: int = 5, beta_min: float = 0.1, beta_max: float = 10.0) -> DiscreteVP:
        """Discretised VP-SDE betas, the short-chain schedule of Diffusion-QL (Wang et al. 2023)."""
        n = torch.arange(1, num_steps + 1, dtype=torch.float64)
        alpha = torch.exp(-beta_min / num_steps - 0.5 * (beta_max - beta_min) * (2 * n - 1) / num_steps**2)
        return cls(1 - alpha)

    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None,
                 dtype: torch.dtype | None = None) -> Tensor:
        """Training times on the grid {1/T, ..., 1}."""
        steps = torch.randint(1, self.num_steps + 1, (n,), generator=generator, device=device)
        return steps.to(dtype or torch.get_default_dtype()) / self.num_steps

    def log_alpha(self, t: Tensor) -> Tensor:
        grid = self._grid_on(t.device)
        pos = t.double().clamp(0.0, 1.0) * self.num_steps
        lo = pos.floor().clamp(max=self.num_steps - 1).long()
        frac = pos - lo
        out = grid[lo] + frac * (grid[lo + 1] - grid[lo])
        return out.to(t.dtype)

    def log_sigma(self, t: Tensor) -> Tensor:
        la = self.log_alpha(t).double()
        return (0.5 * torch.log(-torch.expm1(2.0 * la))).to(t.dtype)

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        # alpha^2 = sigmoid(log_snr); invert the piecewise-linear log alpha on the (decreasing) grid.
        la = (0.5 * torch.nn.functional.logsigmoid(log_snr.double()))
        grid = self._grid_on(la.device)
        neg = -grid  # increasing
        idx = torch.searchsorted(neg, -la).clamp(1, self.num_steps)
        lo, hi = grid[idx - 1], grid[idx]
        frac = (la - lo) / (hi - lo)
        return ((idx - 1 + frac) / self.num_steps).to(log_snr.dtype)


class VPSDE(NoiseSchedule):
    """Continuous VP-SDE, linear beta(t) (Song et al. 2021): log alpha = -beta_min t/2 - (beta_max-beta_min) t^2/4."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        self.beta_min, self.beta_max, self.t_min = beta_min, beta_max, t_min

    def log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def log_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * torch.log(-torch.expm1(2.0 * self.log_alpha(t)))

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        # 2 log alpha = -log(1 + exp(-lambda)) =: -c; solve (b1-b0)/2 t^2 + b0 t - c = 0.
        c = torch.nn.functional.softplus(-log_snr)
        db = self.beta_max - self.beta_min
        return 2.0 * c / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * db * c))

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        beta = self.beta_min + t * (self.beta_max - self.beta_min)
        a, s = self.alpha(t), self.sigma(t)
        da = -0.5 * beta * a
        ds = 0.5 * beta * a * a / s
        return da, ds


class VESDE(NoiseSchedule):
    """Variance-exploding SDE: alpha = 1, sigma = sigma_min (sigma_max / sigma_min)^t (Song et al. 2021)."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-3):
        self.sigma_min, self.sigma_max, self.t_min = sigma_min, sigma_max, t_min
        self._log_ratio = math.log(sigma_max / sigma_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def log_sigma(self, t: Tensor) -> Tensor:
        return math.log(self.sigma_min) + t * self._log_ratio

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        return (-0.5 * log_snr - math.log(self.sigma_min)) / self._log_ratio

    def prior_std(self) -> float:
        return self.sigma_max

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(t), self.sigma(t) * self._log_ratio


class LinearFlow(NoiseSchedule):
    """Rectified-flow / linear interpolation path: alpha = 1 - t, sigma = t (Liu et al. 2023, Lipman et al. 2023)."""

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0 - 1e-3):
        self.t_min, self.t_max = t_min, t_max

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.log1p(-t)

    def log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(t)

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        # alpha / sigma = exp(lambda / 2) => t = 1 / (1 + exp(lambda / 2))
        return torch.sigmoid(-0.5 * log_snr)

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return -torch.ones_like(t), torch.ones_like(t)


class TrigFlow(NoiseSchedule):
    """Trigonometric generalised VP path (GVP): alpha = cos(pi t / 2), sigma = sin(pi t / 2) (Albergo et al. 2023)."""

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0 - 1e-3):
        self.t_min, self.t_max = t_min, t_max

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.log(self.alpha(t))

    def log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(self.sigma(t))

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        # tan(pi t / 2) = sigma / alpha = exp(-lambda / 2)
        return torch.atan(torch.exp(-0.5 * log_snr)) * (2.0 / math.pi)

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return -0.5 * math.pi * self.sigma(t), 0.5 * math.pi * self.alpha(t)


SCHEDULES = {
    "ddpm-linear": DiscreteVP.linear,
    "ddpm-cosine": DiscreteVP.cosine,
    "ddpm-vp": DiscreteVP.vp,
    "vp-sde": VPSDE,
    "ve-sde": VESDE,
    "linear-flow": LinearFlow,
    "trig-flow": TrigFlow,
}


def make_schedule(name: str, **kwargs) -> NoiseSchedule:
    """Build a schedule by registry name (see ``SCHEDULES``)."""
    try:
        return SCHEDULES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}") from None
