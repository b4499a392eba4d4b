"""The closed-form mathematics of noised MoLR-MoG mixtures — written once.

A mixture is given by padded tensors (see `Mixture`); the noised density is

    p_t(x) = sum_{k,l} w_k pi_{k,l} N(x; s A_k mu_{k,l}, s^2 A_k U_{k,l} U_{k,l}^T A_k^T + gamma^2 I_D)

and everything (log p_t, responsibilities R_{k,l}, the Tweedie denoiser and the score)
comes out of one batched evaluation over (batch b, subspace k, mode l) using only the
r x r capacitance matrix M = sigma^2 I_r + U^T U (Woodbury) and the determinant lemma.

Ragged mixtures (different d_k, n_k, r_{k,l}) are *padded*, which is exact here:
padded latent dimensions have zero columns in A_k and zero rows in mu and U, padded
rank columns of U are zero (they add sigma^2 to M's diagonal and cancel in the
log-determinant), and padded modes carry log-weight -inf (responsibility exactly 0).

The same functions serve the analytic ground truth (buffers) and the learnable experts
(parameters): gradients flow through every operation.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
from torch import Tensor

from molrmog.core.errors import MolrmogError, NumericalError

__all__ = ["Mixture", "Posterior", "posterior", "log_prob", "score", "denoise", "responsibilities", "bridge",
           "random_draw", "cholesky_inverse", "reverse_step", "lowrank_log_density", "denoiser_jacobian",
           "decode_components", "scalar_terms_fused", "compile_once"]

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class Mixture:
    """Padded parameters of a MoLR-MoG mixture.

    log_w:  (K,)          log subspace weights (sum exp = 1)
    A:      (K, D, d)     orthonormal columns per subspace, zero-padded; None means A = I (K = 1, d = D)
    log_pi: (K, L)        log mode weights within each subspace, -inf for padded modes
    mu:     (K, L, d)     latent means
    U:      (K, L, d, r)  latent covariance factors (Sigma = U U^T), zero-padded
    """

    log_w: Tensor
    A: Tensor | None
    log_pi: Tensor
    mu: Tensor
    U: Tensor

    @property
    def K(self) -> int:
        return self.mu.shape[0]

    @property
    def L(self) -> int:
        return self.mu.shape[1]

    @property
    def d(self) -> int:
        return self.mu.shape[2]

    @property
    def r(self) -> int:
        return self.U.shape[3]

    @property
    def D(self) -> int:
        return self.d if self.A is None else self.A.shape[1]

    @property
    def log_weights(self) -> Tensor:
        """(K, L) joint log-weights log w_k + log pi_{k,l}."""
        return self.log_w[:, None] + self.log_pi

    def to(self, *args, **kwargs) -> Mixture:
        return replace(
            self,
            **{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(*args, **kwargs))
               for f in fields(self)},
        )

    def check_shapes(self) -> None:
        """Raise ValueError when the padded tensors do not fit together."""
        K, L, d, r = self.U.shape if self.U.ndim == 4 else (None,) * 4
        if self.U.ndim != 4:
            raise MolrmogError(f"U must have shape (K, L, d, r), got {tuple(self.U.shape)}")
        if self.mu.shape != (K, L, d):
            raise MolrmogError(f"mu must have shape (K, L, d) = {(K, L, d)}, got {tuple(self.mu.shape)}")
        if self.log_pi.shape != (K, L):
            raise MolrmogError(f"log_pi must have shape (K, L) = {(K, L)}, got {tuple(self.log_pi.shape)}")
        if self.log_w.shape != (K,):
            raise MolrmogError(f"log_w must have shape (K,) = {(K,)}, got {tuple(self.log_w.shape)}")
        if self.A is None:
            if K != 1:
                raise MolrmogError(f"A = None (identity) needs K = 1 subspace, got K = {K}")
        elif self.A.ndim != 3 or self.A.shape[0] != K or self.A.shape[2] != d:
            raise MolrmogError(f"A must have shape (K, D, d) = ({K}, D, {d}), got {tuple(self.A.shape)}")
        elif self.A.shape[1] < d:
            raise MolrmogError(f"A must have D >= d, got D = {self.A.shape[1]} < d = {d}")


class Posterior(NamedTuple):
    """Everything one evaluation gives.

    log_p: (B,)       log p_t(x)
    R:     (B, K, L)  responsibilities R_{k,l}(x)
    m:     (B, D)     s_t E[x_0 | x_t] = sum_{k,l} R_{k,l} A_k (s mu_{k,l} + U_{k,l} w_{k,l})
    """

    log_p: Tensor
    R: Tensor
    m: Tensor


def _per_sample(v: Tensor | float, x: Tensor) -> Tensor:
    """s or gamma as a tensor of shape () or (B,), in x's dtype/device."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.ndim > 1 or (v.ndim == 1 and v.shape[0] not in (1, x.shape[0])):
        raise MolrmogError(f"t must be a scalar or have shape (B,) = ({x.shape[0]},), got {tuple(v.shape)}")
    return v.reshape(()) if v.numel() == 1 else v


