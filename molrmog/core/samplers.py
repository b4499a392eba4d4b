"""Samplers: pure functions with one signature.

    sample_X(score, x, ts, schedule, *, progress=False, generator=None) -> x at ts[-1]

`score(x, t)` returns grad log p_t(x) for x (B, D) and a scalar time tensor t; `ts` is a
decreasing time grid (see `molrmog.core.schedules`); `x` is a draw from the prior at ts[0],
usually `prior(schedule, ts[0], shape)`. Grids live in `schedules`, steppers here. Every sampler
is written in (s, sigma) form so that it works for any schedule; the schedule's coefficients on
the whole grid are computed once per call (`_Grid`), so a step costs the score evaluations and a
few vector operations.

Two samplers step between grid times with the Gaussian bridge of the forward process
(`mixture.bridge`) and may end at t = 0:
- `ddpm`: ancestral sampling with a Gaussian step whose mean is the model's Tweedie denoiser (with
  the exact score: the Gaussian step with the exact mean, the expressive bottleneck of Li et al. 2024);
- `exact`: the exact reverse step of a MoLR-MoG (`mixture.reverse_step`), for analytic distributions
  and MoG / Gaussian experts, whose own laws are MoLR-MoGs.

`SAMPLERS` is a registry (`molrmog.core.registry`): a new sampler is one function with the signature above
and `@register_sampler("name")`; `--sampler` offers it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from molrmog.core import mixture as mx
from molrmog.core.errors import MolrmogError
from molrmog.core.registry import Registry
from molrmog.core.schedules import Schedule

__all__ = ["sample_euler", "sample_heun", "sample_ddim", "sample_dpmpp_2m", "sample_euler_maruyama", "sample_ddpm",
           "sample_exact", "SAMPLERS", "Sampler", "register_sampler", "get_sampler", "any_model_samplers", "prior",
           "tweedie", "generate"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: the function and what `generate` must know about it."""

    name: str
    fn: Callable[..., Tensor]
    ends_at_zero: bool = False  # its last step lands on x_0: `generate` ends its grid at t = 0, no Tweedie after it
    any_model: bool = True  # False: it needs a closed-form MoLR-MoG (an analytic law, a MoG / Gaussian expert)


SAMPLERS: Registry[Sampler] = Registry("sampler")


def register_sampler(name: str, *, ends_at_zero: bool = False, any_model: bool = True, replace: bool = False):
    """Decorator: register `fn(score, x, ts, schedule, *, progress=False, generator=None) -> x` as `name`."""
    def add(fn):
        SAMPLERS.register(name, Sampler(name, fn, ends_at_zero, any_model), replace=replace)
        return fn
    return add


def any_model_samplers() -> tuple[str, ...]:
    """The samplers that work for every score model (a run's --sampler choices)."""
    return tuple(n for n, e in SAMPLERS.items() if e.any_model)


def prior(schedule: Schedule, t: float | Tensor, shape, generator=None, dtype=torch.float64,
          device=None) -> Tensor:
    """x_T ~ N(0, gamma_T^2 I), the Gaussian the forward process ends near."""
    g = schedule.gamma(torch.as_tensor(t, dtype=torch.float64)).item()
    # drawn where the generator lives: a CPU generator gives the same noise on every device
    return g * mx.random_draw(torch.randn, shape, generator, dtype, device)


