"""Learnable score models: same maths as the analytic distributions, save/load, training behaviour."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from molrmog.core import mixture as mx
from molrmog.core.distributions import GaussianMixture, MoLRMoG
from molrmog.core.errors import MolrmogError
from molrmog.core.losses import dsm_loss
from molrmog.core.samplers import generate
from molrmog.core.schedules import get_schedule, make_grid
from molrmog.models.experts import GaussianExpert, MLPScore, MoEScore, MoGExpert, k_subspaces, load_model
from molrmog.training.train import TrainingDiverged, fit, train_score


def test_mog_expert_score_is_the_analytic_mixture_score():
    e = MoGExpert(5, n=3, r=2, seed=1).double()
    with torch.no_grad():
        e.logit_pi.copy_(torch.tensor([0.2, -0.5, 1.0]))
    gm = GaussianMixture(e.mu.detach(), e.U.detach(), pi=e.pi.detach())
    z = torch.randn(20, 5, dtype=torch.float64)
    for t in (0.01, 0.7):
        assert torch.allclose(e(z, t), gm.score(z, t), rtol=1e-10, atol=1e-12)
    # and per-sample times give the per-sample scores
    t = torch.linspace(0.01, 2, 20, dtype=torch.float64)
    assert torch.allclose(e(z, t), gm.score(z, t), rtol=1e-10, atol=1e-12)


def test_moe_score_has_orthonormal_A_and_matches_molrmog():
    m = MoEScore(16, 3, 4, n=2, r=2, seed=0).double()
    A = m.A.detach()
    eye = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    assert torch.allclose(A.transpose(1, 2) @ A, eye, atol=1e-12)
    with torch.no_grad():
        m.logit_w.copy_(torch.tensor([0.1, 0.4, -0.3]))
    truth = MoLRMoG(list(A), [e.mu.detach() for e in m.experts], [e.U.detach() for e in m.experts],
                    w=torch.softmax(m.logit_w.detach(), 0), pi=[e.pi.detach() for e in m.experts])
    x = torch.randn(10, 16, dtype=torch.float64)
    assert torch.allclose(m(x, 0.3), truth.score(x, 0.3), rtol=1e-9, atol=1e-10)


def test_gaussian_expert_score_is_linear():
    e = GaussianExpert(6, r=3).double()
    z = torch.randn(8, 6, dtype=torch.float64)
    assert torch.allclose(e(3 * z, 0.5), 3 * e(z, 0.5), rtol=1e-10)
    assert torch.allclose(e(z, 0.5) + e(-z, 0.5), torch.zeros_like(z), atol=1e-12)


@pytest.mark.parametrize("make", [lambda: MoGExpert(4, 3, 2, schedule="cosine"), lambda: GaussianExpert(5, 2),
                                  lambda: MoEScore(12, 2, 3, 2, gaussian=True, learn_factors=False),
                                  lambda: MoEScore(12, 2, 3, 2), lambda: MLPScore(7, hidden=32, depth=2)])
def test_models_save_and_load(tmp_path, make):
    m = make()
    m.save_pretrained(tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert type(back) is type(m) and back.schedule.config() == m.schedule.config()
    D = m.d if hasattr(m, "d") and not hasattr(m, "K") else m.D
    x = torch.randn(4, D)
    assert torch.allclose(back(x, 0.4), m(x, 0.4))


def test_k_subspaces_recovers_separated_subspaces():
    truth = MoLRMoG.random(30, 3, 3, 2, seed=2)
    x, lab = truth.sample(600, torch.Generator().manual_seed(0))
    bases, labels = k_subspaces(x, 3, 3)
    P = bases @ bases.transpose(1, 2)
    Pt = truth.mixture.A @ truth.mixture.A.transpose(1, 2)
    for k in range(3):
        assert min(torch.linalg.norm(P[j] - Pt[k]).item() for j in range(3)) < 1e-6


def test_training_lowers_score_error_and_is_repeatable():
    from molrmog.experiments.estimation import score_error

    truth = GaussianMixture.random(4, n=2, separation=4, seed=5)
    x, _ = truth.sample(2000, torch.Generator().manual_seed(0))

    def fit():
        m = MoGExpert(4, n=2, seed=0).double()
        before = score_error(m, truth, 1000, seed=1)
        train_score(m, x, steps=200, batch_size=256, lr=2e-2, t_max=3.0, progress=False, ema_decay=0.9)
        return m, before

    m1, before = fit()
    m2, _ = fit()
    after = score_error(m1, truth, 1000, seed=1)
    assert after < 0.3 * before, (before, after)
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)


@pytest.mark.parametrize("make, match", [
    (lambda: MoGExpert(4, n=0), "n_k must be >= 1"),
    (lambda: MoGExpert(4, n=2, r=5), "1 <= r <= d"),
    (lambda: MoEScore(4, 2, 6), "must not exceed the ambient"),
    (lambda: MoEScore(8, 0, 2), "K \\(number of experts\\)"),
    (lambda: get_schedule("vp", t_min=2.0, t_max=1.0), "t_min"),
])
def test_invalid_hyperparameters_fail_before_work(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_training_input_fails_before_work():
    m = MoGExpert(3, 2)
    with pytest.raises(ValueError, match="empty"):
        train_score(m, torch.zeros(0, 3), steps=5, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        train_score(m, torch.full((4, 3), math.nan), steps=5, progress=False)
    with pytest.raises(ValueError, match="learning rate"):
        train_score(m, torch.zeros(4, 3), steps=5, lr=-1, progress=False)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    m = MoGExpert(3, 2).double()
    x = torch.randn(64, 3, dtype=torch.float64)
    calls = []

    def loss_fn(model, gen):  # DSM, until the 5th call returns NaN
        calls.append(1)
        loss = dsm_loss(model, x, model.schedule, generator=gen)
        return loss * math.nan if len(calls) == 5 else loss

    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        fit(m, loss_fn, steps=10, lr=1e-2, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    with safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["state"])["step"] == 4
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys() if k.startswith("model."))


def test_fit_resumes_bit_for_bit(tmp_path):
    x = torch.randn(128, 3, dtype=torch.float64)

    def loss_fn(model, gen):
        idx = torch.randint(0, 128, (32,), generator=gen)
        return dsm_loss(model, x[idx], model.schedule, generator=gen)

    class Killed(Exception):
        pass

    def dies_at_step_8(model, gen, calls=[]):  # noqa: B006 - a counter that outlives calls
        calls.append(1)
        if len(calls) == 8:
            raise Killed  # like SIGKILL: steps 6-7 were done but not checkpointed
        return loss_fn(model, gen)

    kw = dict(steps=12, lr=1e-2, ema_decay=0.9, lr_schedule="cosine", progress=False)
    full = MoGExpert(3, 2, seed=1).double()
    fit(full, loss_fn, **kw)
    with pytest.raises(Killed):
        fit(MoGExpert(3, 2, seed=1).double(), dies_at_step_8, checkpoint_dir=tmp_path, checkpoint_every=5,
            **kw)
    resumed = MoGExpert(3, 2, seed=99).double()  # different init: everything comes from the checkpoint
    fit(resumed, loss_fn, checkpoint_dir=tmp_path, checkpoint_every=5, **kw)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    bad = tmp_path / "checkpoint.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.safetensors is corrupt"):
        fit(MoGExpert(3, 2).double(), loss_fn, steps=12, lr=1e-2, progress=False, checkpoint_dir=tmp_path)


def test_preconditioned_unet_is_exact_for_standard_normal_data_when_its_network_outputs_zero():
    from molrmog.models.experts import UNetScore

    m = UNetScore((2, 3, 3), width=8, precondition=True).double()  # odd size: padded inside
    last = m.unet.conv_out
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    x = torch.randn(6, 18, dtype=torch.float64)
    for t in (0.01, 0.5, 4.0):
        s, g = m.st(x, t)
        # N(0, I) data: p_t = N(0, (s^2 + gamma^2) I), score = -x / (s^2 + gamma^2)
        torch.testing.assert_close(m(x, torch.tensor(t)), -x / (s**2 + g**2), rtol=1e-10, atol=1e-12)
    plain = UNetScore((2, 3, 3), width=8, precondition=False).double()
    torch.nn.init.zeros_(plain.unet.conv_out.weight)
    torch.nn.init.zeros_(plain.unet.conv_out.bias)
    assert plain(x, torch.tensor(0.5)).abs().max() == 0  # the old parameterisation: raw eps


def _floored_law(e: MoGExpert, s: float, g: float) -> torch.distributions.MixtureSameFamily:
    """The floored expert noised to (s, gamma) with torch.distributions: modes N(s mu, s^2 U U^T + (gamma^2 +
    s^2 floor) I)."""
    mu, U = e.mu.detach(), e.U.detach()
    diag = torch.full(mu.shape, g**2 + s**2 * e.floor_value(), dtype=mu.dtype)
    comp = torch.distributions.LowRankMultivariateNormal(s * mu, s * U, diag)
    return torch.distributions.MixtureSameFamily(torch.distributions.Categorical(probs=e.pi.detach()), comp)


def _check_score_of_law(model, law, x, t):
    """The model's score at t, and the score of the law the exact sampler steps with (`mixture_for`), against
    autograd of `law(model, s, gamma).log_prob` (torch.distributions); returns (s, gamma, that score)."""
    s, g = (float(v) for v in model.st(x, t))
    xx = x.clone().requires_grad_(True)
    auto, = torch.autograd.grad(law(model, s, g).log_prob(xx).sum(), xx)
    assert torch.allclose(model(x, t), auto, rtol=1e-8, atol=1e-10)
    assert torch.allclose(mx.score(model.mixture_for(x), x, *model.st(x, t)), auto, rtol=1e-8, atol=1e-10)
    return s, g, auto


@pytest.mark.parametrize("learn", [False, True])
def test_a_floored_mog_expert_has_the_score_of_its_law_and_keeps_the_floor_on_save(tmp_path, monkeypatch, learn):
    e = MoGExpert(5, n=3, r=2, seed=3, floor=0.3, learn_floor=learn).double()
    with torch.no_grad():
        e.logit_pi.copy_(torch.tensor([0.2, -0.5, 1.0]))
        e.mu.mul_(2)
    z = torch.randn(16, 5, dtype=torch.float64)
    for t in (0.05, 0.7):
        s, g, auto = _check_score_of_law(e, _floored_law, z, t)
        with monkeypatch.context() as m, torch.no_grad():  # the fused one-t path (its graph run eagerly here)
            m.setattr(mx, "FUSED", True)
            m.setattr(mx, "compile_once", lambda fn: fn)
            assert torch.allclose(e(z, t), auto, rtol=1e-8, atol=1e-10)
        # Tweedie keeps the schedule's gamma: E[x0 | x_t] of the floored law
        assert torch.allclose(e.denoise(z, t), (z + g**2 * auto) / s, rtol=1e-8, atol=1e-10)
    e.save_pretrained(tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.floor_value() == pytest.approx(0.3, rel=1e-6)  # (float32 when built, then .double())
    assert torch.allclose(back(z, 0.4), e(z, 0.4), rtol=1e-10, atol=1e-12)
    if learn:  # the floor is a parameter: DSM moves it, and the EM start sets it from the fit's floors
        x0 = torch.randn(64, 5, dtype=torch.float64)
        loss = dsm_loss(e, x0, e.schedule, generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert e.log_floor.grad is not None and float(e.log_floor.grad.abs()) > 0
        with torch.no_grad():
            e.init_from_data(torch.randn(200, 5, dtype=torch.float64) * torch.tensor([3.0, 2, 1, 1, 1]), seed=0)
        em_floor = float((e.pi.detach() * torch.tensor(e.em_info["floor_s2"])).sum())
        assert e.floor_value() == pytest.approx(em_floor, rel=1e-6)
        with pytest.raises(MolrmogError, match="trains its floor"):
            e.match_variance()
    with pytest.raises(MolrmogError, match="floor"):
        MoGExpert(5, floor=-1.0)


def _diag_floored_law(e: MoGExpert, s: float, g: float) -> torch.distributions.MixtureSameFamily:
    """The expert with a per-coordinate floor c noised to (s, gamma), with torch.distributions: modes
    N(s mu, s^2 U U^T + diag(gamma^2 + s^2 c))."""
    mu, U = e.mu.detach(), e.U.detach()
    diag = (g**2 + s**2 * e.floor_diag.detach()).expand(mu.shape)
    comp = torch.distributions.LowRankMultivariateNormal(s * mu, s * U, diag)
    return torch.distributions.MixtureSameFamily(torch.distributions.Categorical(probs=e.pi.detach()), comp)


def _mode_floors(e: MoGExpert, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independently of the expert's code: every mode's second moment about its mean over the data u, weighed by
    the responsibilities of torch.distributions' law with the isotropic floor that matches the data's total
    variance (at least 1e-3), less its factor's; and the modes' shares of u."""
    n, d = e.mu.shape
    iso = max(1e-3, 1.0 - float(e.coordinate_variance(diagonal=False).mean()))
    comp = torch.distributions.LowRankMultivariateNormal(e.mu.detach(), e.U.detach(), torch.full((n, d), iso,
                                                                                                  dtype=torch.float64))
    R = torch.softmax(comp.log_prob(u[:, None]) + torch.log(e.pi.detach()), 1)  # (N, n)
    c = torch.stack([(R[:, l, None] * (u - e.mu.detach()[l]) ** 2).sum(0) / R[:, l].sum()
                     - e.U.detach()[l].pow(2).sum(-1) for l in range(n)]).clamp_min(0)
    return c, R.sum(0) / R.sum()


