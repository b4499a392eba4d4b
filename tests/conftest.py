import math

import pytest
import torch

from molrmog.core.distributions import MoLRMoG, random_orthonormal


def ragged_molrmog(seed: int, D: int = 12, dtype=torch.float64, schedule="vp") -> MoLRMoG:
    """A random MoLR-MoG with different d_k, n_k and r_{k,l}, and one rank-deficient factor."""
    g = torch.Generator().manual_seed(seed)
    K = 3
    d = [2, 4, 3]
    n = [1, 3, 2]
    A = [random_orthonormal(D, dk, g) for dk in d]
    mu = [3 * torch.randn(nk, dk, generator=g, dtype=torch.float64) / math.sqrt(dk)
          for nk, dk in zip(n, d, strict=True)]
    U = []
    for k in range(K):
        Uk = []
        for l in range(n[k]):
            r = 1 + (k + l) % d[k]
            Uk.append(torch.randn(d[k], r, generator=g, dtype=torch.float64) / math.sqrt(d[k]))
        U.append(Uk)
    U[1][1] = torch.cat([U[1][1][:, :1], 2 * U[1][1][:, :1]], 1)  # two parallel columns: rank-deficient
    w = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    pi = [torch.softmax(torch.randn(nk, generator=g, dtype=torch.float64), 0) for nk in n]
    return MoLRMoG(A, mu, U, w=w, pi=pi, dtype=dtype, schedule=schedule)


def torch_reference(dist: MoLRMoG, t: float):
    """The noised mixture built from ambient parameters with torch.distributions."""
    mean, _ = dist.component_moments()
    m = dist.mixture
    A = m.A if m.A is not None else torch.eye(dist.D, dtype=m.U.dtype)[None]
    s = dist.schedule.s(torch.tensor(t, dtype=torch.float64)).item()
    g = dist.schedule.gamma(torch.tensor(t, dtype=torch.float64)).item()
    comps, logits = [], []
    for k in range(dist.K):
        for l in range(dist.n[k]):
            F = s * A[k] @ m.U[k, l]
            comps.append((s * mean[k, l], F))
            logits.append(m.log_weights[k, l])
    r = max(F.shape[1] for _, F in comps)
    locs = torch.stack([c[0] for c in comps]).double()
    facs = torch.stack([torch.nn.functional.pad(F, (0, r - F.shape[1])) for _, F in comps]).double()
    diag = torch.full(locs.shape, g**2, dtype=torch.float64)
    mix = torch.distributions.Categorical(logits=torch.stack(logits).double())
    comp = torch.distributions.LowRankMultivariateNormal(locs, facs, diag)
    return torch.distributions.MixtureSameFamily(mix, comp)


@pytest.fixture
def ragged():
    return ragged_molrmog(0)


def tiny(experts=("mog", "gaussian", "unet"), vae: bool = True, **steps) -> list[str]:
    """Flags of a tiny training run (seconds on 2 CPU cores) with these expert kinds (vae=False: without the VAE
    flags, for --vae-from)."""
    args = (["--vae-steps", "16", "--vae-batch", "32"] if vae else []) + [
        "--sample-steps", "3", "--checkpoint-every", "4", "--no-progress", "--experts", ",".join(experts)]
    for kind in experts:
        args += [f"--{kind}-steps", str(steps.get(kind, 3 if kind == "unet" else 12)), f"--{kind}-batch", "32"]
    return args


@pytest.fixture(scope="session")
def featurizer_cache(tmp_path_factory):
    """A cache folder holding the digits featurizer, trained once per test session."""
    from molrmog.evaluation.featurizer import get_featurizer

    cache = tmp_path_factory.mktemp("featurizer-cache")
    get_featurizer("digits", cache, progress=False)
    return cache


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """The tiny digits run (mog, gaussian, unet) that many tests read, trained once per test session. A fixed
    thread count: its weights are comparable bit for bit (the resume test) whatever the machine's load. Tests
    that write into it write only new files (evaluation.json, jac/, fs/)."""
    from molrmog.cli import main

    out = tmp_path_factory.mktemp("runs") / "digits"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOLRMOG_THREADS", "2")
        assert main(["train", "--dataset", "digits", "--out", str(out), *tiny()]) == 0
    return out