def tweedie(score: ScoreFn, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """E[x_0 | x_t] = (x + gamma_t^2 score(x, t)) / s_t."""
    s, g = schedule.s(t).item(), schedule.gamma(t).item()
    return (x + g**2 * score(x, t)) / s


class _Grid:
    """A validated time grid with the schedule's coefficients at every point, as Python floats."""

    def __init__(self, ts: Tensor, schedule: Schedule, name: str, progress: bool):
        if not isinstance(ts, Tensor) or ts.ndim != 1 or ts.numel() < 2:
            shape = tuple(getattr(ts, "shape", ()))
            raise MolrmogError(f"ts must be a 1-D grid with at least 2 times, got shape {shape}")
        if not bool((ts[1:] < ts[:-1]).all()):
            raise MolrmogError("ts must be strictly decreasing (from t_max to t_min)")
        tt = ts.detach().to("cpu", torch.float64)
        self.ts, self.t, self._tt, self._schedule = ts, tt.tolist(), tt, schedule
        self.s, self.sigma, self.gamma = (schedule.s(tt).tolist(), schedule.sigma(tt).tolist(),
                                          schedule.gamma(tt).tolist())
        self.name, self.progress = name, progress

    @functools.cached_property
    def _positive(self) -> Tensor:  # derivatives are not defined at t = 0 (only ddpm / exact step there)
        return torch.where(self._tt > 0, self._tt, self._tt[0])

    @functools.cached_property
    def a(self) -> list[float]:
        return self._schedule.drift_coefficients(self._positive)[0].tolist()

    @functools.cached_property
    def b(self) -> list[float]:
        return self._schedule.drift_coefficients(self._positive)[1].tolist()

    @functools.cached_property
    def dsigma(self) -> list[float]:
        return self._schedule.dsigma(self._positive).tolist()

    def __len__(self) -> int:
        return len(self.t) - 1

    def steps(self):
        return tqdm(range(len(self)), desc=self.name, disable=not self.progress, leave=False)

    def drift(self, score: ScoreFn, x: Tensor, i: int) -> Tensor:
        """PF-ODE: dx/dt = (s'/s) x - s^2 sigma' sigma score(x, t) at grid point i."""
        return self.a[i] * x + self.b[i] * score(x, self.ts[i])

    def x0(self, score: ScoreFn, x: Tensor, i: int) -> Tensor:
        """Tweedie's E[x_0 | x_t] at grid point i."""
        return (x + self.gamma[i] ** 2 * score(x, self.ts[i])) / self.s[i]


def _noise(x: Tensor, generator) -> Tensor:
    return mx.random_draw(torch.randn, x.shape, generator, x.dtype, x.device)


@register_sampler("euler")
def sample_euler(score: ScoreFn, x: Tensor, ts: Tensor, schedule: Schedule, *, progress: bool = False,
                 generator=None) -> Tensor:
    """Probability-flow ODE, explicit Euler."""
    g = _Grid(ts, schedule, "euler", progress)
    for i in g.steps():
        x = x + (g.t[i + 1] - g.t[i]) * g.drift(score, x, i)
    return x


@register_sampler("heun")
def sample_heun(score: ScoreFn, x: Tensor, ts: Tensor, schedule: Schedule, *, progress: bool = False,
                generator=None) -> Tensor:
    """Probability-flow ODE, Heun's 2nd-order method (Karras et al. 2022, Alg. 1)."""
    g = _Grid(ts, schedule, "heun", progress)
    for i in g.steps():
        h = g.t[i + 1] - g.t[i]
        d = g.drift(score, x, i)
        x_e = x + h * d
        x = x + 0.5 * h * (d + g.drift(score, x_e, i + 1))
    return x


@register_sampler("ddim")
def sample_ddim(score: ScoreFn, x: Tensor, ts: Tensor, schedule: Schedule, *, progress: bool = False,
                generator=None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021): x' = s' x0_hat + sqrt(gamma'^2 - c^2) eps_hat + c z,
    c = eta gamma' sqrt(1 - sigma'^2/sigma^2); eta = 0 is deterministic."""
    g = _Grid(ts, schedule, "ddim", progress)
    for i in g.steps():
        s, gm, sig = g.s[i], g.gamma[i], g.sigma[i]
        sn, gn, sign = g.s[i + 1], g.gamma[i + 1], g.sigma[i + 1]
        sc = score(x, g.ts[i])
        eps = -gm * sc  # eps-prediction
        x0 = (x + gm**2 * sc) / s
        c = eta * gn * max(0.0, 1 - sign**2 / sig**2) ** 0.5
        x = sn * x0 + max(gn**2 - c**2, 0.0) ** 0.5 * eps
        if c > 0:
            x = x + c * _noise(x, generator)
    return x


@register_sampler("dpmpp_2m")
def sample_dpmpp_2m(score: ScoreFn, x: Tensor, ts: Tensor, schedule: Schedule, *, progress: bool = False,
                    generator=None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, lambda = -log sigma; first order on the
    first step and on a final step to sigma = 0."""
    g = _Grid(ts, schedule, "dpm++2m", progress)
    old_x0, h_last = None, None
    for i in g.steps():
        s, sig = g.s[i], g.sigma[i]
        sn, sign = g.s[i + 1], g.sigma[i + 1]
        x0 = g.x0(score, x, i)
        if sign == 0:
            x = sn * x0
            break
        h = math.log(sig / sign)  # lambda_next - lambda
        if old_x0 is None:
            D = x0
        else:
            r = h_last / h
            D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
        # x/s evolves like a VE variable: x'/s' = (sigma'/sigma) x/s - expm1(-h) D
        x = sn * ((sign / sig) * (x / s) - math.expm1(-h) * D)
        old_x0, h_last = x0, h
    return x


@register_sampler("euler_maruyama")
def sample_euler_maruyama(score: ScoreFn, x: Tensor, ts: Tensor, schedule: Schedule, *,
                          progress: bool = False, generator=None) -> Tensor:
    """Reverse SDE dx = [f x - g^2 score] dt + g dW, f = s'/s, g^2 = 2 s^2 sigma sigma'; Euler-Maruyama."""
    g = _Grid(ts, schedule, "euler-maruyama", progress)
    for i in g.steps():
        f = g.a[i]
        g2 = 2 * g.s[i] ** 2 * g.sigma[i] * g.dsigma[i]
        h = g.t[i] - g.t[i + 1]  # > 0
        x = x - h * (f * x - g2 * score(x, g.ts[i]))
        x = x + (g2 * h) ** 0.5 * _noise(x, generator)
    return x


@register_sampler("ddpm", ends_at_zero=True)
def sample_ddpm(score: ScoreFn, x: Tensor, ts: Tensor, schedule: Schedule, *, progress: bool = False,
                generator=None) -> Tensor:
    """Ancestral sampling with Gaussian steps (DDPM, Ho et al. 2020, in (s, sigma) form): x_s = a x_t +
    b x0_hat(x_t) + sqrt(v) xi with the bridge coefficients of `mixture.bridge` and x0_hat the model's
    Tweedie denoiser; a step to t = 0 returns x0_hat. With the exact score this is the Gaussian step
    with the exact mean, whose only error is its Gaussian shape."""
    g = _Grid(ts, schedule, "ddpm", progress)
    for i in g.steps():
        x0 = g.x0(score, x, i)
        a, b, v = mx.bridge(g.s[i], g.gamma[i], g.s[i + 1], g.gamma[i + 1])
        x = a * x + b * x0
        if v > 0:
            x = x + math.sqrt(v) * _noise(x, generator)
    return x


def _mixture_model(score):
    """The object behind `score` that knows its closed-form law (has `mixture_for`)."""
    for obj in (score, getattr(score, "__self__", None), getattr(getattr(score, "func", None), "__self__", None)):
        if obj is not None and hasattr(obj, "mixture_for"):
            return obj
    raise MolrmogError("the exact sampler needs a closed-form MoLR-MoG: an analytic distribution (pass dist.score) "
                       "or a MoG / Gaussian expert; use another sampler for other models")


@register_sampler("exact", ends_at_zero=True, any_model=False)
def sample_exact(score: ScoreFn, x: Tensor, ts: Tensor, schedule: Schedule, *, progress: bool = False,
                 generator=None) -> Tensor:
    """Exact ancestral sampling of a MoLR-MoG: every step draws x_s ~ q(x_s | x_t) exactly
    (`mixture.reverse_step`); a grid ending at t = 0 ends with an exact draw of x_0. Any number of steps
    samples the model's law exactly (one step from the prior is exact up to the prior's own error)."""
    model = _mixture_model(score)
    g = _Grid(ts, schedule, "exact", progress)
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):  # the factorisations need float32; the result keeps x's dtype
        x = x.float()
    with torch.no_grad():
        mix = model.mixture_for(x)
        for i in g.steps():
            x = mx.reverse_step(mix, x, g.s[i], g.gamma[i], g.s[i + 1], g.gamma[i + 1], generator)
    return x.to(dtype)


