"""EM for a mixture of probabilistic PCA: it recovers a known MoLR-MoG, picks modes and rank by held-out
likelihood, and starts the MoG expert."""

import itertools

import pytest
import torch

from molrmog.core.distributions import GaussianMixture
from molrmog.core.em import fit_mppca, mppca_parameters, select_mppca
from molrmog.models.experts import GaussianExpert, MoGExpert


def _truth():
    return GaussianMixture.random(12, n=3, r=2, separation=8.0, seed=3, pi=torch.tensor([0.5, 0.3, 0.2],
                                                                                       dtype=torch.float64))


def _proj(W):
    Q = torch.linalg.qr(W)[0]
    return Q @ Q.T


def test_em_recovers_means_subspaces_and_weights():
    truth = _truth()
    x, _ = truth.sample(6000, torch.Generator().manual_seed(0))
    fit = fit_mppca(x, 3, 2, seed=0)
    m = truth.mixture
    true_mu, true_U, true_pi = m.mu[0], m.U[0], m.log_pi[0].exp()
    perm = min(itertools.permutations(range(3)), key=lambda p: sum(float((fit.mu[p[l]] - true_mu[l]).norm())
                                                                   for l in range(3)))
    for l in range(3):
        j = perm[l]
        scale = float(true_U[l].norm())
        assert float((fit.mu[j] - true_mu[l]).norm()) < 0.1 * scale
        assert float(torch.linalg.norm(_proj(fit.W[j]) - _proj(true_U[l]))) < 0.05  # subspace distance
        assert abs(float(fit.pi[j] - true_pi[l])) < 0.02
        assert float(fit.s2[j]) < 1e-3 * scale**2  # a clean rank-2 law: the floor is (almost) zero
    assert fit.iterations < 100 and fit.loglik > truth.log_prob(x, 0.01).mean()  # tighter than the noised law


def test_held_out_selection_finds_the_true_modes_and_rank_within_a_parameter_cap():
    truth = _truth()
    g = torch.Generator().manual_seed(1)
    x, _ = truth.sample(3000, g)
    x = x + 0.05 * torch.randn(x.shape, generator=g, dtype=x.dtype)  # rank 2 plus an isotropic floor: a PPCA law
    choice = select_mppca(x, modes=[1, 3, 6], ranks=[1, 2, 4], seed=0)
    assert (choice["modes"], choice["rank"]) in ((3, 2), (6, 2))  # more modes than needed may tie
    assert choice["heldout_loglik"] == max(c["heldout_loglik"] for c in choice["candidates"])
    capped = select_mppca(x, modes=[1, 3, 6], ranks=[1, 2, 4], seed=0, param_cap=mppca_parameters(12, 3, 1))
    assert capped["parameters"] <= mppca_parameters(12, 3, 1)


@pytest.mark.parametrize("make", [lambda: MoGExpert(12, n=3, r=2), lambda: GaussianExpert(12, r=2)])
def test_experts_start_from_the_em_fit(make):
    truth = _truth()
    x, _ = truth.sample(2000, torch.Generator().manual_seed(2))
    e = make().double().init_from_data(x, seed=0)
    assert set(e.em_info) >= {"loglik", "iterations", "floor_s2_median"}
    law = GaussianMixture(e.mu.detach(), e.U.detach(), pi=e.pi.detach())
    ll = float(law.log_prob(x, 0.05).mean())  # the expert's own law explains the data after the start alone
    if isinstance(e, MoGExpert):
        assert ll > float(truth.log_prob(x, 0.05).mean()) - 0.5
    assert torch.isfinite(e.U).all()