def test_a_shared_per_coordinate_floor_is_the_modes_floors_averaged_with_their_shares(tmp_path):
    """--mog-floor diag: N(mu_l, U_l U_l^T + diag(c)), c = sum_l w_l c_l, the per-mode floors averaged with the
    modes' shares of the data, against an independent computation (`_mode_floors`) -- on a law with more variance
    than the data in every coordinate and too little about each mode (as DSM leaves it), where the first
    version's floor (the data's variance less the law's, per coordinate) was 0 everywhere. Its score (model and
    full-rank `mixture_for`) against autograd of torch.distributions' log-density, Tweedie, save / load, the
    exact sampler's per-coordinate variance by Monte Carlo, and the d numbers counted as parameters."""
    d, n, r = 6, 3, 2
    e = MoGExpert(d, n=n, r=r, seed=4, diag_floor="shared").double()
    assert e.diagonal_floor() is None and e.num_parameters() == n * (d * r + d + 1) + d
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        e.logit_pi.copy_(torch.tensor([0.3, -0.4, 0.8]))
        e.U.mul_(0.4)
        e.mu.copy_(2.0 * torch.randn(n, d, generator=g, dtype=torch.float64))
    u = e.mu.detach()[torch.randint(0, n, (600,), generator=g)] + 0.8 * torch.randn(600, d, generator=g,
                                                                                      dtype=torch.float64)
    var0 = e.coordinate_variance()
    assert (var0 > 1).all()  # no coordinate short of the data's unit variance
    want, w = _mode_floors(e, u)
    c = e.match_coordinate_variance(u)
    assert torch.allclose(c, (w[:, None] * want).sum(0), rtol=1e-8, atol=1e-10) and (c > 0.1).all()
    assert torch.allclose(e.match_coordinate_variance(u), c, rtol=1e-10, atol=1e-12)  # matching again: the same
    assert torch.allclose(e.coordinate_variance(), var0 + c, atol=1e-12)
    z = torch.randn(16, d, dtype=torch.float64)
    for t in (0.05, 0.7):  # one t: the whitened low-rank form; the law written with the floor in its factor
        s, g, auto = _check_score_of_law(e, _diag_floored_law, z, t)
        assert torch.allclose(e.denoise(z, t), (z + g**2 * auto) / s, rtol=1e-8, atol=1e-10)
    ts = torch.linspace(0.05, 0.9, z.shape[0], dtype=torch.float64)  # a t per row (DSM): the rank r + D form
    one_by_one = torch.cat([e(z[i:i + 1], float(ts[i])) for i in range(z.shape[0])])
    assert torch.allclose(e(z, ts), one_by_one, rtol=1e-8, atol=1e-10)
    e.save_pretrained(tmp_path / "m")
    back = load_model(tmp_path / "m").double()
    assert torch.allclose(back.floor_diag, e.floor_diag.float().double())
    assert torch.allclose(back(z, 0.4), e(z, 0.4), rtol=1e-5, atol=1e-6)  # (float32 on disk)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = generate(e, 40000, d, e.schedule, make_grid(e.schedule, 1, "karras"), "exact", generator=gen)
    assert torch.allclose(x.var(0), var0 + c, rtol=0.04)  # Monte Carlo of the exact sampler's draws
    with pytest.raises(MolrmogError, match="exclude each other"):
        MoGExpert(d, learn_floor=True, diag_floor="shared")
    with pytest.raises(MolrmogError, match="diag_floor='shared'"):
        MoGExpert(d).match_coordinate_variance(u)
    with pytest.raises(MolrmogError, match="diag_floor must be one of none, shared, mode"):
        MoGExpert(d, diag_floor="yes")
    assert MoGExpert(d, diag_floor=True).floor_diag.shape == (d,)  # (a first version's config: True = shared)


