"""Analytic MoLR-MoG distributions (ground truths) built on `molrmog.core.mixture`.

    p0(x) = sum_k w_k sum_l pi_{k,l} N(x; A_k mu_{k,l}, A_k U_{k,l} U_{k,l}^T A_k^T)

`MoLRMoG` is the general class; `MoLRG` (one zero-mean Gaussian per subspace) and
`GaussianMixture` (K = 1, A = I) are the same object built from fewer parameters.
Every distribution has the verbs `sample`, `log_prob`, `score`, `denoise`,
`responsibilities`, a `random` constructor, and `save` / `load` to a directory in the one artefact
format of `molrmog.core.artefacts` (`config.json` with `_class_name` and `_molrmog_format`, and
`diffusion_pytorch_model.safetensors`). Directories of molrmog 0.2 (distribution format 1: `class`,
`format_version` and `params.safetensors`) are still read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from molrmog.core import mixture as mx
from molrmog.core.artefacts import FORMAT_VERSION as ARTEFACT_FORMAT
from molrmog.core.artefacts import (
    WEIGHTS,
    atomic_write,
    check_header,
    check_tensors,
    header,
    read_json,
    read_safetensors,
    write_json,
)
from molrmog.core.errors import ArtefactError, MolrmogError
from molrmog.core.schedules import Schedule, get_schedule

__all__ = ["MoLRMoG", "MoLRG", "GaussianMixture", "load_distribution", "random_orthonormal"]

LEGACY_FORMAT = 1  # molrmog 0.2's distribution directory: config.json {"class", "format_version"} + params.safetensors
_COMPUTE = (torch.float32, torch.float64)  # half-precision input is evaluated in float32 and returned as given


def _as_float_tensor(v, what: str, dtype=None) -> Tensor:
    """A real floating tensor from v (lists, arrays, tensors); complex or non-numeric input is refused."""
    if isinstance(v, (str, bytes)):
        raise MolrmogError(f"{what} must be numbers, got the string {v!r}")
    try:  # python numbers straight into `dtype` (torch.as_tensor(0.01) alone would round them to float32)
        t = torch.as_tensor(v, dtype=dtype) if dtype is not None and not isinstance(v, Tensor) else torch.as_tensor(v)
    except (TypeError, ValueError, RuntimeError) as e:
        raise MolrmogError(f"{what} must be a tensor of numbers ({e})") from None
    if t.is_complex():
        raise MolrmogError(f"{what} is complex; the mixture maths is real: pass the real part explicitly")
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                                                  torch.bool)):
        raise MolrmogError(f"{what} has unsupported dtype {t.dtype}")
    return t.to(dtype) if dtype is not None else t


def random_orthonormal(D: int, d: int, generator: torch.Generator | None = None,
                       dtype=torch.float64) -> Tensor:
    """A (D, d) matrix with orthonormal columns, uniformly distributed (QR of a Gaussian)."""
    if d > D:
        raise MolrmogError(f"cannot have d = {d} orthonormal columns in dimension D = {D}; need d <= D")
    G = torch.randn(D, d, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    return (Q * torch.sign(torch.diagonal(R))).to(dtype)


def _check_weights(p: Tensor, what: str, normalize: bool) -> Tensor:
    if p.ndim != 1 or p.numel() == 0:
        raise MolrmogError(f"{what} must be a non-empty vector, got shape {tuple(p.shape)}")
    if not torch.isfinite(p).all():
        raise MolrmogError(f"{what} contains NaN or Inf: {p.tolist()}")
    if bool((p <= 0).any()):
        raise MolrmogError(f"{what} must be strictly positive, got {p.tolist()}; drop empty components instead")
    total = float(p.sum())
    if normalize:
        return p / p.sum()
    if abs(total - 1.0) > 1e-6:
        raise MolrmogError(
            f"{what} must sum to 1, got sum {total:.8g}; pass normalize=True to rescale them on purpose"
        )
    return p


def _as_list(x, K: int, what: str) -> list:
    if isinstance(x, int):
        return [x] * K
    x = list(x)
    if len(x) != K:
        raise MolrmogError(f"{what} must be an int or a list of K = {K} values, got {len(x)} values")
    return x


def _checked_bases(A, d: list[int], dtype, orth_tol: float) -> tuple[list[Tensor] | None, int]:
    """(the K bases A_k (D, d_k) in `dtype`, D) after checking shapes, finiteness and orthonormality; A = None
    (the identity) for K = 1 gives (None, d_0)."""
    K = len(d)
    if A is None:
        if K != 1:
            raise MolrmogError(f"A = None (identity) needs K = 1, got K = {K}")
        return None, d[0]
    if len(A) != K:
        raise MolrmogError(f"A must have one matrix per subspace: K = {K} from mu, got {len(A)}")
    As = [torch.as_tensor(a).to(dtype) for a in A]
    D = As[0].shape[0]
    for k, a in enumerate(As):
        if a.ndim != 2 or a.shape != (D, d[k]):
            raise MolrmogError(f"A[{k}] must have shape (D, d_k) = ({D}, {d[k]}), got {tuple(a.shape)}")
        if not torch.isfinite(a).all():
            raise MolrmogError(f"A[{k}] contains NaN or Inf")
        a64 = a.double()
        err = torch.linalg.norm(a64.T @ a64 - torch.eye(d[k], dtype=torch.float64)).item()
        if err > orth_tol:
            raise MolrmogError(
                f"A[{k}] must have orthonormal columns: ||A^T A - I||_F = {err:.3g} > {orth_tol:g}; "
                "orthonormalise it first (torch.linalg.qr(A).Q)"
            )
    return As, D


class MoLRMoG:
    """Mixture of low-rank subspaces, each carrying a mixture of low-rank Gaussians.

    Args:
        A: K matrices (D, d_k) with orthonormal columns, or None for A = I (then K = 1).
        mu: K tensors (n_k, d_k) of latent means.
        U: K entries, each a tensor (n_k, d_k, r_k) or a list of n_k tensors (d_k, r_{k,l}).
        w: (K,) subspace weights (default uniform).
        pi: K tensors (n_k,) of mode weights (default uniform).
        schedule: noise schedule used by the t-dependent verbs ('vp', 've', 'cosine' or a Schedule).
        normalize: rescale w and pi to sum to 1 instead of rejecting them.
        orth_tol: largest accepted ||A_k^T A_k - I||_F.
    """

    def __init__(self, A: Sequence[Tensor] | None, mu: Sequence[Tensor], U: Sequence, w=None, pi=None,
                 *, schedule: str | Schedule | dict = "vp", normalize: bool = False,
                 orth_tol: float = 1e-4, dtype: torch.dtype | None = None):
        mu = [torch.as_tensor(m) for m in mu]
        K = len(mu)
        if K == 0:
            raise MolrmogError("a mixture needs at least one subspace (mu is empty)")
        dtype = dtype or mu[0].dtype
        if not dtype.is_floating_point:
            dtype = torch.float64
        if len(U) != K:
            raise MolrmogError(f"U must have one entry per subspace: K = {K} from mu, got {len(U)}")
        self.schedule = get_schedule(schedule)

        # latent dims and modes
        d, n, r = [], [], []
        for k, m in enumerate(mu):
            if m.ndim != 2 or m.shape[0] < 1:
                raise MolrmogError(f"mu[{k}] must have shape (n_k >= 1, d_k), got {tuple(m.shape)}")
            n.append(m.shape[0])
            d.append(m.shape[1])
        Us: list[list[Tensor]] = []
        for k, Uk in enumerate(U):
            Uk = list(Uk) if not isinstance(Uk, Tensor) else list(Uk.unbind(0)) if Uk.ndim == 3 else None
            if Uk is None or len(Uk) != n[k]:
                raise MolrmogError(
                    f"U[{k}] must be a tensor (n_k, d_k, r) or a list of n_k = {n[k]} tensors (d_k, r)"
                )
            for l, Ukl in enumerate(Uk):
                Ukl = torch.as_tensor(Ukl)
                if Ukl.ndim != 2 or Ukl.shape[0] != d[k] or Ukl.shape[1] > d[k]:
                    raise MolrmogError(
                        f"U[{k}][{l}] must have shape (d_k, r) with d_k = {d[k]} and 0 <= r <= d_k, "
                        f"got {tuple(Ukl.shape)}"
                    )
                Uk[l] = Ukl.to(dtype)
            Us.append(Uk)
            r.append([u.shape[1] for u in Uk])

        As, D = _checked_bases(A, d, dtype, orth_tol)
        for k, m in enumerate(mu):
            if not torch.isfinite(m).all():
                raise MolrmogError(f"mu[{k}] contains NaN or Inf")
        for k, Uk in enumerate(Us):
            for l, u in enumerate(Uk):
                if not torch.isfinite(u).all():
                    raise MolrmogError(f"U[{k}][{l}] contains NaN or Inf")

        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if w is None else torch.as_tensor(w).double()
        if w.shape != (K,):
            raise MolrmogError(f"w must have shape (K,) = ({K},), got {tuple(w.shape)}")
        w = _check_weights(w, "w (subspace weights)", normalize)
        if pi is None:
            pi = [torch.full((nk,), 1.0 / nk, dtype=torch.float64) for nk in n]
        if len(pi) != K:
            raise MolrmogError(f"pi must have one vector per subspace: K = {K}, got {len(pi)}")
        pis = []
        for k, p in enumerate(pi):
            p = torch.as_tensor(p).double()
            if p.shape != (n[k],):
                raise MolrmogError(f"pi[{k}] must have shape (n_k,) = ({n[k]},), got {tuple(p.shape)}")
            pis.append(_check_weights(p, f"pi[{k}] (mode weights)", normalize))

        self.D, self.K, self.d, self.n, self.r = D, K, d, n, r
        self.dtype = dtype
        self.mixture = self._pad(As, [m.to(dtype) for m in mu], Us, w, pis)
        self._cache: dict = {}

    # --- construction helpers ---------------------------------------------------------
    def _pad(self, As, mus, Us, w, pis) -> mx.Mixture:
        K, dm, Lm = self.K, max(self.d), max(self.n)
        rm = max(max(rk) for rk in self.r)
        dt = self.dtype
        A = None
        if As is not None:
            A = torch.zeros(K, self.D, dm, dtype=dt)
        mu = torch.zeros(K, Lm, dm, dtype=dt)
        U = torch.zeros(K, Lm, dm, rm, dtype=dt)
        log_pi = torch.full((K, Lm), -math.inf, dtype=dt)
        for k in range(K):
            dk, nk = self.d[k], self.n[k]
            if A is not None:
                A[k, :, :dk] = As[k]
            mu[k, :nk, :dk] = mus[k]
            for l in range(nk):
                U[k, l, :dk, : self.r[k][l]] = Us[k][l]
            log_pi[k, :nk] = torch.log(pis[k]).to(dt)
        return mx.Mixture(torch.log(w).to(dt), A, log_pi, mu, U)

    def _mix_for(self, x: Tensor) -> mx.Mixture:
        key = (x.dtype, x.device)
        if key not in self._cache:
            self._cache[key] = self.mixture.to(dtype=x.dtype, device=x.device)
        return self._cache[key]

    # --- parameters as lists (unpadded) -----------------------------------------------
    @property
    def weights(self) -> Tensor:
        """(K,) subspace weights w_k."""
        return self.mixture.log_w.exp()

    @property
    def mode_weights(self) -> Tensor:
        """(K, L) joint weights w_k pi_{k,l} (0 on padded modes)."""
        return self.mixture.log_weights.exp()

    def parts(self) -> dict:
        """Unpadded parameters: A (list or None), mu, U (lists of lists), w, pi."""
        m = self.mixture
        A = None if m.A is None else [m.A[k, :, : self.d[k]].clone() for k in range(self.K)]
        mu = [m.mu[k, : self.n[k], : self.d[k]].clone() for k in range(self.K)]
        U = [[m.U[k, l, : self.d[k], : self.r[k][l]].clone() for l in range(self.n[k])]
             for k in range(self.K)]
        pi = [m.log_pi[k, : self.n[k]].exp().double() for k in range(self.K)]
        return {"A": A, "mu": mu, "U": U, "w": m.log_w.exp().double(), "pi": pi}

    def component_moments(self) -> tuple[Tensor, Tensor]:
        """Ambient means (K, L, D) and covariances (K, L, D, D) of the clean components."""
        m = self.mixture
        A = m.A if m.A is not None else torch.eye(self.D, dtype=self.dtype)[None]
        mean = torch.einsum("kDd,kld->klD", A, m.mu)
        F = torch.einsum("kDd,kldr->klDr", A, m.U)
        return mean, F @ F.transpose(-1, -2)

    # --- input checks -----------------------------------------------------------------
    def _check_x(self, x: Tensor, finite: bool = True) -> Tensor:
        """x as a float32 / float64 (B, D) tensor; half precision is computed in float32 (see `_out`)."""
        x = _as_float_tensor(x, "x")
        if not x.is_floating_point():
            x = x.to(self.dtype)
        elif x.dtype not in _COMPUTE:
            x = x.float()
        if x.ndim != 2 or x.shape[1] != self.D:
            raise MolrmogError(f"x must have shape (B, D) with D = {self.D}, got {tuple(x.shape)}")
        if finite and not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).any(1).nonzero().flatten()[:5].tolist()
            raise MolrmogError(f"x contains NaN or Inf (rows {bad}...); clean the input first")
        return x

    @staticmethod
    def _out(v: Tensor, x_in) -> Tensor:
        """Results in the caller's floating dtype (half precision in, half precision out)."""
        dt = getattr(x_in, "dtype", None)
        return v.to(dt) if isinstance(x_in, Tensor) and dt.is_floating_point and dt not in _COMPUTE else v

    def _st(self, x: Tensor, t, allow_zero: bool = False):
        t = _as_float_tensor(t, "t", torch.float64).detach().cpu()
        self.schedule.check_t(t, allow_zero=allow_zero)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x.shape[0])):
            raise MolrmogError(f"t must be a scalar or have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
        return self.schedule.s_gamma(t, x)

    # --- the verbs --------------------------------------------------------------------
    def log_prob(self, x: Tensor, t: float | Tensor = 0.0, *, check: bool = True) -> Tensor:
        """log p_t(x): (B,). At t = 0 only for distributions with a density in R^D (full rank).

        Every verb validates x and t (`check=False` skips the NaN scan of x and the factorisation
        check, e.g. inside a sampler loop on a GPU, after validating once)."""
        xc = self._check_x(x, check)
        tt = _as_float_tensor(t, "t", torch.float64)
        if bool((tt == 0).all()):
            return self._out(mx.log_prob_clean(self._mix_for(xc), xc), x)
        if bool((tt == 0).any()):
            raise MolrmogError("mixing t = 0 with t > 0 in one call is not supported; split the batch")
        s, g = self._st(xc, t)
        return self._out(mx.log_prob(self._mix_for(xc), xc, s, g, check=check), x)

    def score(self, x: Tensor, t: float | Tensor, *, check: bool = True) -> Tensor:
        """grad_x log p_t(x): (B, D)."""
        xc = self._check_x(x, check)
        return self._out(mx.score(self._mix_for(xc), xc, *self._st(xc, t), check=check), x)

    def denoise(self, x: Tensor, t: float | Tensor, *, check: bool = True) -> Tensor:
        """E[x_0 | x_t = x] (Tweedie): (B, D)."""
        xc = self._check_x(x, check)
        return self._out(mx.denoise(self._mix_for(xc), xc, *self._st(xc, t), check=check), x)

    def responsibilities(self, x: Tensor, t: float | Tensor, *, check: bool = True) -> Tensor:
        """Posterior probabilities R_{k,l}(x) of each component: (B, K, max n_k), padded modes 0."""
        xc = self._check_x(x, check)
        return self._out(mx.responsibilities(self._mix_for(xc), xc, *self._st(xc, t), check=check), x)

    def posterior(self, x: Tensor, t: float | Tensor, *, check: bool = True) -> mx.Posterior:
        """log p_t, R and s E[x0|x_t] from one evaluation."""
        xc = self._check_x(x, check)
        return mx.posterior(self._mix_for(xc), xc, *self._st(xc, t), check=check)

    def mixture_for(self, x: Tensor) -> mx.Mixture:
        """The padded mixture in x's dtype and device (what the exact sampler steps with)."""
        return self._mix_for(x)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw n points: x (n, D) and labels (n, 2) = (k, l)."""
        if isinstance(n, bool) or not isinstance(n, Integral) or not 1 <= int(n) <= 10**8:
            raise MolrmogError(f"n must be a whole number of samples in [1, 1e8], got {n!r}")
        m = self.mixture
        probs = m.log_weights.exp().flatten().double()
        idx = torch.multinomial(probs, int(n), replacement=True, generator=generator)
        k, l = idx // m.L, idx % m.L
        eps = torch.randn(int(n), m.r, generator=generator, dtype=torch.float64).to(self.dtype)
        z = m.mu[k, l] + torch.einsum("ndr,nr->nd", m.U[k, l], eps)  # (n, d)
        c = torch.zeros(m.K, int(n), m.d, dtype=self.dtype)
        c[k, torch.arange(int(n))] = z
        return mx.decode_components(m, c), torch.stack([k, l], 1)

    def noise(self, x0: Tensor, t, generator: torch.Generator | None = None) -> Tensor:
        """x_t = s_t x_0 + gamma_t eps."""
        x0 = self._check_x(x0)
        s, g = self._st(x0, t)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        sv = s if s.ndim == 0 else s[:, None]
        gv = g if g.ndim == 0 else g[:, None]
        return sv * x0 + gv * eps

    # --- constructors -----------------------------------------------------------------
    @classmethod
    def random(cls, D: int, K: int, d: int | Sequence[int], n: int | Sequence[int] = 2,
               r: int | Sequence[int] | None = None, *, separation: float = 4.0, scale: float = 1.0,
               w=None, seed: int = 0, dtype=torch.float64, schedule="vp") -> MoLRMoG:
        """A random MoLR-MoG: uniform random subspaces, means of norm ~separation, factors of scale ~scale.

        separation: typical norm of the latent means mu_{k,l} (pairwise distance ~ separation * sqrt 2),
            in units of the component standard deviation along each factor direction (~scale).
        r: rank of every U_{k,l} (default d_k: full rank in the latent).
        """
        _check_dims(D, K, d, n, r)
        g = torch.Generator().manual_seed(seed)
        d, n = _as_list(d, K, "d"), _as_list(n, K, "n")
        r = _as_list(d if r is None else r, K, "r")
        A = [random_orthonormal(D, d[k], g) for k in range(K)]
        mu = [separation * torch.randn(n[k], d[k], generator=g, dtype=torch.float64) / math.sqrt(d[k])
              for k in range(K)]
        U = [scale * torch.randn(n[k], d[k], r[k], generator=g, dtype=torch.float64) / math.sqrt(d[k])
             for k in range(K)]
        return MoLRMoG(A, mu, U, w=w, schedule=schedule, dtype=dtype)

    # --- save / load ------------------------------------------------------------------
    def config(self) -> dict:
        return {**header(self), "D": self.D, "K": self.K, "d": self.d, "n": self.n, "r": self.r,
                "identity_A": self.mixture.A is None, "dtype": str(self.dtype).removeprefix("torch."),
                "schedule": self.schedule.config()}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write config.json and the parameters (diffusion_pytorch_model.safetensors) into directory (created;
        files replaced atomically, config.json last)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        m = self.mixture
        tensors = {"log_w": m.log_w, "log_pi": m.log_pi, "mu": m.mu, "U": m.U}
        if m.A is not None:
            tensors["A"] = m.A
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        atomic_write(directory / WEIGHTS, lambda p: save_file(tensors, p))
        write_json(directory / "config.json", self.config())
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> MoLRMoG:
        return load_distribution(directory)


class MoLRG(MoLRMoG):
    """Mixture of low-rank Gaussians: one zero-mean Gaussian N(0, A_k U_k U_k^T A_k^T) per subspace."""

    def __init__(self, A: Sequence[Tensor], U: Sequence[Tensor] | None = None, w=None, **kwargs):
        A = [_as_float_tensor(a, f"A[{k}]") for k, a in enumerate(A)]
        for k, a in enumerate(A):
            if a.ndim != 2:
                raise MolrmogError(f"A[{k}] must be a matrix (D, d_k) with orthonormal columns, got shape "
                                   f"{tuple(a.shape)}")
        if U is None:  # isotropic unit covariance in each subspace
            U = [torch.eye(a.shape[1], dtype=a.dtype) for a in A]
        if len(U) != len(A):
            raise MolrmogError(f"U must have one factor per subspace: K = {len(A)}, got {len(U)}")
        mu = [torch.zeros(1, a.shape[1], dtype=a.dtype) for a in A]
        super().__init__(A, mu, [[torch.as_tensor(u)] for u in U], w=w, **kwargs)

    @classmethod
    def random(cls, D: int, K: int, d: int | Sequence[int], r: int | Sequence[int] | None = None, *,
               scale: float = 1.0, w=None, seed: int = 0, dtype=torch.float64, schedule="vp") -> MoLRG:
        """Random subspaces; U_k = scale * I (r = d) or a random (d_k, r_k) factor when r is given."""
        _check_dims(D, K, d, 1, r)
        g = torch.Generator().manual_seed(seed)
        d = _as_list(d, K, "d")
        A = [random_orthonormal(D, d[k], g) for k in range(K)]
        if r is None:
            U = [scale * torch.eye(d[k], dtype=torch.float64) for k in range(K)]
        else:
            r = _as_list(r, K, "r")
            U = [scale * torch.randn(d[k], r[k], generator=g, dtype=torch.float64) / math.sqrt(d[k])
                 for k in range(K)]
        return cls(A, U, w=w, schedule=schedule, dtype=dtype)


class GaussianMixture(MoLRMoG):
    """A Gaussian mixture in R^D (K = 1, A = I): sum_l pi_l N(mu_l, U_l U_l^T)."""

    def __init__(self, mu: Tensor, U: Tensor | Sequence[Tensor], pi=None, **kwargs):
        mu = torch.as_tensor(mu)
        super().__init__(None, [mu], [U], pi=None if pi is None else [pi], **kwargs)

    @classmethod
    def empirical(cls, points: Tensor, **kwargs) -> GaussianMixture:
        """The empirical distribution of `points` (N, D): N equally weighted rank-0 (point-mass)
        components. Its denoiser is the optimal denoiser of the training set -- the memorisation
        regime: the probability-flow ODE ends on training points."""
        points = torch.as_tensor(points)
        if points.ndim != 2 or points.shape[0] < 1:
            raise MolrmogError(f"points must have shape (N >= 1, D), got {tuple(points.shape)}")
        return cls(points, points.new_zeros(points.shape[0], points.shape[1], 0), **kwargs)

    @classmethod
    def random(cls, D: int, n: int = 3, r: int | None = None, *, separation: float = 4.0,
               scale: float = 1.0, pi=None, seed: int = 0, dtype=torch.float64,
               schedule="vp") -> GaussianMixture:
        _check_dims(D, 1, D, n, r)
        g = torch.Generator().manual_seed(seed)
        r = D if r is None else r
        mu = separation * torch.randn(n, D, generator=g, dtype=torch.float64) / math.sqrt(D)
        U = scale * torch.randn(n, D, r, generator=g, dtype=torch.float64) / math.sqrt(D)
        return cls(mu, U, pi=pi, schedule=schedule, dtype=dtype)


def _check_dims(D, K, d, n, r) -> None:
    if int(K) < 1:
        raise MolrmogError(f"K (number of subspaces) must be >= 1, got {K}")
    for name, v in (("d", d), ("n", n), ("r", r)):
        if v is None:
            continue
        vals = [v] if isinstance(v, int) else list(v)
        if any(int(x) < 1 for x in vals):
            raise MolrmogError(f"{name} must be >= 1, got {v}")
    dl = [d] * K if isinstance(d, int) else list(d)
    if any(x > D for x in dl):
        raise MolrmogError(f"latent dimensions d = {d} must not exceed the ambient D = {D}")
    if r is not None:
        rl = [r] * len(dl) if isinstance(r, int) else list(r)
        if len(rl) == len(dl) and any(a > b for a, b in zip(rl, dl, strict=True)):
            raise MolrmogError(f"rank r = {r} must not exceed the latent dimension d = {d}")


_CLASSES = {"MoLRMoG": MoLRMoG, "MoLRG": MoLRG, "GaussianMixture": GaussianMixture}


def _int_list(v, what: str, length: int | None = None) -> list:
    if not isinstance(v, list) or (length is not None and len(v) != length) or \
            not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise MolrmogError(f"{what} must be a list of {length or ''} non-negative integers, got {v!r}")
    return v


def _legacy(cfg, source: Path) -> tuple[dict, Path]:
    """(config in today's keys, parameter file): molrmog 0.2's distribution format 1 is read as it was."""
    if not isinstance(cfg, dict) or "_class_name" in cfg or "class" not in cfg:
        return cfg, source.parent / WEIGHTS
    if cfg.get("format_version") != LEGACY_FORMAT:
        raise ArtefactError(f"{source}: distribution format {cfg.get('format_version')!r} is not one this molrmog "
                            f"reads ({ARTEFACT_FORMAT}, or {LEGACY_FORMAT} of molrmog 0.2); save it again")
    rest = {k: v for k, v in cfg.items() if k not in ("class", "format_version")}
    params = source.parent / "params.safetensors"
    return {"_class_name": cfg["class"], "_molrmog_format": ARTEFACT_FORMAT, **rest}, params


def load_distribution(directory: str | os.PathLike) -> MoLRMoG:
    """Rebuild a distribution saved with `save` (its class comes from config.json). Any damage --
    unknown class or format version, missing keys, wrong types or shapes -- is one ArtefactError."""
    directory = Path(directory)
    source = directory / "config.json"
    cfg, params = _legacy(read_json(source, "distribution config"), source)
    cls = check_header(cfg, source, "distribution", _CLASSES, MoLRMoG)
    t = read_safetensors(params, "distribution parameters")
    check_tensors({k: v for k, v in t.items() if k != "log_pi"}, params, "distributions")  # log 0 pads ragged n_k
    try:
        missing = [k for k in ("K", "d", "n", "r", "identity_A", "dtype", "schedule") if k not in cfg]
        if missing:
            raise MolrmogError(f"lacks the key(s) {missing}")
        K = cfg["K"]
        if not isinstance(K, int) or K < 1:
            raise MolrmogError(f"K must be a positive integer, got {K!r}")
        d, n = _int_list(cfg["d"], "d", K), _int_list(cfg["n"], "n", K)
        r = cfg["r"]
        if not isinstance(r, list) or len(r) != K:
            raise MolrmogError(f"r must hold one list per subspace, got {r!r}")
        r = [_int_list(rk, f"r[{k}]", n[k]) for k, rk in enumerate(r)]
        dtype = getattr(torch, str(cfg["dtype"]), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise MolrmogError(f"dtype {cfg['dtype']!r} is not a torch floating dtype")
        L, dm, rm = max(n), max(d), max(max(x) for x in r) if any(r) else 0
        shapes = {"log_w": (K,), "log_pi": (K, L), "mu": (K, L, dm), "U": (K, L, dm, rm)}
        if not cfg["identity_A"]:
            shapes["A"] = (K, t["A"].shape[1] if "A" in t and t["A"].ndim == 3 else -1, dm)
        for key, shape in shapes.items():
            if key not in t or tuple(t[key].shape) != shape:
                raise MolrmogError(f"{params.name}: {key} must have shape {shape}, got "
                                   f"{tuple(t[key].shape) if key in t else 'nothing'}")
        A = None if cfg["identity_A"] else [t["A"][k, :, : d[k]] for k in range(K)]
        mu = [t["mu"][k, : n[k], : d[k]] for k in range(K)]
        U = [[t["U"][k, l, : d[k], : r[k][l]] for l in range(n[k])] for k in range(K)]
        w = t["log_w"].double().exp()
        pi = [t["log_pi"][k, : n[k]].double().exp() for k in range(K)]
        obj = MoLRMoG.__new__(cls)
        MoLRMoG.__init__(obj, A, mu, U, w=w, pi=pi, schedule=cfg["schedule"], normalize=True, dtype=dtype)
    except MolrmogError as e:
        raise ArtefactError(f"{source}: {e}; restore the files or save the distribution again") from None
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise ArtefactError(f"{source}: the saved distribution is damaged ({type(e).__name__}: {e}); restore the "
                            f"files or save it again") from None
    return obj
