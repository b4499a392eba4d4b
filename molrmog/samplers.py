"""Samplers: pure functions with one signature.

    sample_X(score, x, ts, schedule, *, progress=False, generator=None) -> x at ts[-1]

`score(x, t)` returns grad log p_t(x) for x (B, D) and a scalar time tensor t; `ts` is a
decreasing time grid (see `molrmog.schedules`); `x` is a draw from the prior at ts[0],
usually `prior(schedule, ts[0], shape)`. Grids live in `schedules`, steppers here.
Every sampler is written in (s, sigma) form so that it works for any schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import MolrmogError
from .schedules import Schedule

__all__ = ["sample_euler", "sample_heun", "sample_ddim", "sample_dpmpp_2m", "sample_euler_maruyama",
           "SAMPLERS", "get_sampler", "prior", "tweedie", "generate"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def prior(schedule: Schedule, t: float | Tensor, shape, generator=None, dtype=torch.float64,
          device=None) -> Tensor:
    """x_T ~ N(0, gamma_T^2 I), the Gaussian the forward process ends near."""
    g = schedule.gamma(torch.as_tensor(t, dtype=torch.float64)).item()
    # drawn on the CPU (where the generator lives), so a seed gives the same noise on every device
    return g * torch.randn(shape, generator=generator, dtype=dtype).to(device)


def tweedie(score: ScoreFn, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """E[x_0 | x_t] = (x + gamma_t^2 score(x, t)) / s_t."""
    s, g = schedule.s(t).item(), schedule.gamma(t).item()
    return (x + g**2 * score(x, t)) / s


def _steps(ts: Tensor, progress: bool, name: str):
    if ts.ndim != 1 or ts.numel() < 2:
        raise MolrmogError(f"ts must be a 1-D grid with at least 2 times, got shape {tuple(ts.shape)}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise MolrmogError("ts must be strictly decreasing (from t_max to t_min)")
    return tqdm(range(ts.numel() - 1), desc=name, disable=not progress, leave=False)


def _ode_drift(score: ScoreFn, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """PF-ODE: dx/dt = (s'/s) x - s^2 sigma' sigma score(x, t)."""
    a, b = schedule.drift_coefficients(t)
    return a.item() * x + b.item() * score(x, t)


def sample_euler(score: ScoreFn, x: Tensor, ts: Tensor, schedule: Schedule, *, progress: bool = False,
                 generator=None) -> Tensor:
    """Probability-flow ODE, explicit Euler."""
    for i in _steps(ts, progress, "euler"):
        x = x + (ts[i + 1] - ts[i]).item() * _ode_drift(score, x, ts[i], schedule)
    return x


def sample_heun(score: ScoreFn, x: Tensor, ts: Tensor, schedule: Schedule, *, progress: bool = False,
                generator=None) -> Tensor:
    """Probability-flow ODE, Heun's 2nd-order method (Karras et al. 2022, Alg. 1)."""
    for i in _steps(ts, progress, "heun"):
        h = (ts[i + 1] - ts[i]).item()
        d = _ode_drift(score, x, ts[i], schedule)
        x_e = x + h * d
        x = x + 0.5 * h * (d + _ode_drift(score, x_e, ts[i + 1], schedule))
    return x


def sample_ddim(score: ScoreFn, x: Tensor, ts: Tensor, schedule: Schedule, *, progress: bool = False,
                generator=None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021): x' = s' x0_hat + sqrt(gamma'^2 - c^2) eps_hat + c z,
    c = eta gamma' sqrt(1 - sigma'^2/sigma^2); eta = 0 is deterministic."""
    for i in _steps(ts, progress, "ddim"):
        t, tn = ts[i], ts[i + 1]
        s, g, sig = schedule.s(t).item(), schedule.gamma(t).item(), schedule.sigma(t).item()
        sn, gn, sign = schedule.s(tn).item(), schedule.gamma(tn).item(), schedule.sigma(tn).item()
        sc = score(x, t)
        eps = -g * sc  # eps-prediction
        x0 = (x + g**2 * sc) / s
        c = eta * gn * max(0.0, 1 - sign**2 / sig**2) ** 0.5
        x = sn * x0 + max(gn**2 - c**2, 0.0) ** 0.5 * eps
        if c > 0:
            x = x + c * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x


def sample_dpmpp_2m(score: ScoreFn, x: Tensor, ts: Tensor, schedule: Schedule, *, progress: bool = False,
                    generator=None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, lambda = -log sigma; first order on the
    first step and on a final step to sigma = 0."""
    old_x0, h_last = None, None
    for i in _steps(ts, progress, "dpm++2m"):
        t, tn = ts[i], ts[i + 1]
        s, g, sig = schedule.s(t).item(), schedule.gamma(t).item(), schedule.sigma(t).item()
        sn, sign = schedule.s(tn).item(), schedule.sigma(tn).item()
        x0 = (x + g**2 * score(x, t)) / s
        if sign == 0:
            x = sn * x0
            break
        h = torch.log(torch.tensor(sig / sign)).item()  # lambda_next - lambda
        if old_x0 is None:
            D = x0
        else:
            r = h_last / h
            D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
        # x/s evolves like a VE variable: x'/s' = (sigma'/sigma) x/s - expm1(-h) D
        x = sn * ((sign / sig) * (x / s) - torch.expm1(torch.tensor(-h)).item() * D)
        old_x0, h_last = x0, h
    return x


def sample_euler_maruyama(score: ScoreFn, x: Tensor, ts: Tensor, schedule: Schedule, *,
                          progress: bool = False, generator=None) -> Tensor:
    """Reverse SDE dx = [f x - g^2 score] dt + g dW, f = s'/s, g^2 = 2 s^2 sigma sigma'; Euler-Maruyama."""
    for i in _steps(ts, progress, "euler-maruyama"):
        t, tn = ts[i], ts[i + 1]
        f, _ = schedule.drift_coefficients(t)
        g2 = (2 * schedule.s(t) ** 2 * schedule.sigma(t) * schedule.dsigma(t)).item()
        h = (t - tn).item()  # > 0
        x = x - h * (f.item() * x - g2 * score(x, t))
        x = x + (g2 * h) ** 0.5 * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "ddim": sample_ddim,
            "dpmpp_2m": sample_dpmpp_2m, "euler_maruyama": sample_euler_maruyama}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise MolrmogError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def generate(score: ScoreFn, n: int, D: int, schedule: Schedule, ts: Tensor, sampler: str = "heun", *,
             generator=None, dtype=torch.float64, device=None, progress: bool = False,
             final_denoise: bool = True) -> Tensor:
    """Draw x_T from the prior, run a sampler down the grid, and (optionally) apply Tweedie at t_min."""
    x = prior(schedule, ts[0], (n, D), generator=generator, dtype=dtype, device=device)
    x = get_sampler(sampler)(score, x, ts, schedule, progress=progress, generator=generator)
    return tweedie(score, x, ts[-1], schedule) if final_denoise else x