def _kb(v: Tensor) -> Tensor:
    """Shape () -> (), (B,) -> (1, B, 1) for broadcasting against (K, B, L)."""
    return v if v.ndim == 0 else v[None, :, None]


def _encode(mix: Mixture, x: Tensor) -> Tensor:
    """z_k = A_k^T x as a (K, B, d) view. One GEMM (B x D) @ (D x K d)."""
    if mix.A is None:
        return x[None]
    K, D, d = mix.A.shape
    return (x @ mix.A.permute(1, 0, 2).reshape(D, K * d)).view(x.shape[0], K, d).transpose(0, 1)


def decode_components(mix: Mixture, c: Tensor) -> Tensor:
    """sum_k A_k c_k: (K, B, d) -> (B, D). One GEMM (B x K d) @ (K d x D)."""
    if mix.A is None:
        return c[0]
    K, D, d = mix.A.shape
    return c.transpose(0, 1).reshape(c.shape[1], K * d) @ mix.A.permute(0, 2, 1).reshape(K * d, D)


def _capacitance(mix: Mixture, sigma2: Tensor, check: bool) -> tuple[Tensor, Tensor]:
    """Cholesky factor C of M = sigma^2 I_r + U^T U and log det(I_r + U^T U / sigma^2).

    sigma2 of shape () gives (K, L, r, r) and (K, L); of shape (B,) gives (B, K, L, r, r), (B, K, L).
    With `check`, a factorisation failure raises NumericalError (a host synchronisation on a GPU:
    without it, a failure shows up as NaN in the results).
    """
    UtU = mix.U.transpose(-1, -2) @ mix.U  # (K, L, r, r)
    eye = torch.eye(mix.r, dtype=UtU.dtype, device=UtU.device)
    s2 = sigma2 if sigma2.ndim == 0 else sigma2[:, None, None, None, None]
    chol, info = torch.linalg.cholesky_ex(s2 * eye + UtU)
    if check and bool((info != 0).any()):
        raise NumericalError(
            "capacitance matrix sigma^2 I + U^T U is not positive definite at this t "
            "(sigma too small for the dtype, or non-finite U); use float64 or a larger t_min"
        )
    logdet_M = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    logdet = logdet_M - mix.r * torch.log(sigma2 if sigma2.ndim == 0 else sigma2[:, None, None])
    return chol, logdet


# Elements of the (K, B, r + 1, L) working arrays per row block, per device and path: on the CPU the
# eager path is fastest with ~8 MB blocks (cache), the fused (compiled) path with ~32 MB; on a GPU the
# blocks only bound memory (512 MB). Blocks are independent, so this changes no result.
BLOCK_ELEMENTS = {("cpu", False): 2**21, ("cpu", True): 2**23, ("cuda", False): 2**27, ("cuda", True): 2**27}
# default of `fused` (compile the scalar-t evaluation): MOLRMOG_FUSED=1 / 0, else on for CUDA, off for the
# CPU (where the compile time of a short command costs more than it saves)
FUSED = {"1": True, "0": False}.get(os.environ.get("MOLRMOG_FUSED", ""))


