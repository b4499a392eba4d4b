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

import math
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
from torch import Tensor

from .errors import MolrmogError, NumericalError

__all__ = ["Mixture", "Posterior", "posterior", "log_prob", "score", "denoise", "responsibilities"]

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


def _decode(mix: Mixture, c: Tensor) -> Tensor:
    """sum_k A_k c_k: (K, B, d) -> (B, D). One GEMM (B x K d) @ (K d x D)."""
    if mix.A is None:
        return c[0]
    K, D, d = mix.A.shape
    return c.transpose(0, 1).reshape(c.shape[1], K * d) @ mix.A.permute(0, 2, 1).reshape(K * d, D)


def _capacitance(mix: Mixture, sigma2: Tensor) -> tuple[Tensor, Tensor]:
    """Cholesky factor C of M = sigma^2 I_r + U^T U and log det(I_r + U^T U / sigma^2).

    sigma2 of shape () gives (K, L, r, r) and (K, L); of shape (B,) gives (B, K, L, r, r), (B, K, L).
    """
    UtU = mix.U.transpose(-1, -2) @ mix.U  # (K, L, r, r)
    eye = torch.eye(mix.r, dtype=UtU.dtype, device=UtU.device)
    s2 = sigma2 if sigma2.ndim == 0 else sigma2[:, None, None, None, None]
    chol, info = torch.linalg.cholesky_ex(s2 * eye + UtU)
    if bool((info != 0).any()):
        raise NumericalError(
            "capacitance matrix sigma^2 I + U^T U is not positive definite at this t "
            "(sigma too small for the dtype, or non-finite U); use float64 or a larger t_min"
        )
    logdet_M = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    logdet = logdet_M - mix.r * torch.log(sigma2 if sigma2.ndim == 0 else sigma2[:, None, None])
    return chol, logdet


# Rows per evaluation block: keeps the (K, B, r + 1, L) working arrays near 8 MB (cache and
# allocator friendly); blocks are independent, so this changes no result.
BLOCK_ELEMENTS = 2**21


