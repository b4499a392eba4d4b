"""The closed-form mixture maths against independent computations."""

import math

import pytest
import torch

from molrmog.core import mixture as mx
from molrmog.core.distributions import GaussianMixture, MoLRG, MoLRMoG, random_orthonormal

from .conftest import ragged_molrmog, torch_reference

TIMES = [1e-3, 0.05, 0.4, 1.5, 5.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("t", TIMES)
def test_log_prob_matches_torch_distributions(seed, t):
    dist = ragged_molrmog(seed)
    ref = torch_reference(dist, t)
    x = dist.noise(dist.sample(64, torch.Generator().manual_seed(seed))[0], t)
    ours, theirs = dist.log_prob(x, t), ref.log_prob(x)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=0), (ours - theirs).abs().max()


@pytest.mark.parametrize("schedule", ["vp", "ve", "cosine"])
def test_log_prob_matches_reference_for_every_schedule(schedule):
    dist = ragged_molrmog(3, schedule=schedule)
    t = 0.5 * (dist.schedule.t_min + dist.schedule.t_max) * 0.1 + dist.schedule.t_min
    x = torch.randn(32, dist.D, dtype=torch.float64) * 2
    assert torch.allclose(dist.log_prob(x, t), torch_reference(dist, t).log_prob(x), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 4])
@pytest.mark.parametrize("t", TIMES)
def test_score_equals_autograd_of_log_prob(seed, t):
    dist = ragged_molrmog(seed)
    x = dist.noise(dist.sample(48, torch.Generator().manual_seed(seed))[0], t).requires_grad_(True)
    (auto,) = torch.autograd.grad(dist.log_prob(x, t).sum(), x)
    ours = dist.score(x.detach(), t)
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, auto, rtol=1e-5, atol=1e-8 * auto.abs().max().item())


def test_near_zero_rank_deficient_is_finite():
    dist = ragged_molrmog(5)
    x0, _ = dist.sample(256, torch.Generator().manual_seed(0))
    for t in (1e-3, 1.001e-3):
        xt = dist.noise(x0, t, torch.Generator().manual_seed(1))
        post = dist.posterior(xt, t)
        for v in (post.log_p, post.R, post.m, dist.score(xt, t)):
            assert torch.isfinite(v).all()
        assert torch.allclose(post.R.sum((1, 2)), torch.ones(256, dtype=torch.float64))


def test_per_sample_times_equal_scalar_times():
    dist = ragged_molrmog(6)
    x = torch.randn(10, dist.D, dtype=torch.float64)
    t = torch.linspace(0.01, 3.0, 10, dtype=torch.float64)
    batched = dist.score(x, t)
    single = torch.cat([dist.score(x[i : i + 1], t[i].item()) for i in range(10)])
    assert torch.allclose(batched, single, rtol=1e-12, atol=1e-12)
    assert torch.allclose(dist.log_prob(x, t), torch.cat([dist.log_prob(x[i : i + 1], t[i].item())
                                                          for i in range(10)]))


def test_float32_agrees_with_float64():
    dist = ragged_molrmog(7)
    x = dist.noise(dist.sample(128, torch.Generator().manual_seed(0))[0], 0.2)
    s64 = dist.score(x, 0.2)
    s32 = dist.score(x.float(), 0.2)
    assert s32.dtype == torch.float32
    rel = (s32.double() - s64).norm() / s64.norm()
    assert rel < 1e-4


def test_tweedie_denoiser_identity():
    """denoise = (x + gamma^2 score)/s; score = -(1/gamma^2) sum R delta, delta as in the design notes."""
    dist = ragged_molrmog(8)
    t = 0.3
    x = torch.randn(20, dist.D, dtype=torch.float64)
    tt = torch.tensor(t, dtype=torch.float64)
    s, g = dist.schedule.s(tt).item(), dist.schedule.gamma(tt).item()
    assert torch.allclose(dist.denoise(x, t), (x + g**2 * dist.score(x, t)) / s, rtol=1e-10)
    # delta_{k,l}(x) written literally, with explicit (small) matrices
    m, R = dist.mixture, dist.responsibilities(x, t)
    sig2 = (g / s) ** 2
    tot = torch.zeros_like(x)
    for k in range(dist.K):
        A = m.A[k]
        z = x @ A
        for l in range(dist.n[k]):
            U = m.U[k, l]
            v = z - s * m.mu[k, l]
            Minv = torch.linalg.inv(sig2 * torch.eye(U.shape[1], dtype=torch.float64) + U.T @ U)
            delta = (x - z @ A.T) + (v - v @ U @ Minv @ U.T) @ A.T
            tot += R[:, k, l, None] * delta
    assert torch.allclose(dist.score(x, t), -tot / g**2, rtol=1e-8)