def test_the_isotropic_floor_from_data_is_the_shared_floor_averaged_over_coordinates():
    """--mog-floor match: one isotropic floor, the shared floor (`_mode_floors` averaged with the modes' shares)
    averaged over the coordinates -- also where the law has more total variance than the data, where filling the
    variance up (`match_variance`, the first version) gives no floor at all."""
    d, n, r = 6, 3, 2
    e = MoGExpert(d, n=n, r=r, seed=4).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        e.U.mul_(0.4)
        e.mu.copy_(2.0 * torch.randn(n, d, generator=g, dtype=torch.float64))
    u = e.mu.detach()[torch.randint(0, n, (600,), generator=g)] + 0.8 * torch.randn(600, d, generator=g,
                                                                                      dtype=torch.float64)
    assert e.variance_gap() < 0  # more variance than the data: match_variance would set 0
    want, w = _mode_floors(e, u)
    floor = e.match_residual_variance(u)
    assert floor == pytest.approx(float((w[:, None] * want).sum(0).mean()), rel=1e-10) and floor > 0.1
    assert e.config["floor"] == floor == e.floor_value()
    assert e.match_residual_variance(u) == pytest.approx(floor, rel=1e-12)  # matching again: the same
    with pytest.raises(MolrmogError, match="trains its floor"):
        MoGExpert(d, learn_floor=True).match_residual_variance(u)


