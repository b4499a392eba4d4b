"""The closed-form start of MoG experts: EM for a mixture of probabilistic PCA (Tipping and Bishop, Neural
Computation 11, 1999), and the choice of modes and rank by held-out log-likelihood.

A cluster's latents under one subspace with n modes of rank r and a small isotropic floor are a mixture of
PPCA, z ~ sum_l pi_l N(mu_l, W_l W_l^T + s_l^2 I) (design notes, "Closed-form start for MoG experts"):

- E-step: R_il proportional to pi_l N(z_i; mu_l, W_l W_l^T + s_l^2 I) (`mixture.lowrank_log_density`:
  Woodbury and the determinant lemma; logsumexp);
- M-step: pi_l = mean_i R_il, mu_l = sum_i R_il z_i / sum_i R_il, S_l the R-weighted covariance; with
  S_l = sum_j lambda_j e_j e_j^T (descending), s_l^2 = mean(lambda_{r+1..d}) and
  W_l = [e_1..e_r] diag(sqrt(max(lambda_j - s_l^2, 0)));
- start from k-means++ clusters; stop when the mean log-likelihood changes by less than `tol` (relative).

The expert's U_l starts at W_l. The floor s_l^2 is what a clean low-rank law gains at a small time t
(s_l^2 = gamma_t^2 / s_t^2 at an equivalent t), so the report gives it beside the DSM result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from molrmog.core.errors import MolrmogError
from molrmog.core.mixture import lowrank_log_density

__all__ = ["MPPCA", "fit_mppca", "select_mppca", "mppca_parameters"]


@dataclass
class MPPCA:
    """A fitted mixture of PPCA: pi (L,), mu (L, d), W (L, d, r), s2 (L,); the mean log-likelihood per point
    of the data it was fitted on, and the EM iterations taken."""

    pi: Tensor
    mu: Tensor
    W: Tensor
    s2: Tensor
    loglik: float
    iterations: int

    def log_likelihood(self, z: Tensor) -> float:
        """Mean log-density of points z (N, d) under the fitted mixture."""
        z = z.to(self.mu.dtype)
        lp = lowrank_log_density(z, self.mu, self.W, self.s2) + torch.log(self.pi)[None]
        return float(torch.logsumexp(lp, 1).mean())


def mppca_parameters(d: int, n: int, r: int, learn_means: bool = True) -> int:
    """Parameters of the MoG expert this fit initialises: n (d r + d + 1) (factors, means, weights)."""
    return n * (d * r + (d + 1 if learn_means else 0))


def _m_step(z: Tensor, R: Tensor, r: int, zero_mean: bool, floor: float):
    Nl = R.sum(0).clamp_min(1e-10)  # (L,)
    pi = Nl / Nl.sum()
    mu = torch.zeros(R.shape[1], z.shape[1], dtype=z.dtype) if zero_mean else (R.T @ z) / Nl[:, None]
    # S_l = sum_i R_il (z_i - mu_l)(z_i - mu_l)^T / N_l, one GEMM per mode: (L, d, d)
    Zc = (z[None] - mu[:, None]) * torch.sqrt(R.T)[:, :, None]
    S = Zc.transpose(1, 2) @ Zc / Nl[:, None, None]
    lam, E = torch.linalg.eigh(S)  # ascending
    lam, E = lam.flip(-1).clamp_min(0), E.flip(-1)
    d = z.shape[1]
    s2 = lam[:, r:].mean(1) if r < d else torch.zeros(R.shape[1], dtype=z.dtype)
    s2 = s2.clamp_min(floor)
    W = E[:, :, :r] * torch.sqrt((lam[:, :r] - s2[:, None]).clamp_min(0))[:, None, :]
    return pi, mu, W, s2


def fit_mppca(z: Tensor, n: int, r: int, *, zero_mean: bool = False, seed: int = 0, max_iter: int = 100,
              tol: float = 1e-5, floor: float | None = None) -> MPPCA:
    """EM for a mixture of n PPCA components of rank r on z (N, d) (float64 internally); see the module
    docstring. `zero_mean` fixes every mu_l = 0 (the Gaussian expert); `floor` bounds s_l^2 from below
    (default 1e-6 of the mean variance)."""
    z = torch.as_tensor(z).detach().double().cpu()
    if z.ndim != 2 or z.shape[0] < 2:
        raise MolrmogError(f"EM needs data of shape (N >= 2, d), got {tuple(z.shape)}")
    N, d = z.shape
    if not 1 <= r <= d or n < 1:
        raise MolrmogError(f"EM needs n >= 1 modes and a rank 1 <= r <= d = {d}, got n = {n}, r = {r}")
    if not torch.isfinite(z).all():
        raise MolrmogError("EM data contains NaN or Inf")
    floor = float(1e-6 * z.var(0).mean().clamp_min(1e-12)) if floor is None else floor
    n_eff = min(n, N)
    if n_eff > 1 and not zero_mean:
        from sklearn.cluster import KMeans

        labels = KMeans(n_clusters=n_eff, init="k-means++", n_init=4, random_state=seed).fit(z.numpy()).labels_
    else:
        labels = np.zeros(N, dtype=int)
    R = torch.zeros(N, n, dtype=torch.float64)
    R[torch.arange(N), torch.as_tensor(labels)] = 1.0
    if n_eff < n:  # more modes than points: the extra ones start as copies, with tiny weight
        R[:, n_eff:] = 1e-6
    pi, mu, W, s2 = _m_step(z, R, r, zero_mean, floor)
    prev, it = -math.inf, 0
    while it < max_iter:
        it += 1
        lp = lowrank_log_density(z, mu, W, s2) + torch.log(pi.clamp_min(1e-300))[None]  # E-step
        lse = torch.logsumexp(lp, 1)
        loglik = float(lse.mean())
        R = torch.exp(lp - lse[:, None])
        pi, mu, W, s2 = _m_step(z, R, r, zero_mean, floor)  # M-step
        if abs(loglik - prev) <= tol * abs(loglik):
            break
        prev = loglik
    fit = MPPCA(pi.clamp_min(1e-12) / pi.clamp_min(1e-12).sum(), mu, W, s2, 0.0, it)
    fit.loglik = fit.log_likelihood(z)
    return fit


def select_mppca(z: Tensor, modes, ranks, *, zero_mean: bool = False, param_cap: int | None = None,
                 seed: int = 0, holdout: float = 0.2, max_iter: int = 30, extra: tuple[int, int] = (0, 0)) -> dict:
    """Choose (modes, rank) by held-out mean log-likelihood: fit on a random (1 - holdout) of z, score the rest.
    A coordinate search -- the rank at the middle mode count, then the mode count at that rank -- over the
    candidates whose expert stays within `param_cap` parameters (`mppca_parameters` plus extra = (a, b): a + b n
    more, e.g. a per-coordinate floor). Returns the choice and every candidate's score."""
    z = torch.as_tensor(z).detach().double().cpu()
    N, d = z.shape
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=g)
    n_test = max(1, int(round(holdout * N)))
    test, train = z[perm[:n_test]], z[perm[n_test:]]
    if train.shape[0] < 2:
        raise MolrmogError(f"choosing modes and rank needs more than {N} latents in a cluster; give --mog-modes and "
                           f"--mog-rank as numbers")
    fits: dict = {}

    def size(n, r):
        return mppca_parameters(d, n, r, not zero_mean) + extra[0] + extra[1] * n

    def score(n, r):
        if (n, r) not in fits:
            fit = fit_mppca(train, n, r, zero_mean=zero_mean, seed=seed, max_iter=max_iter)
            fits[n, r] = fit.log_likelihood(test)
        return fits[n, r]

    def ok(n, r):
        return r <= d and n <= train.shape[0] and (param_cap is None or
                                                  size(n, r) <= param_cap)

    modes, ranks = sorted(set(modes)), sorted(set(ranks))
    smallest = size(modes[0], min(ranks[0], d))
    if param_cap is not None and smallest > param_cap:
        raise MolrmogError(f"param_cap {param_cap} is below the smallest candidate expert ({modes[0]} modes of rank "
                           f"{min(ranks[0], d)}: {smallest} parameters in d = {d}); raise param_cap or give modes "
                           f"and rank as numbers")
    n_mid = modes[len(modes) // 2]
    cand_r = [r for r in ranks if ok(n_mid, r)] or [min(ranks)]
    r_best = max(cand_r, key=lambda r: score(n_mid, r))
    cand_n = [n for n in modes if ok(n, r_best)] or [min(modes)]
    n_best = max(cand_n, key=lambda n: score(n, r_best))
    return {"modes": n_best, "rank": r_best, "heldout_loglik": fits[n_best, r_best],
            "parameters": size(n_best, r_best),
            "candidates": [{"modes": n, "rank": r, "heldout_loglik": v} for (n, r), v in sorted(fits.items())]}
