"""Noise schedules: x_t = s_t x_0 + gamma_t eps with gamma_t = s_t sigma_t.

Each schedule gives s(t), sigma(t), gamma(t), their time derivatives, the inverse
t(sigma), and its valid time range [t_min, t_max]. Time grids for samplers are separate
small functions (`uniform_grid`, `logsnr_grid`, `karras_grid`) returning times in
decreasing order, t_max first, t_min last.

Both are registries (`SCHEDULES`, `GRIDS`, see `molrmog.core.registry`): a new schedule is one `Schedule`
subclass with `@SCHEDULES.register("name")`, and `--schedule` offers it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from molrmog.core.errors import MolrmogError
from molrmog.core.registry import Registry

__all__ = [
    "Schedule",
    "VPSchedule",
    "VESchedule",
    "CosineSchedule",
    "FlowSchedule",
    "get_schedule",
    "uniform_grid",
    "logsnr_grid",
    "karras_grid",
    "make_grid",
    "SCHEDULES",
    "GRIDS",
]


SCHEDULES: Registry[type[Schedule]] = Registry("schedule")
GRIDS: Registry = Registry("grid")


def _t(t: Tensor | float) -> Tensor:
    if isinstance(t, Tensor):
        return t
    try:
        return torch.tensor(float(t), dtype=torch.float64)
    except (TypeError, ValueError):
        raise MolrmogError(f"t must be a number or a tensor of times, got {t!r}") from None


class Schedule:
    """Base class: subclasses define s, sigma, ds, dsigma and t_of_sigma."""

    name: str = "base"

    def __init__(self, t_min: float, t_max: float):
        if not (math.isfinite(t_min) and math.isfinite(t_max)):
            raise MolrmogError(f"schedule range must be finite, got [{t_min}, {t_max}]")
        if t_min >= t_max:
            raise MolrmogError(
                f"t_min ({t_min}) must be smaller than t_max ({t_max}); "
                "pass e.g. t_min=1e-3 and a larger t_max"
            )
        self.t_min = float(t_min)
        self.t_max = float(t_max)

    # --- maths to override -------------------------------------------------------
    def s(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def ds(self, t: Tensor | float) -> Tensor:
        """d s / d t."""
        raise NotImplementedError

    def dsigma(self, t: Tensor | float) -> Tensor:
        """d sigma / d t."""
        raise NotImplementedError

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        """Inverse of sigma(t)."""
        raise NotImplementedError

    # --- derived -------------------------------------------------------------------
    def gamma(self, t: Tensor | float) -> Tensor:
        """gamma_t = s_t sigma_t, the standard deviation of the added noise."""
        return self.s(t) * self.sigma(t)

    def dgamma(self, t: Tensor | float) -> Tensor:
        return self.ds(t) * self.sigma(t) + self.s(t) * self.dsigma(t)

    def check_t(self, t: Tensor | float, *, allow_zero: bool = False) -> None:
        """Raise MolrmogError unless every t lies in [t_min, t_max] (or is 0 when allowed)."""
        tt = _t(t).detach()
        if not torch.isfinite(tt).all():
            raise MolrmogError("t contains NaN or Inf; pass finite times")
        lo, hi = tt.min().item(), tt.max().item()
        tol = 1e-9 * max(1.0, self.t_max)
        low_ok = tt >= self.t_min - tol
        if allow_zero:
            low_ok = low_ok | (tt == 0)
        ok_lo = bool(low_ok.all())
        if not ok_lo or hi > self.t_max + tol:
            extra = " (t = 0 is allowed here too)" if allow_zero else ""
            raise MolrmogError(
                f"t must lie in the {self.name} schedule's range [{self.t_min:g}, {self.t_max:g}]"
                f"{extra}, got values in [{lo:g}, {hi:g}]; clip t or build the schedule "
                f"with another t_min/t_max"
            )

    def s_gamma(self, t, like: Tensor) -> tuple[Tensor, Tensor]:
        """(s_t, gamma_t) in like's dtype and device, shape () or (B,). A scalar t that lives elsewhere (a CPU
        grid time for a model on a GPU) is evaluated where it is and written with torch.full: no host-to-device
        copy, so no synchronisation inside a sampler loop."""
        t = _t(t) if not isinstance(t, Tensor) else t
        if t.device != like.device and t.ndim == 0:
            return (torch.full((), float(self.s(t.double())), dtype=like.dtype, device=like.device),
                    torch.full((), float(self.gamma(t.double())), dtype=like.dtype, device=like.device))
        t = t.to(device=like.device, dtype=torch.float64)
        return self.s(t).to(like.dtype), self.gamma(t).to(like.dtype)

    def timestep(self, t, like: Tensor, batch: int) -> Tensor:
        """1000 t / t_max as (batch,) in like's dtype and device (the U-Nets' time input), without a copy."""
        t = _t(t) if not isinstance(t, Tensor) else t
        if t.device != like.device and t.ndim == 0:
            return torch.full((batch,), 1000 * float(t) / self.t_max, dtype=like.dtype, device=like.device)
        return (1000 * t.to(device=like.device, dtype=like.dtype) / self.t_max).expand(batch)

    def drift_coefficients(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """PF-ODE dx/dt = a(t) x + b(t) score(x, t): returns (a, b) = (s'/s, -s^2 sigma' sigma)."""
        s, sig = self.s(t), self.sigma(t)
        return self.ds(t) / s, -(s**2) * self.dsigma(t) * sig

    def config(self) -> dict:
        return {"name": self.name, "t_min": self.t_min, "t_max": self.t_max}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_min={self.t_min:g}, t_max={self.t_max:g})"


@SCHEDULES.register("vp")
class VPSchedule(Schedule):
    """Ornstein-Uhlenbeck / VP: s_t = e^{-t}, gamma_t = sqrt(1 - e^{-2t}), sigma_t = sqrt(e^{2t} - 1)."""

    name = "vp"

    def __init__(self, t_min: float = 1e-3, t_max: float = 8.0):
        if t_min < 0:
            raise MolrmogError(f"vp schedule needs t_min >= 0, got {t_min}")
        super().__init__(t_min, t_max)

    def s(self, t):
        return torch.exp(-_t(t))

    def sigma(self, t):
        return torch.sqrt(torch.expm1(2 * _t(t)))

    def gamma(self, t):
        return torch.sqrt(-torch.expm1(-2 * _t(t)))

    def ds(self, t):
        return -torch.exp(-_t(t))

    def dsigma(self, t):
        t = _t(t)
        return torch.exp(2 * t) / self.sigma(t)

    def t_of_sigma(self, sigma):
        return 0.5 * torch.log1p(_t(sigma) ** 2)


@SCHEDULES.register("ve", aliases=("edm",))
class VESchedule(Schedule):
    """VE / EDM: s_t = 1, sigma_t = t."""

    name = "ve"

    def __init__(self, t_min: float = 2e-3, t_max: float = 80.0):
        if t_min < 0:
            raise MolrmogError(f"ve schedule needs t_min >= 0, got {t_min}")
        super().__init__(t_min, t_max)

    def s(self, t):
        return torch.ones_like(_t(t))

    def sigma(self, t):
        return _t(t).clone()

    def ds(self, t):
        return torch.zeros_like(_t(t))

    def dsigma(self, t):
        return torch.ones_like(_t(t))

    def t_of_sigma(self, sigma):
        return _t(sigma).clone()


@SCHEDULES.register("cosine")
class CosineSchedule(Schedule):
    """Cosine VP (Nichol & Dhariwal 2021): s_t^2 = alpha_bar(t) = f(t)/f(0),
    f(t) = cos^2((t + eps)/(1 + eps) * pi/2), t in [0, 1)."""

    name = "cosine"

    def __init__(self, t_min: float = 1e-3, t_max: float = 0.999, eps: float = 0.008):
        if t_min < 0 or t_max >= 1:
            raise MolrmogError(f"cosine schedule needs 0 <= t_min < t_max < 1, got [{t_min}, {t_max}]")
        super().__init__(t_min, t_max)
        self.eps = float(eps)
        self._c = math.pi / 2 / (1 + self.eps)
        self._phi0 = self.eps * self._c

    def _phi(self, t):
        return (_t(t) + self.eps) * self._c

    def s(self, t):
        return torch.cos(self._phi(t)) / math.cos(self._phi0)

    def sigma(self, t):
        # sigma^2 = (1 - s^2)/s^2
        s = self.s(t)
        return torch.sqrt(1 - s**2) / s

    def gamma(self, t):
        return torch.sqrt(1 - self.s(t) ** 2)

    def ds(self, t):
        return -torch.sin(self._phi(t)) * self._c / math.cos(self._phi0)

    def dsigma(self, t):
        # d/dt sqrt(s^-2 - 1) = -s' s^-3 / sigma
        s, ds = self.s(t), self.ds(t)
        return -ds / (s**3 * self.sigma(t))

    def t_of_sigma(self, sigma):
        s = 1 / torch.sqrt(1 + _t(sigma) ** 2)
        return torch.arccos(s * math.cos(self._phi0)) / self._c - self.eps

    def config(self) -> dict:
        return {**super().config(), "eps": self.eps}


@SCHEDULES.register("flow")
class FlowSchedule(Schedule):
    """Flow matching / rectified flow (Lipman et al. 2023, Liu et al. 2023): x_t = (1 - t) x_0 + t eps, so
    s_t = 1 - t, gamma_t = t, sigma_t = t / (1 - t). The PF-ODE drift is the velocity E[eps - x_0 | x_t], which
    is what diffusers' FlowMatchEulerDiscreteScheduler steps with (t = its sigma). t_max < 1: at t = 1 the
    signal is gone and s'/s is infinite; the prior at t_max = 0.999 differs from the marginal by 0.1% signal."""

    name = "flow"

    def __init__(self, t_min: float = 1e-3, t_max: float = 0.999):
        if t_min < 0 or t_max >= 1:
            raise MolrmogError(f"flow schedule needs 0 <= t_min < t_max < 1, got [{t_min}, {t_max}]")
        super().__init__(t_min, t_max)

    def s(self, t):
        return 1 - _t(t)

    def sigma(self, t):
        t = _t(t)
        return t / (1 - t)

    def gamma(self, t):
        return _t(t).clone()

    def ds(self, t):
        return -torch.ones_like(_t(t))

    def dsigma(self, t):
        return 1 / (1 - _t(t)) ** 2

    def dgamma(self, t):
        return torch.ones_like(_t(t))

    def t_of_sigma(self, sigma):
        sigma = _t(sigma)
        return sigma / (1 + sigma)