def posterior(mix: Mixture, x: Tensor, s: Tensor | float, gamma: Tensor | float) -> Posterior:
    """One batched evaluation of the noised mixture at x (B, D), scale s and noise gamma > 0.

    s and gamma are scalars or per-sample (B,) tensors. Internally (K, B, L)-major so that
    every product is one batched GEMM over k; no Python loop over k or l. Large batches are
    evaluated in row blocks.
    """
    s, gamma = _per_sample(s, x), _per_sample(gamma, x)
    if bool((gamma <= 0).any()):
        raise MolrmogError("gamma_t must be > 0 for the noised mixture; use t > 0")
    rows = max(64, BLOCK_ELEMENTS // (mix.K * mix.L * (mix.r + 1)))
    if x.shape[0] <= rows:
        return _posterior_block(mix, x, s, gamma)
    parts = [
        _posterior_block(mix, x[i : i + rows], s if s.ndim == 0 else s[i : i + rows],
                         gamma if gamma.ndim == 0 else gamma[i : i + rows])
        for i in range(0, x.shape[0], rows)
    ]
    return Posterior(*(torch.cat(p) for p in zip(*parts, strict=True)))


def _posterior_block(mix: Mixture, x: Tensor, s: Tensor, gamma: Tensor) -> Posterior:
    sigma2 = (gamma / s) ** 2
    per_sample = sigma2.ndim == 1
    sk, g2k = _kb(s), _kb(gamma**2)
    mu, U = mix.mu, mix.U
    K, L, d, r = U.shape
    B = x.shape[0]

    z = _encode(mix, x)  # (K, B, d)
    chol, logdet = _capacitance(mix, sigma2)
    if per_sample:
        F = U
    else:  # whitened factor F = U C^{-T}: U M^{-1} U^T = F F^T
        F = torch.linalg.solve_triangular(chol, U.transpose(-1, -2), upper=False).transpose(-1, -2)

    # P = [[F | mu], [F^T mu | ||mu||^2 / 2]] per k, columns ordered (r + 1, L): (K, d + 1, (r + 1) L).
    # One bmm of [z, -s] with P gives proj = F^T v (v = z - s mu) and zmu = z.mu - s ||mu||^2 / 2.
    top = torch.cat([F, mu[..., None]], -1).permute(0, 2, 3, 1)  # (K, d, r + 1, L)
    bottom = torch.cat([(F * mu[..., None]).sum(2), 0.5 * (mu * mu).sum(-1, keepdim=True)], -1)
    P = torch.cat([top, bottom.permute(0, 2, 1)[:, None]], 1).reshape(K, d + 1, (r + 1) * L)
    P = P.transpose(1, 2).contiguous().transpose(1, 2)  # column-major per k: faster bmm for thin z
    minus_s = (-s).expand(B) if s.ndim == 0 else -s
    z1 = torch.cat([z, minus_s[None, :, None].expand(K, B, 1)], -1)
    Zp = torch.bmm(z1, P).view(K, B, r + 1, L)
    proj, zmu = Zp[:, :, :r], Zp[:, :, r]
    if per_sample:  # a = M^{-1} U^T v with a per-sample capacitance
        a = torch.einsum("bklrq,kbql->kbrl", torch.cholesky_inverse(chol), proj)
        vMv = (proj * a).sum(2)
        logdet = logdet.transpose(0, 1)
    else:
        a = proj
        vMv = proj.square().sum(2)
        logdet = logdet[:, None]

    # log N_{k,l}(x) (design notes, section 2) with ||x - A A^T x||^2 + ||v||^2 = ||x||^2 - 2 s zmu:
    # log N = -||x||^2 / (2 gamma^2) + (s zmu + vMv / 2) / gamma^2 - (D log(2 pi gamma^2) + logdet) / 2.
    # The first term is the same for every (k, l), so it is added to log p only.
    logits = (mix.log_weights[:, None] - 0.5 * (mix.D * (LOG_2PI + torch.log(g2k)) + logdet)
              + (sk * zmu + 0.5 * vMv) / g2k)  # (K, B, L)
    lse = torch.logsumexp(logits, dim=(0, 2))
    log_p = lse - 0.5 * (x * x).sum(-1) / (gamma**2)
    R = torch.exp(logits - lse[None, :, None])

    # c_k = sum_l R_kl (s mu_kl + U_kl M^{-1} U_kl^T v_kl) = [R a | s R] @ [F | mu]^T;  m = sum_k A_k c_k
    if per_sample:
        G = torch.cat([a * R[:, :, None], (sk * R)[:, :, None]], 2)
    else:  # a = Zp[:, :, :r]: write [R a | s R] over Zp's layout without a concatenation
        G = Zp * R[:, :, None]
        G[:, :, r] = sk * R
    c = torch.bmm(G.view(K, B, (r + 1) * L), P[:, :d].transpose(1, 2))
    return Posterior(log_p, R.permute(1, 0, 2), _decode(mix, c))


def log_prob(mix: Mixture, x: Tensor, s, gamma) -> Tensor:
    """log p_t(x): (B,)."""
    return posterior(mix, x, s, gamma).log_p


def responsibilities(mix: Mixture, x: Tensor, s, gamma) -> Tensor:
    """R_{k,l}(x): (B, K, L), padded modes 0."""
    return posterior(mix, x, s, gamma).R


def denoise(mix: Mixture, x: Tensor, s, gamma) -> Tensor:
    """Tweedie: E[x_0 | x_t = x] = (x + gamma^2 score)/s: (B, D)."""
    s = _per_sample(s, x)
    m = posterior(mix, x, s, gamma).m
    return m / (s if s.ndim == 0 else s[:, None])


def score(mix: Mixture, x: Tensor, s, gamma) -> Tensor:
    """grad_x log p_t(x) = -(1/gamma^2) sum R_{k,l} delta_{k,l}(x) = (s E[x0|x_t] - x)/gamma^2: (B, D)."""
    g = _per_sample(gamma, x)
    m = posterior(mix, x, s, g).m
    return (m - x) / (g**2 if g.ndim == 0 else (g**2)[:, None])


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