def test_denoiser_matches_monte_carlo_posterior_mean():
    dist = ragged_molrmog(9)
    t = 0.7
    tt = torch.tensor(t, dtype=torch.float64)
    s, g = dist.schedule.s(tt).item(), dist.schedule.gamma(tt).item()
    gen = torch.Generator().manual_seed(0)
    x0_true, _ = dist.sample(3, gen)
    xt = dist.noise(x0_true, t, gen)
    prior, _ = dist.sample(400_000, gen)
    for i in range(3):
        logw = -((xt[i] - s * prior) ** 2).sum(1) / (2 * g**2)
        wts = torch.softmax(logw, 0)
        est = wts @ prior
        ess = 1 / (wts**2).sum()
        assert ess > 300, "Monte Carlo check too weak"
        se = torch.sqrt(wts**2 @ (prior - est) ** 2)  # delta-method standard error of the SNIS mean
        exact = dist.denoise(xt[i : i + 1], t)[0]
        z = ((est - exact).abs() / (se + 1e-12)).max()
        assert z < 5, f"denoiser differs from the MC posterior mean by {z:.2f} standard errors"


def test_sampling_reproduces_weights_means_and_covariances():
    dist = ragged_molrmog(10)
    N = 60_000
    x, lab = dist.sample(N, torch.Generator().manual_seed(3))
    flat = lab[:, 0] * dist.mixture.L + lab[:, 1]
    wts = dist.mode_weights.flatten()
    freq = torch.bincount(flat, minlength=wts.numel()).double() / N
    se = torch.sqrt(wts * (1 - wts) / N).clamp_min(1e-12)
    assert ((freq - wts).abs() / se).max() < 4.5
    mean, cov = dist.component_moments()
    for k in range(dist.K):
        for l in range(dist.n[k]):
            xs = x[(lab[:, 0] == k) & (lab[:, 1] == l)]
            nc = xs.shape[0]
            C = cov[k, l]
            z = (xs.mean(0) - mean[k, l]).abs() / torch.sqrt(torch.diagonal(C) / nc).clamp_min(1e-12)
            assert z.max() < 5
            emp = torch.cov(xs.T)
            var = (C**2 + torch.outer(torch.diagonal(C), torch.diagonal(C))) / nc
            assert torch.linalg.norm(emp - C) < 5 * var.sum().sqrt() + 1e-10
            # the samples lie exactly in the subspace A_k
            A = dist.mixture.A[k, :, : dist.d[k]]
            assert torch.allclose(xs - xs @ A @ A.T, torch.zeros_like(xs), atol=1e-10)


def test_molrg_reduces_to_general_class():
    g = torch.Generator().manual_seed(0)
    A = [random_orthonormal(10, 3, g), random_orthonormal(10, 2, g)]
    U = [torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(2, 2, generator=g,
                                                                           dtype=torch.float64)]
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    a = MoLRG(A, U, w=w)
    b = MoLRMoG(A, [torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)],
                [[U[0]], [U[1]]], w=w)
    x = torch.randn(16, 10, dtype=torch.float64)
    for t in (0.01, 1.0):
        assert torch.equal(a.score(x, t), b.score(x, t))
        assert torch.equal(a.log_prob(x, t), b.log_prob(x, t))
    # MoLRG's score is linear inside each subspace when K = 1
    one = MoLRG(A[:1], U[:1])
    assert torch.allclose(one.score(2 * x, 0.5), 2 * one.score(x, 0.5), rtol=1e-10)


def test_gaussian_mixture_reduces_to_general_class_with_identity():
    gm = GaussianMixture.random(5, n=3, r=2, seed=1)
    p = gm.parts()
    general = MoLRMoG([torch.eye(5, dtype=torch.float64)], p["mu"], p["U"], pi=p["pi"])
    x = torch.randn(20, 5, dtype=torch.float64)
    for t in (0.01, 0.8):
        assert torch.allclose(gm.score(x, t), general.score(x, t), rtol=1e-12, atol=1e-12)
        assert torch.allclose(gm.log_prob(x, t), general.log_prob(x, t), rtol=1e-12)
        assert torch.allclose(gm.responsibilities(x, t), general.responsibilities(x, t), atol=1e-12)


