"""Small helpers shared by the experiments: slopes, embedded synthetic truths (output writers:
`molrmog.core.outputs`)."""

from __future__ import annotations

import math

import numpy as np
import torch

from molrmog.core.distributions import MoLRMoG, random_orthonormal
from molrmog.core.outputs import out_dir, pyplot, save_figure, write_csv, write_json

__all__ = ["loglog_slope", "embedded_molrmog", "out_dir", "pyplot", "save_figure", "write_csv", "write_json"]


def loglog_slope(x, y) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    return float(np.polyfit(lx, ly, 1)[0])


def embedded_molrmog(D: int, K: int, d: int, n: int, r: int | None = None, separation: float = 5.0,
                     seed: int = 0, subspace_seed: int | None = None, schedule="vp") -> MoLRMoG:
    """The same latent MoLR-MoG (means, factors, weights from `seed`) placed on random subspaces of R^D."""
    g = torch.Generator().manual_seed(seed)
    r = d if r is None else r
    mu = [separation * torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(d) for _ in range(K)]
    U = [torch.randn(n, d, r, generator=g, dtype=torch.float64) / math.sqrt(d) for _ in range(K)]
    ga = torch.Generator().manual_seed(1000 + (seed if subspace_seed is None else subspace_seed) + D)
    A = [random_orthonormal(D, d, ga) for _ in range(K)]
    return MoLRMoG(A, mu, U, schedule=schedule)