def _mode_floored_law(e: MoGExpert, s: float, g: float) -> torch.distributions.MixtureSameFamily:
    """The expert with a per-mode per-coordinate floor c_l noised to (s, gamma), with torch.distributions: modes
    N(s mu_l, s^2 U_l U_l^T + diag(gamma^2 + s^2 c_l))."""
    comp = torch.distributions.LowRankMultivariateNormal(s * e.mu.detach(), s * e.U.detach(),
                                                         g**2 + s**2 * e.floor_diag.detach())
    return torch.distributions.MixtureSameFamily(torch.distributions.Categorical(probs=e.pi.detach()), comp)


def test_a_per_mode_floor_is_each_mode_s_second_moment_left_out_by_its_factor(tmp_path):
    """--mog-floor mode-diag: N(mu_l, U_l U_l^T + diag(c_l)), c_l from the data each mode is responsible for. The
    floor against an independent computation (responsibilities from torch.distributions' log-densities of the
    law with the isotropic floor that matches the data's total variance), the score against autograd, matching
    again, save / load, and the n d numbers counted as parameters."""
    d, n, r = 5, 3, 2
    e = MoGExpert(d, n=n, r=r, seed=6, diag_floor="mode").double()
    assert e.num_parameters() == n * (d * r + d + 1) + n * d and e.floor_diag.shape == (n, d)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        e.U.mul_(0.5)
        e.mu.mul_(0.4)
        e.logit_pi.copy_(torch.tensor([0.1, 0.5, -0.3]))
    u = e.mu.detach()[torch.randint(0, n, (400,), generator=g)] + torch.randn(400, d, generator=g, dtype=torch.float64)
    assert 1.0 - float(e.coordinate_variance().mean()) > 1e-3  # a law with less variance than the data
    want = _mode_floors(e, u)[0]
    c = e.match_mode_variance(u)
    assert torch.allclose(c, want, rtol=1e-8, atol=1e-10) and (c > 0).any()
    assert torch.allclose(e.match_mode_variance(u), c, rtol=1e-10, atol=1e-12)  # matching again changes nothing
    z = torch.randn(12, d, dtype=torch.float64)
    for t in (0.05, 0.7):
        s, gm, auto = _check_score_of_law(e, _mode_floored_law, z, t)
    e.save_pretrained(tmp_path / "m")
    back = load_model(tmp_path / "m").double()
    assert back.config["diag_floor"] == "mode" and torch.allclose(back.floor_diag, c.float().double())
    with pytest.raises(MolrmogError, match="diag_floor='mode'"):
        MoGExpert(d, diag_floor="shared").match_mode_variance(u)