def get_sampler(name: str) -> Callable[..., Tensor]:
    return SAMPLERS.get(name).fn


def generate(score: ScoreFn, n: int, D: int, schedule: Schedule, ts: Tensor, sampler: str = "heun", *,
             generator=None, dtype=torch.float64, device=None, progress: bool = False,
             final_denoise: bool = True) -> Tensor:
    """Draw x_T from the prior, run a sampler down the grid, and (optionally) apply Tweedie at t_min.

    For samplers that end at zero (`ddpm`, `exact`) the grid's last time is replaced by 0 (their last step
    lands on x_0) and no Tweedie step follows. Models that draw random numbers themselves (an SMD expert's
    latent) draw them from the global RNG, which is forked here and seeded from `generator`: the same generator
    gives the same samples, and the caller's global RNG is left alone."""
    entry = SAMPLERS.get(sampler)
    fn = entry.fn
    out_dtype = dtype
    if dtype in (torch.float16, torch.bfloat16):  # the steps run in float32 (half precision overflows 1/gamma^2)
        dtype = torch.float32
    x = prior(schedule, ts[0], (n, D), generator=generator, dtype=dtype, device=device)
    if entry.ends_at_zero:
        ts = torch.cat([ts[:-1], ts.new_zeros(1)]) if ts[-1] > 0 else ts
        final_denoise = False
    if generator is None:  # the caller's global RNG drives everything, as it would without molrmog
        x = fn(score, x, ts, schedule, progress=progress, generator=None)
        return (tweedie(score, x, ts[-1], schedule) if final_denoise else x).to(out_dtype)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device]):
        torch.manual_seed(seed)
        x = fn(score, x, ts, schedule, progress=progress, generator=generator)
        return (tweedie(score, x, ts[-1], schedule) if final_denoise else x).to(out_dtype)