def get_schedule(name: str | Schedule | dict = "vp", **kwargs) -> Schedule:
    """Build a schedule by name (`SCHEDULES`: 'vp', 've'/'edm', 'cosine', 'flow', ...), from its config dict,
    or pass one through."""
    if isinstance(name, Schedule):
        return name
    if isinstance(name, dict):
        cfg = dict(name)
        return get_schedule(cfg.pop("name"), **cfg)
    return SCHEDULES.get(name)(**kwargs)


# --- time grids (decreasing, t_max first, t_min last; n steps -> n + 1 points) ---------


def _check_n(n: int) -> None:
    if int(n) < 1:
        raise MolrmogError(f"a time grid needs at least 1 step, got n={n}")


@GRIDS.register("uniform")
def uniform_grid(schedule: Schedule, n: int, dtype=torch.float64) -> Tensor:
    """n steps uniform in t from t_max down to t_min."""
    _check_n(n)
    return torch.linspace(schedule.t_max, schedule.t_min, n + 1, dtype=dtype)


@GRIDS.register("logsnr")
def logsnr_grid(schedule: Schedule, n: int, dtype=torch.float64) -> Tensor:
    """n steps uniform in log-SNR = -2 log sigma_t."""
    _check_n(n)
    lo = torch.log(schedule.sigma(schedule.t_min))
    hi = torch.log(schedule.sigma(schedule.t_max))
    sig = torch.exp(torch.linspace(hi.item(), lo.item(), n + 1, dtype=torch.float64))
    t = schedule.t_of_sigma(sig)
    t[0], t[-1] = schedule.t_max, schedule.t_min
    return t.to(dtype)


@GRIDS.register("karras")
def karras_grid(schedule: Schedule, n: int, rho: float = 7.0, dtype=torch.float64) -> Tensor:
    """Karras et al. (2022): sigma_i = (smax^(1/rho) + i/n (smin^(1/rho) - smax^(1/rho)))^rho."""
    _check_n(n)
    smin = schedule.sigma(schedule.t_min).item()
    smax = schedule.sigma(schedule.t_max).item()
    ramp = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    t = schedule.t_of_sigma(sig)
    t[0], t[-1] = schedule.t_max, schedule.t_min
    return t.to(dtype)


def make_grid(schedule: Schedule, n: int, kind: str = "karras", **kwargs) -> Tensor:
    return GRIDS.get(kind)(schedule, n, **kwargs)
