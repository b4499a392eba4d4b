"""Denoising score matching (eps-form):  E_t E_{x0, eps} lambda(t) || gamma_t s_theta(x_t, t) + eps ||^2."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from molrmog.core.errors import MolrmogError
from molrmog.core.schedules import Schedule

__all__ = ["sample_times", "dsm_loss", "T_DISTRIBUTIONS"]

T_DISTRIBUTIONS = ("uniform", "log")


def sample_times(schedule: Schedule, n: int, dist: str = "uniform", generator=None,
                 t_min: float | None = None, t_max: float | None = None) -> Tensor:
    """n times in [t_min, t_max] (default: the schedule's range), uniform or log-uniform; float64."""
    lo = schedule.t_min if t_min is None else t_min
    hi = schedule.t_max if t_max is None else t_max
    if not lo < hi:
        raise MolrmogError(f"t_min ({lo}) must be smaller than T ({hi})")
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device if generator else None)
    if dist == "uniform":
        return lo + (hi - lo) * u
    if dist == "log":
        if lo <= 0:
            raise MolrmogError("log-uniform times need t_min > 0")
        return torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u)
    raise MolrmogError(f"unknown time distribution {dist!r}; choose one of {T_DISTRIBUTIONS}")


def dsm_loss(model, x0: Tensor, schedule: Schedule, *, generator=None, t_dist: str = "uniform",
             t_min: float | None = None, t_max: float | None = None, weighting=None) -> Tensor:
    """Mean over the batch of lambda(t) ||gamma_t s_theta(x_t, t) + eps||^2 / D.

    `model(x, t)` returns the score; `weighting(t)` (optional) returns lambda(t) per sample.
    """
    B, D = x0.shape
    # drawn with the generator where it lives (the training device: no host-to-device copies per step)
    t = sample_times(schedule, B, t_dist, generator, t_min, t_max).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                      device=generator.device if generator else None).to(x0.device)
    s = schedule.s(t).to(x0.dtype)[:, None]
    g = schedule.gamma(t).to(x0.dtype)[:, None]
    xt = s * x0 + g * eps
    per = ((g * model(xt, t) + eps) ** 2).sum(1) / D
    if weighting is not None:
        per = per * weighting(t).to(per.dtype)
    return per.mean()