def use_fused(x: Tensor, fused: bool | None = None) -> bool:
    fused = FUSED if fused is None else fused
    return x.device.type == "cuda" if fused is None else bool(fused)


def _rows(mix: Mixture, x: Tensor, fused: bool) -> int:
    per_row = mix.K * mix.L * (mix.r + 1)
    budget = BLOCK_ELEMENTS.get((x.device.type, fused), BLOCK_ELEMENTS[("cuda", fused)])
    return max(64, budget // per_row)


def posterior(mix: Mixture, x: Tensor, s: Tensor | float, gamma: Tensor | float, *, check: bool | None = None,
              fused: bool | None = None) -> Posterior:
    """One batched evaluation of the noised mixture at x (B, D), scale s and noise gamma > 0.

    s and gamma are scalars or per-sample (B,) tensors. Internally (K, B, L)-major so that every
    product is one batched GEMM over k; no Python loop over k or l. Large batches are evaluated in row
    blocks sized per device. `check` (default: on the CPU, where it costs no synchronisation) validates
    gamma > 0 and the capacitance factorisation; `fused` (scalar s and gamma only; default `use_fused`:
    MOLRMOG_FUSED=1/0, else on for CUDA) runs the evaluation through torch.compile -- the same arithmetic,
    fused into few kernels; if compilation fails it says so once and runs eagerly.
    """
    s, gamma = _per_sample(s, x), _per_sample(gamma, x)
    check = x.device.type == "cpu" if check is None else check
    if check and bool((gamma <= 0).any()):
        raise MolrmogError("gamma_t must be > 0 for the noised mixture; use t > 0")
    if s.ndim == 0 and gamma.ndim == 0:
        fused = use_fused(x, fused)
        if fused and x.shape[0] <= _rows(mix, x, True):  # one compiled graph: factors, terms and the block
            log_p, R, m, ok = compile_once(scalar_terms_fused)(mix.log_weights, mix.A, mix.mu, mix.U, x, s, gamma)
            if check and not bool(ok):
                raise NumericalError("capacitance matrix sigma^2 I + U^T U is not positive definite at this t "
                                     "(sigma too small for the dtype, or non-finite U); use float64 or a larger t_min")
            return Posterior(log_p, R, m)
        P, logdet = _scalar_terms(mix, (gamma / s) ** 2, check)
        block = compile_once(_scalar_block) if fused else _scalar_block
        A = mix.A
        run = lambda xb, sb, gb: block(A, mix.log_weights, P, logdet, xb, s, gamma)  # noqa: E731
    else:
        fused = False
        run = lambda xb, sb, gb: _per_sample_block(mix, xb, sb, gb, check)  # noqa: E731
    rows = _rows(mix, x, fused)
    if x.shape[0] <= rows:
        return Posterior(*run(x, s, gamma))
    parts = [run(x[i: i + rows], s if s.ndim == 0 else s[i: i + rows], gamma if gamma.ndim == 0 else gamma[i: i + rows])
             for i in range(0, x.shape[0], rows)]
    return Posterior(*(torch.cat(p) for p in zip(*parts, strict=True)))


def _scalar_terms(mix: Mixture, sigma2: Tensor, check: bool) -> tuple[Tensor, Tensor]:
    """Per call, for one sigma: P = [[F | mu], [F^T mu | ||mu||^2 / 2]] per k with the whitened factors
    F = U C^{-T} (U M^{-1} U^T = F F^T), columns ordered (r + 1, L): (K, d + 1, (r + 1) L); and the
    log-determinants (K, L)."""
    mu, U = mix.mu, mix.U
    K, L, d, r = U.shape
    chol, logdet = _capacitance(mix, sigma2, check)
    F = torch.linalg.solve_triangular(chol, U.transpose(-1, -2), upper=False).transpose(-1, -2)
    top = torch.cat([F, mu[..., None]], -1).permute(0, 2, 3, 1)  # (K, d, r + 1, L)
    bottom = torch.cat([(F * mu[..., None]).sum(2), 0.5 * (mu * mu).sum(-1, keepdim=True)], -1)
    P = torch.cat([top, bottom.permute(0, 2, 1)[:, None]], 1).reshape(K, d + 1, (r + 1) * L)
    return P.transpose(1, 2).contiguous().transpose(1, 2), logdet  # column-major per k: faster bmm for thin z


def _scalar_block(A: Tensor | None, log_weights: Tensor, P: Tensor, logdet: Tensor, x: Tensor, s: Tensor,
                  gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """log p, R, m for rows x (B, D) at one (s, gamma), from the per-call terms of `_scalar_terms`."""
    K, L = log_weights.shape
    r = P.shape[2] // L - 1
    d, D, B = P.shape[1] - 1, x.shape[1], x.shape[0]
    z = x[None] if A is None else (x @ A.permute(1, 0, 2).reshape(D, K * d)).view(B, K, d).transpose(0, 1)
    g2 = gamma**2
    # one bmm of [z, -s] with P gives proj = F^T v (v = z - s mu) and zmu = z.mu - s ||mu||^2 / 2
    z1 = torch.cat([z, (-s).expand(K, B, 1)], -1)
    Zp = torch.bmm(z1, P).view(K, B, r + 1, L)
    proj, zmu = Zp[:, :, :r], Zp[:, :, r]
    vMv = proj.square().sum(2)
    # log N_{k,l}(x) (design notes, section 2) with ||x - A A^T x||^2 + ||v||^2 = ||x||^2 - 2 s zmu:
    # log N = -||x||^2 / (2 gamma^2) + (s zmu + vMv / 2) / gamma^2 - (D log(2 pi gamma^2) + logdet) / 2.
    # The first term is the same for every (k, l), so it is added to log p only.
    logits = (log_weights[:, None] - 0.5 * (D * (LOG_2PI + torch.log(g2)) + logdet[:, None])
              + (s * zmu + 0.5 * vMv) / g2)  # (K, B, L)
    lse = torch.logsumexp(logits, dim=(0, 2))
    log_p = lse - 0.5 * (x * x).sum(-1) / g2
    R = torch.exp(logits - lse[None, :, None])
    # c_k = sum_l R_kl (s mu_kl + U_kl M^{-1} U_kl^T v_kl) = [R a | s R] @ [F | mu]^T with a = F^T v;
    # [R a | s R] written over Zp's layout without a concatenation; m = sum_k A_k c_k
    G = Zp * R[:, :, None]
    G[:, :, r] = s * R
    c = torch.bmm(G.view(K, B, (r + 1) * L), P[:, :d].transpose(1, 2))
    m = c[0] if A is None else c.transpose(0, 1).reshape(B, K * d) @ A.permute(0, 2, 1).reshape(K * d, D)
    return log_p, R.permute(1, 0, 2), m


def scalar_terms_fused(log_weights: Tensor, A: Tensor | None, mu: Tensor, U: Tensor, x: Tensor, s: Tensor,
                 gamma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`_scalar_terms` then `_scalar_block` in one function (what the fused path compiles when the
    batch is one block); returns also whether every capacitance factorisation succeeded."""
    sigma2 = (gamma / s) ** 2
    UtU = U.transpose(-1, -2) @ U
    chol, info = torch.linalg.cholesky_ex(sigma2 * torch.eye(U.shape[-1], dtype=U.dtype, device=U.device) + UtU)
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1) - U.shape[-1] * torch.log(sigma2)
    F = torch.linalg.solve_triangular(chol, U.transpose(-1, -2), upper=False).transpose(-1, -2)
    K, L, d, r = U.shape
    top = torch.cat([F, mu[..., None]], -1).permute(0, 2, 3, 1)
    bottom = torch.cat([(F * mu[..., None]).sum(2), 0.5 * (mu * mu).sum(-1, keepdim=True)], -1)
    P = torch.cat([top, bottom.permute(0, 2, 1)[:, None]], 1).reshape(K, d + 1, (r + 1) * L)
    log_p, R, m = _scalar_block(A, log_weights, P, logdet, x, s, gamma)
    return log_p, R, m, (info == 0).all()


_COMPILED: dict = {}


def compile_once(fn):
    """fn through torch.compile, compiled once per process on first use (the `fused` path); if compiling
    fails (no compiler, an unsupported backend), a warning is logged once and fn runs eagerly."""
    if fn not in _COMPILED:
        # inductor itself calls a deprecated torch helper while it compiles; not ours to fix
        warnings.filterwarnings("ignore", message=r".*torch\._prims_common\.check.*")
        compiled = torch.compile(fn, dynamic=None)

        def run(*args):
            if _COMPILED.get(("failed", fn)):
                return fn(*args)
            try:
                return compiled(*args)
            except Exception as e:  # noqa: BLE001 - an optional speed-up must never stop the work
                logging.getLogger(__name__).warning("torch.compile of %s failed (%s: %s); evaluating eagerly",
                                                    fn.__name__, type(e).__name__, str(e).splitlines()[0][:200])
                _COMPILED[("failed", fn)] = True
                return fn(*args)

        _COMPILED[fn] = run
    return _COMPILED[fn]


def cholesky_inverse(chol: Tensor, triangular: bool | None = None) -> Tensor:
    """M^{-1} from M's lower Cholesky factor C (M = C C^T), batched. On the CPU torch.cholesky_inverse is
    the fastest; on CUDA its batched form held a MoG training step on the host for ~20 ms (profiled on an
    H200), so there (`triangular`, default: off the CPU) M^{-1} = C^{-T} C^{-1} from one batched triangular
    solve and one batched product."""
    if not (chol.device.type != "cpu" if triangular is None else triangular):
        return torch.cholesky_inverse(chol)
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device).expand_as(chol)
    C_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    return C_inv.transpose(-1, -2) @ C_inv


def _per_sample_block(mix: Mixture, x: Tensor, s: Tensor, gamma: Tensor, check: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The evaluation with per-sample (s, gamma) -- training, where every row has its own t: a per-sample
    capacitance (B, K, L, r, r), the same formulas as `_scalar_block` otherwise."""
    sigma2 = (gamma / s) ** 2
    sk, g2k = _kb(s), _kb(gamma**2)
    mu, U = mix.mu, mix.U
    K, L, d, r = U.shape
    B = x.shape[0]
    z = _encode(mix, x)  # (K, B, d)
    chol, logdet = _capacitance(mix, sigma2, check)  # (B, K, L, r, r), (B, K, L)
    top = torch.cat([U, mu[..., None]], -1).permute(0, 2, 3, 1)  # (K, d, r + 1, L): unwhitened U
    bottom = torch.cat([(U * mu[..., None]).sum(2), 0.5 * (mu * mu).sum(-1, keepdim=True)], -1)
    P = torch.cat([top, bottom.permute(0, 2, 1)[:, None]], 1).reshape(K, d + 1, (r + 1) * L)
    P = P.transpose(1, 2).contiguous().transpose(1, 2)  # column-major per k (as `_scalar_terms`)
    z1 = torch.cat([z, (-s)[None, :, None].expand(K, B, 1)], -1)
    Zp = torch.bmm(z1, P).view(K, B, r + 1, L)
    proj, zmu = Zp[:, :, :r], Zp[:, :, r]  # proj = U^T v
    a = torch.einsum("bklrq,kbql->kbrl", cholesky_inverse(chol), proj)  # a = M^{-1} U^T v
    vMv = (proj * a).sum(2)
    logits = (mix.log_weights[:, None] - 0.5 * (mix.D * (LOG_2PI + torch.log(g2k)) + logdet.transpose(0, 1))
              + (sk * zmu + 0.5 * vMv) / g2k)  # (K, B, L)
    lse = torch.logsumexp(logits, dim=(0, 2))
    log_p = lse - 0.5 * (x * x).sum(-1) / (gamma**2)
    R = torch.exp(logits - lse[None, :, None])
    G = torch.cat([a * R[:, :, None], (sk * R)[:, :, None]], 2)
    c = torch.bmm(G.view(K, B, (r + 1) * L), P[:, :d].transpose(1, 2))
    return log_p, R.permute(1, 0, 2), decode_components(mix, c)


def log_prob(mix: Mixture, x: Tensor, s, gamma, **kw) -> Tensor:
    """log p_t(x): (B,). Keywords as `posterior`."""
    return posterior(mix, x, s, gamma, **kw).log_p


def responsibilities(mix: Mixture, x: Tensor, s, gamma, **kw) -> Tensor:
    """R_{k,l}(x): (B, K, L), padded modes 0."""
    return posterior(mix, x, s, gamma, **kw).R


def denoise(mix: Mixture, x: Tensor, s, gamma, **kw) -> Tensor:
    """Tweedie: E[x_0 | x_t = x] = (x + gamma^2 score)/s: (B, D)."""
    s = _per_sample(s, x)
    m = posterior(mix, x, s, gamma, **kw).m
    return m / (s if s.ndim == 0 else s[:, None])


def score(mix: Mixture, x: Tensor, s, gamma, **kw) -> Tensor:
    """grad_x log p_t(x) = -(1/gamma^2) sum R_{k,l} delta_{k,l}(x) = (s E[x0|x_t] - x)/gamma^2: (B, D)."""
    g = _per_sample(gamma, x)
    m = posterior(mix, x, s, g, **kw).m
    return (m - x) / (g**2 if g.ndim == 0 else (g**2)[:, None])


def random_draw(fn, shape, generator: torch.Generator | None, dtype, device) -> Tensor:
    """torch.randn / torch.rand (`fn`) of `shape` on `device`, drawn where `generator` lives: a CPU generator
    (or none) draws on the CPU and copies, so a seed gives the same numbers on every device; a generator on
    the target device draws there (no host work per draw: the fast path on a GPU)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if generator is not None and generator.device.type == dev.type and dev.type != "cpu":
        return fn(shape, generator=generator, dtype=dtype, device=dev)
    return fn(shape, generator=generator, dtype=dtype).to(dev)


def bridge(s_t: float, g_t: float, s_s: float, g_s: float) -> tuple[float, float, float]:
    """The Gaussian bridge of the forward process between times s < t (design notes, exact reverse step):
    x_s | x_0, x_t ~ N(a x_t + b x_0, v I) with a_{t|s} = s_t / s_s, v_{t|s} = g_t^2 - a_{t|s}^2 g_s^2,
    a = a_{t|s} g_s^2 / g_t^2, b = s_s v_{t|s} / g_t^2, v = v_{t|s} g_s^2 / g_t^2. Returns (a, b, v)."""
    a_ts = s_t / s_s
    v_ts = g_t**2 - a_ts**2 * g_s**2
    return a_ts * g_s**2 / g_t**2, s_s * v_ts / g_t**2, max(v_ts * g_s**2 / g_t**2, 0.0)


def reverse_step(mix: Mixture, x: Tensor, s_t: float, g_t: float, s_s: float, g_s: float,
                 generator: torch.Generator | None = None) -> Tensor:
    """An exact draw of x_s ~ q(x_s | x_t) for s < t (s_s = 1, g_s = 0: an exact draw of x_0 | x_t).

    q(x_s | x_t) = sum_c R_c(x_t) N(x_s; a x_t + b m_c, v I + b^2 sigma^2 A_k F_c F_c^T A_k^T), with the
    per-component Tweedie mean m_c = A_k (s mu_c + F_c F_c^T v_c) / s (v_c = A_k^T x_t - s mu_c, F_c = U_c
    C_c^{-T}, C_c C_c^T = sigma^2 I + U_c^T U_c, sigma = g_t / s_t) and (a, b, v) from `bridge`: pick c by the
    responsibilities, then x_s = a x_t + b m_c + sqrt(v) xi + b sigma A_k F_c zeta (Woodbury again: no D x D
    matrix). Random numbers come from `generator` (`random_draw`: a CPU one gives the same draws on every device)."""
    B, dev = x.shape[0], x.device
    K, L, d, r = mix.U.shape
    st, gt = torch.tensor(s_t, dtype=x.dtype, device=dev), torch.tensor(g_t, dtype=x.dtype, device=dev)
    R = posterior(mix, x, st, gt).R.reshape(B, K * L)
    u = random_draw(torch.rand, (B, 1), generator, torch.float64, dev)
    cdf = torch.cumsum(R.double(), 1)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_max(K * L - 1)  # R_c > 0 only
    k, l = idx // L, idx % L
    sigma2 = (g_t / s_t) ** 2
    chol, _ = _capacitance(mix, torch.tensor(sigma2, dtype=x.dtype, device=dev), False)
    F = torch.linalg.solve_triangular(chol, mix.U.transpose(-1, -2), upper=False).transpose(-1, -2)  # (K, L, d, r)
    rows = torch.arange(B, device=dev)
    Fc, mu = F[k, l], mix.mu[k, l]  # (B, d, r), (B, d)
    v_c = _encode(mix, x)[k, rows] - s_t * mu
    w = torch.einsum("bdr,bd->br", Fc, v_c)  # F_c^T v_c
    m_lat = mu + torch.einsum("bdr,br->bd", Fc, w) / s_t  # (s mu + F F^T v) / s, in subspace k's coordinates
    zeta = random_draw(torch.randn, (B, r), generator, x.dtype, dev)
    a, b, v = bridge(s_t, g_t, s_s, g_s)
    lat = b * (m_lat + math.sqrt(sigma2) * torch.einsum("bdr,br->bd", Fc, zeta))
    c = torch.zeros(K, B, d, dtype=x.dtype, device=dev)
    c[k, rows] = lat
    out = a * x + decode_components(mix, c)
    if v > 0:
        out = out + math.sqrt(v) * random_draw(torch.randn, x.shape, generator, x.dtype, dev)
    return out


def denoiser_jacobian(mix: Mixture, x: Tensor, s: float, gamma: float) -> Tensor:
    """d E[x_0 | x_t] / d x_t at every row of x (B, D), in closed form: (B, D, D).

    Second-order Tweedie: the Jacobian is (s / gamma^2) Cov[x_0 | x_t], and for a mixture that covariance is
    the responsibility-weighted posterior covariance of each component, sigma^2 A_k F_c F_c^T A_k^T (F_c the
    whitened factor, sigma = gamma / s), plus the covariance of the per-component means m_c under the
    responsibilities:  J = (s / gamma^2) [ sum_c R_c (sigma^2 A F_c F_c^T A^T + m_c m_c^T) - m m^T ]."""
    d = mix.U.shape[2]
    st = torch.tensor(s, dtype=x.dtype, device=x.device)
    gt = torch.tensor(gamma, dtype=x.dtype, device=x.device)
    R = posterior(mix, x, st, gt).R  # (B, K, L)
    sigma2 = (gamma / s) ** 2
    chol, _ = _capacitance(mix, torch.tensor(sigma2, dtype=x.dtype, device=x.device), False)
    F = torch.linalg.solve_triangular(chol, mix.U.transpose(-1, -2), upper=False).transpose(-1, -2)  # (K, L, d, r)
    A = mix.A if mix.A is not None else torch.eye(d, dtype=x.dtype, device=x.device)[None]
    v = _encode(mix, x).transpose(0, 1)[:, :, None, :] - s * mix.mu[None]  # (B, K, L, d)
    lat = mix.mu[None] + torch.einsum("kldr,kler,bkle->bkld", F, F, v) / s  # latent component means
    m_c = torch.einsum("kDd,bkld->bklD", A, lat)  # (B, K, L, D)
    AF = torch.einsum("kDd,kldr->klDr", A, F)
    cov = sigma2 * torch.einsum("bkl,klDr,klEr->bDE", R, AF, AF)
    cov = cov + torch.einsum("bkl,bklD,bklE->bDE", R, m_c, m_c)
    m = torch.einsum("bkl,bklD->bD", R, m_c)
    return (s / gamma**2) * (cov - m[:, :, None] * m[:, None, :])


def lowrank_log_density(z: Tensor, mu: Tensor, W: Tensor, s2: Tensor) -> Tensor:
    """log N(z_i; mu_l, W_l W_l^T + s2_l I) for every point and component: (N, L), from z (N, d), mu (L, d),
    W (L, d, r) and s2 (L,) > 0 -- a component per mode with its own isotropic floor (a mixture of
    probabilistic PCA). The same capacitance algebra as the noised mixture (Woodbury, determinant lemma):
    with M = s2 I_r + W^T W = C C^T and v = z - mu,

        log N = -1/2 [ (||v||^2 - ||C^{-1} W^T v||^2) / s2 + d log(2 pi s2) + log det(I_r + W^T W / s2) ].
    """
    d, r = W.shape[1], W.shape[2]
    M = s2[:, None, None] * torch.eye(r, dtype=W.dtype, device=W.device) + W.transpose(1, 2) @ W  # (L, r, r)
    C = torch.linalg.cholesky(M)
    logdet = 2 * torch.log(torch.diagonal(C, dim1=-2, dim2=-1)).sum(-1) - r * torch.log(s2)
    vv = (z * z).sum(1)[:, None] - 2 * z @ mu.T + (mu * mu).sum(1)[None]  # ||z - mu_l||^2: (N, L)
    Wv = torch.einsum("ldr,nd->lnr", W, z) - torch.einsum("ldr,ld->lr", W, mu)[:, None]  # W^T v: (L, N, r)
    a = torch.linalg.solve_triangular(C, Wv.transpose(1, 2), upper=False)  # C^{-1} W^T v: (L, r, N)
    quad = (vv - (a * a).sum(1).T) / s2[None]
    return -0.5 * (quad + d * (LOG_2PI + torch.log(s2))[None] + logdet[None])


def log_prob_clean(mix: Mixture, x: Tensor) -> Tensor:
    """log p_0(x) at t = 0, defined only when every component is full rank in R^D.

    With A_k square and U_kl square invertible, log N(x; A mu, A U U^T A^T) =
    -1/2 [ ||M0^{-1} U^T v||^2 + D log 2 pi + log det M0 ], M0 = U^T U, v = A^T x - mu.
    """
    if mix.r != mix.D or mix.d != mix.D:
        raise MolrmogError(
            f"p_0 lives on a union of subspaces (latent d = {mix.d}, rank r = {mix.r}, ambient "
            f"D = {mix.D}) and has no density in R^D; evaluate log_prob at t > 0 instead"
        )
    z = _encode(mix, x).transpose(0, 1)  # (B, K, d)
    v = z[:, :, None, :] - mix.mu  # (B, K, L, d)
    M0 = mix.U.transpose(-1, -2) @ mix.U
    chol, info = torch.linalg.cholesky_ex(M0)
    valid = torch.isfinite(mix.log_pi)
    if bool((info[valid] != 0).any()):
        raise MolrmogError("p_0 has a singular covariance (U U^T not invertible); evaluate at t > 0")
    y = torch.einsum("bkld,kldr->bklr", v, mix.U)
    sol = torch.cholesky_solve(y[..., None], chol).squeeze(-1)
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    log_N = -0.5 * ((sol * sol).sum(-1) + mix.D * LOG_2PI + logdet)
    log_N = torch.where(valid, log_N, torch.full_like(log_N, -math.inf))
    return torch.logsumexp((mix.log_weights + log_N).flatten(1), dim=1)