def test_log_prob_at_t0_full_rank_matches_torch():
    gm = GaussianMixture.random(4, n=3, seed=2)  # r = D: a density exists at t = 0
    mean, cov = gm.component_moments()
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=gm.mode_weights[0]),
        torch.distributions.MultivariateNormal(mean[0], covariance_matrix=cov[0]))
    x = torch.randn(30, 4, dtype=torch.float64)
    assert torch.allclose(gm.log_prob(x, 0.0), ref.log_prob(x), rtol=1e-8)


def test_log_prob_at_t0_low_rank_explains_itself(ragged):
    with pytest.raises(ValueError, match="no density in R\\^D"):
        ragged.log_prob(torch.zeros(2, ragged.D, dtype=torch.float64), 0.0)


def test_padding_is_exact_against_unpadded_single_subspace(ragged):
    """Each subspace evaluated alone (no padding) gives the same component log-densities."""
    t, x = 0.2, torch.randn(8, ragged.D, dtype=torch.float64)
    p = ragged.parts()
    lp = ragged.log_prob(x, t)
    parts = []
    for k in range(ragged.K):
        one = MoLRMoG([p["A"][k]], [p["mu"][k]], [p["U"][k]], pi=[p["pi"][k]])
        parts.append(math.log(p["w"][k].item()) + one.log_prob(x, t))
    assert torch.allclose(lp, torch.logsumexp(torch.stack(parts), 0), rtol=1e-10)


def test_gradients_reach_parameters():
    """The same maths with parameters: gradients of log p_t w.r.t. mu and U are finite and non-zero."""
    dist = ragged_molrmog(11)
    m = dist.mixture
    mu = m.mu.clone().requires_grad_(True)
    U = m.U.clone().requires_grad_(True)
    mix = mx.Mixture(m.log_w, m.A, m.log_pi, mu, U)
    x = torch.randn(16, dist.D, dtype=torch.float64)
    mx.log_prob(mix, x, 0.9, 0.3).sum().backward()
    assert torch.isfinite(mu.grad).all() and mu.grad.abs().sum() > 0
    assert torch.isfinite(U.grad).all() and U.grad.abs().sum() > 0


def _fused_agrees(device):
    from molrmog.core import mixture as mx

    dist = ragged_molrmog(7, dtype=torch.float32)
    mix = dist.mixture.to(device)
    x = 2 * torch.randn(300, dist.D, generator=torch.Generator().manual_seed(0)).to(device)
    for t in (0.01, 0.4, 3.0):
        s, g = dist.schedule.s(torch.tensor(t)).to(device), dist.schedule.gamma(torch.tensor(t)).to(device)
        with torch.no_grad():
            eager = mx.posterior(mix, x, s, g, fused=False)
            fused = mx.posterior(mix, x, s, g, fused=True)
        for a, b in zip(eager, fused, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        assert torch.equal(fused.R[:, 0, 1:], torch.zeros_like(fused.R[:, 0, 1:]))  # padded modes stay exactly 0


def test_fused_path_agrees_with_the_eager_reference_on_ragged_mixtures():
    _fused_agrees("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fused_and_eager_agree_on_cuda():
    _fused_agrees("cuda")


def test_both_cholesky_inverses_equal_the_inverse():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(6, 3, 5, 4, generator=g, dtype=torch.float64)
    M = 0.3 * torch.eye(4, dtype=torch.float64) + U.transpose(-1, -2) @ U
    C = torch.linalg.cholesky(M)
    for triangular in (False, True):
        torch.testing.assert_close(mx.cholesky_inverse(C, triangular), torch.linalg.inv(M), rtol=1e-10, atol=1e-10)


def test_random_draws_follow_the_generator_and_land_on_the_device():
    a = mx.random_draw(torch.randn, (3, 4), torch.Generator().manual_seed(5), torch.float32, "cpu")
    torch.testing.assert_close(a, torch.randn(3, 4, generator=torch.Generator().manual_seed(5)))
    assert mx.random_draw(torch.rand, (2,), None, torch.float64, None).dtype == torch.float64
    if torch.cuda.is_available():  # a CPU generator gives the same numbers on the GPU; a GPU one draws there
        b = mx.random_draw(torch.randn, (3, 4), torch.Generator().manual_seed(5), torch.float32, "cuda")
        torch.testing.assert_close(b.cpu(), a)
        c = mx.random_draw(torch.randn, (3, 4), torch.Generator("cuda").manual_seed(5), torch.float32, "cuda")
        assert c.device.type == "cuda"