def test_matching_the_variance_gives_the_law_the_data_s_total_variance():
    e = MoGExpert(8, n=4, r=2, seed=5).double()
    with torch.no_grad():
        e.U.mul_(0.5)  # a law with less variance than standardised data
    gap = e.variance_gap()
    assert gap > 0
    floor = e.match_variance()
    assert floor == pytest.approx(gap) and e.config["floor"] == floor
    assert e.variance_gap() == pytest.approx(0, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = generate(e, 40000, 8, e.schedule, make_grid(e.schedule, 1, "karras"), "exact", generator=g)
    assert float(x.var(0).mean()) == pytest.approx(1.0, rel=0.03)  # Monte Carlo of the exact sampler's draws
    with torch.no_grad():
        e.U.mul_(4)  # a law with more variance than the data: no floor
    assert e.match_variance() == 0.0


def _floored_molr_law(m: MoEScore, s: float, g: float) -> torch.distributions.MixtureSameFamily:
    """A floored MoEScore noised to (s, gamma), built independently with torch.distributions: K n modes in R^D,
    N(s A_k mu_kl, s^2 (A_k U_kl U_kl^T A_k^T + floor I) + gamma^2 I), weights w_k pi_kl."""
    A = m.A.detach()
    mus, covs, ws = [], [], []
    w = torch.softmax(m.logit_w.detach(), 0)
    for k, e in enumerate(m.experts):
        for l in range(e.n):
            F = A[k] @ e.U.detach()[l]
            mus.append(s * A[k] @ e.mu.detach()[l])
            covs.append(s**2 * (F @ F.T + m.floor_value() * torch.eye(m.D, dtype=F.dtype)) +
                        g**2 * torch.eye(m.D, dtype=F.dtype))
            ws.append(w[k] * e.pi.detach()[l])
    comp = torch.distributions.MultivariateNormal(torch.stack(mus), torch.stack(covs))
    return torch.distributions.MixtureSameFamily(torch.distributions.Categorical(probs=torch.stack(ws)), comp)


def test_a_floored_full_covariance_moe_has_the_score_of_its_law_and_saves(tmp_path):
    m = MoEScore(9, 2, 3, n=2, full_cov=True, floor=0.2, seed=4).double()
    # full covariances are packed lower-triangular factors: d (d + 1) / 2 numbers per mode
    sizes = {n: p.shape for n, p in m.named_parameters()}
    assert sizes["experts.0.parametrizations.U.original"] == (2, 6)
    assert torch.equal(m.experts[0].U, m.experts[0].U.tril())
    with torch.no_grad():
        m.logit_w.copy_(torch.tensor([0.3, -0.2]))
        m.experts[1].mu.mul_(3)
    x = torch.randn(12, 9, dtype=torch.float64)
    for t in (0.05, 0.8):
        _check_score_of_law(m, _floored_molr_law, x, t)
    m.save_pretrained(tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.floor_value() == pytest.approx(0.2, rel=1e-6)
    assert torch.allclose(back.double()(x, 0.4), m(x, 0.4), rtol=1e-6, atol=1e-8)
    with pytest.raises(MolrmogError, match="r = d"):
        MoEScore(9, 1, 3, n=2, r=2, full_cov=True)
    # assigning any factor keeps its covariance, a singular one included (a mode with fewer points than d)
    W = torch.randn(2, 3, 3, dtype=torch.float64)
    W[1, :, 2] = 0
    with torch.no_grad():
        m.experts[0].U = W
    U = m.experts[0].U.detach()
    assert torch.equal(U, U.tril()) and (U.diagonal(dim1=-2, dim2=-1) >= 0).all()
    assert torch.allclose(U @ U.transpose(-1, -2), W @ W.transpose(-1, -2), rtol=1e-10, atol=1e-12)


def test_a_full_covariance_moe_starts_at_the_em_fit_and_matches_the_data_variance():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(10, 4, generator=g, dtype=torch.float64))[0]
    y = torch.cat([torch.randn(300, 4, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5, 0.3]) + 2,
                   torch.randn(300, 4, generator=g, dtype=torch.float64) - 2])
    x = y @ basis.T + 0.1 * torch.randn(600, 10, generator=g, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std()  # centred, unit variance per coordinate on average (as the latent experts' data)
    m = MoEScore(10, 1, 4, n=2, full_cov=True, seed=0).double()
    m.init_from_data(x)
    A = m.A.detach()[0]
    assert (A.T @ basis).svd()[1].min() > 0.95  # the subspace is found
    from molrmog.core.em import fit_mppca

    fit = fit_mppca(x @ A, 2, 4, seed=0)
    e = m.experts[0]
    order = torch.argsort(fit.pi), torch.argsort(e.pi.detach())
    for a, b in zip(*order, strict=True):  # each mode's covariance is the fit's W W^T (stored as a Cholesky factor)
        U = e.U.detach()[b]
        assert torch.allclose(U @ U.T, fit.W[a] @ fit.W[a].T, rtol=1e-6, atol=1e-8)
    gap = m.variance_gap()
    assert gap > 0  # the law lacks the variance off its subspace
    assert m.match_variance() == pytest.approx(gap)
    with torch.no_grad():
        draws = generate(m, 40000, 10, m.schedule, make_grid(m.schedule, 1, "karras"), "exact",
                         generator=torch.Generator().manual_seed(1))
    assert float(draws.var(0).mean()) == pytest.approx(1.0, rel=0.03)
