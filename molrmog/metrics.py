"""Distances between samples and distributions (synthetic-data metrics)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["energy_distance", "sliced_w2", "mode_weight_error", "subspace_distance", "score_error"]


def _check_pair(x: Tensor, y: Tensor) -> None:
    for name, v in (("x", x), ("y", y)):
        if v.ndim != 2:
            raise ValueError(f"{name} must have shape (N, D), got {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise ValueError(f"{name} contains NaN or Inf")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Squared energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic; >= 0, 0 iff equal laws)."""
    _check_pair(x, y)
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def sliced_w2(x: Tensor, y: Tensor, n_proj: int = 256, generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance over n_proj random directions (quantile matching on each)."""
    _check_pair(x, y)
    x, y = x.double(), y.double()
    theta = torch.randn(x.shape[1], n_proj, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(0).values, (y @ theta).sort(0).values
    q = torch.linspace(0, 1, max(x.shape[0], y.shape[0]), dtype=torch.float64)
    ix = (q * (x.shape[0] - 1)).round().long()
    iy = (q * (y.shape[0] - 1)).round().long()
    return float(((px[ix] - py[iy]) ** 2).mean().sqrt())


def mode_weight_error(labels: Tensor, weights: Tensor) -> dict:
    """Compare the empirical frequency of flat component labels (N,) with target weights (C,).

    Returns max absolute error, total variation, and the largest error in standard errors.
    """
    weights = weights.double().flatten()
    counts = torch.bincount(labels.flatten(), minlength=weights.numel()).double()
    freq = counts / counts.sum()
    se = (weights * (1 - weights) / counts.sum()).sqrt().clamp_min(1e-12)
    err = (freq - weights).abs()
    return {"max_abs": float(err.max()), "total_variation": float(0.5 * err.sum()),
            "max_z": float((err / se)[weights > 0].max()), "freq": freq.tolist()}


def subspace_distance(U: Tensor, V: Tensor) -> float:
    """||U U^T - V V^T||_F for matrices with orthonormal columns (D, d)."""
    return float(torch.linalg.norm(U @ U.T - V @ V.T))


def score_error(score_fn, true_score_fn, x: Tensor, t: Tensor, gamma: Tensor) -> float:
    """E gamma_t^2 ||s_theta(x_t, t) - grad log p_t(x_t)||^2; x (B, D), t and gamma (B,)."""
    diff = score_fn(x, t) - true_score_fn(x, t)
    return float((gamma.reshape(-1) ** 2 * (diff**2).sum(-1)).mean())
