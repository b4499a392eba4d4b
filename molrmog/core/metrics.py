"""Distances between samples and distributions.

Synthetic data: energy distance, sliced W2, mode-weight error, subspace distance, score error.
Images, on features of a `Featurizer` (or any embedding, shape (N, F)): FID and KID
(torchmetrics, with the features passed through an identity feature module), k-NN
precision / recall, class score, and the similarity scores of the memorisation /
generalisation literature (reproducibility, generalisation, probability-flow distance).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from molrmog.core.errors import MolrmogError

__all__ = ["energy_distance", "sliced_w2", "mode_weight_error", "subspace_distance", "score_error",
           "fid", "kid", "precision_recall", "class_score", "cosine_similarity", "reproducibility_score",
           "generalisation_score", "pf_distance"]


def _check_pair(x: Tensor, y: Tensor) -> None:
    for name, v in (("x", x), ("y", y)):
        if v.ndim != 2:
            raise MolrmogError(f"{name} must have shape (N, D), got {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise MolrmogError(f"{name} contains NaN or Inf")
    if x.shape[1] != y.shape[1]:
        raise MolrmogError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")


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


# --- image metrics on features ------------------------------------------------------------


def _check_features(name: str, f: Tensor, min_rows: int = 2) -> Tensor:
    if not isinstance(f, Tensor) or f.ndim != 2:
        shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise MolrmogError(f"{name} must be a feature matrix of shape (N, F), got {shape}; embed images "
                         f"with Featurizer.embed first")
    if f.shape[0] < min_rows:
        raise MolrmogError(f"{name} needs at least {min_rows} rows, got {f.shape[0]}")
    if not torch.isfinite(f).all():
        raise MolrmogError(f"{name} contains NaN or Inf (did sampling diverge?)")
    return f.double().cpu()


def _check_features_pair(a: Tensor, b: Tensor, names=("real", "fake"), min_rows: int = 2):
    a, b = _check_features(names[0], a, min_rows), _check_features(names[1], b, min_rows)
    if a.shape[1] != b.shape[1]:
        raise MolrmogError(f"{names[0]} and {names[1]} features differ in width: {a.shape[1]} vs {b.shape[1]}")
    return a, b


class _Features(nn.Module):
    """Identity 'feature extractor': hands precomputed features to torchmetrics."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def fid(real: Tensor, fake: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (torchmetrics, float64)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _check_features_pair(real, fake)
    m = FrechetInceptionDistance(feature=_Features(real.shape[1])).double()
    m.update(real, real=True)
    m.update(fake, real=False)
    return float(m.compute())


def kid(real: Tensor, fake: Tensor, subsets: int = 50, subset_size: int = 1000, seed: int = 0) -> dict:
    """Kernel distance (unbiased MMD^2, cubic polynomial kernel) averaged over random subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _check_features_pair(real, fake)
    size = min(subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():  # "will save all extracted features": that is what we pass it
        warnings.simplefilter("ignore", UserWarning)
        m = KernelInceptionDistance(feature=_Features(real.shape[1]), subsets=subsets, subset_size=size)
    m.update(real, real=True)
    m.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from the global RNG
        torch.manual_seed(seed)
        mean, std = m.compute()
    return {"mean": float(mean), "std": float(std)}


def _kth_radius(f: Tensor, k: int) -> Tensor:
    d = torch.cdist(f, f)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> dict:
    """k-NN manifold precision and recall (Kynkaanniemi et al. 2019).

    precision: fraction of fake points inside some real point's k-NN ball;
    recall: fraction of real points inside some fake point's k-NN ball.
    """
    real, fake = _check_features_pair(real, fake, min_rows=k + 1)
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    d = torch.cdist(fake, real)  # (n_fake, n_real)
    precision = (d <= r_real[None, :]).any(1).double().mean()
    recall = (d.T <= r_fake[None, :]).any(1).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


def class_score(probs: Tensor, intended: Tensor) -> float:
    """Mean classifier probability of the intended class (offline counterpart of a CLIP score)."""
    if probs.ndim != 2 or intended.ndim != 1 or probs.shape[0] != intended.shape[0]:
        raise MolrmogError(f"probs must be (N, classes) and intended (N,), got {tuple(probs.shape)} and "
                         f"{tuple(intended.shape)}")
    if not torch.isfinite(probs).all():
        raise MolrmogError("probs contains NaN or Inf")
    if intended.min() < 0 or intended.max() >= probs.shape[1]:
        raise MolrmogError(f"intended classes must lie in 0..{probs.shape[1] - 1}")
    return float(probs.double().gather(1, intended.long()[:, None]).mean())


def cosine_similarity(a: Tensor, b: Tensor, center: Tensor | None = None) -> Tensor:
    """All-pairs cosine similarity (N_a, N_b), optionally after subtracting `center` from both."""
    a, b = _check_features_pair(a, b, ("a", "b"), min_rows=1)
    if center is not None:
        a, b = a - center.double(), b - center.double()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def reproducibility_score(a: Tensor, b: Tensor, threshold: float = 0.6, center: Tensor | None = None) -> dict:
    """Two models sampled from the same noise, row i of a and b from noise i: the fraction of pairs
    whose feature cosine similarity exceeds `threshold`, and the mean similarity."""
    a, b = _check_features_pair(a, b, ("a", "b"), min_rows=1)
    if a.shape[0] != b.shape[0]:
        raise MolrmogError(f"paired samples must have the same count, got {a.shape[0]} and {b.shape[0]}")
    if center is not None:
        a, b = a - center.double(), b - center.double()
    sim = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return {"score": float((sim > threshold).double().mean()), "mean_similarity": float(sim.mean())}


def generalisation_score(samples: Tensor, train: Tensor, threshold: float = 0.6,
                         center: Tensor | None = None) -> dict:
    """Fraction of samples whose most similar training image has cosine similarity <= `threshold`
    (1: nothing copied; 0: every sample is a near copy), and the mean nearest-neighbour similarity."""
    nn_sim = torch.cat([cosine_similarity(s, train, center).max(1).values for s in samples.split(256)])
    return {"score": float((nn_sim <= threshold).double().mean()), "mean_nn_similarity": float(nn_sim.mean())}


def pf_distance(a: Tensor, b: Tensor) -> float:
    """RMS feature distance between paired probability-flow outputs of two models (shared noise)."""
    a, b = _check_features_pair(a, b, ("a", "b"), min_rows=1)
    if a.shape[0] != b.shape[0]:
        raise MolrmogError(f"paired samples must have the same count, got {a.shape[0]} and {b.shape[0]}")
    return float(((a - b) ** 2).sum(1).mean().sqrt())
