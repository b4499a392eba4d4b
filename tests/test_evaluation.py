"""Evaluation: image metrics against independent computations, the featurizer, the memorisation
baseline, the denoiser Jacobian, and `molrmog evaluate / analyze jacobian / compare` end to end."""

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from molrmog.cli import main
from molrmog.core import metrics as M
from molrmog.core.distributions import GaussianMixture
from molrmog.core.samplers import generate
from molrmog.core.schedules import make_grid
from molrmog.evaluation.evaluate import denoiser_jacobian, numerical_rank
from molrmog.evaluation.featurizer import get_featurizer
from molrmog.models.experts import GaussianExpert
from molrmog.pipeline.data import DEBIAN_FASHION_DIR, load_dataset
from tests.conftest import tiny

TINY = tiny()


def _gaussian(n, mean, cov_factor, seed):
    g = torch.Generator().manual_seed(seed)
    return mean + torch.randn(n, cov_factor.shape[1], generator=g, dtype=torch.float64) @ cov_factor.T


# --- metrics ----------------------------------------------------------------------------


def test_fid_matches_scipy_sqrtm_and_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(0)
    D = 6
    m1, m2 = torch.zeros(D, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    L1 = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    L2 = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    x, y = _gaussian(200_000, m1, L1, 1), _gaussian(200_000, m2, L2, 2)
    got = M.fid(x, y)
    # same estimator, independent square root (SciPy sqrtm) on the sample moments
    mx, my = x.mean(0).numpy(), y.mean(0).numpy()
    Sx, Sy = np.cov(x.numpy(), rowvar=False), np.cov(y.numpy(), rowvar=False)
    ref = ((mx - my) ** 2).sum() + np.trace(Sx + Sy - 2 * scipy.linalg.sqrtm(Sx @ Sy).real)
    assert got == pytest.approx(ref, rel=1e-6)
    # population closed form: ||m1 - m2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)
    S1, S2 = (L1 @ L1.T).numpy(), (L2 @ L2.T).numpy()
    r1 = scipy.linalg.sqrtm(S1).real
    exact = float(((m1 - m2) ** 2).sum()) + np.trace(S1 + S2 - 2 * scipy.linalg.sqrtm(r1 @ S2 @ r1).real)
    assert got == pytest.approx(exact, rel=0.02)
    assert M.fid(x[:50_000], x[50_000:100_000]) < 0.01 * exact


def test_kid_is_the_unbiased_cubic_kernel_mmd():
    x = _gaussian(300, torch.zeros(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64), 0)
    y = _gaussian(300, 0.5 * torch.ones(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64), 1)
    got = M.kid(x, y, subsets=1, subset_size=300)["mean"]  # one subset of all points: no sampling
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3
    n = x.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    mmd = ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
           - 2 * kxy.mean())
    assert got == pytest.approx(float(mmd), rel=1e-6)
    assert abs(M.kid(x, x.flip(0), subsets=5, subset_size=200)["mean"]) < 0.1 * got


def test_precision_recall_against_a_brute_force_loop():
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(60, 3, generator=g), torch.randn(50, 3, generator=g) + 0.7
    got = M.precision_recall(real, fake, k=3)

    def radii(a):
        return [sorted(float((a[i] - a[j]).norm()) for j in range(len(a)) if j != i)[2] for i in range(len(a))]

    rr, rf = radii(real), radii(fake)
    prec = np.mean([any(float((f - r).norm()) <= rr[j] for j, r in enumerate(real)) for f in fake])
    rec = np.mean([any(float((r - f).norm()) <= rf[j] for j, f in enumerate(fake)) for r in real])
    assert got["precision"] == pytest.approx(prec) and got["recall"] == pytest.approx(rec)
    assert 0 < prec < 1 and 0 < rec < 1
    assert M.precision_recall(real, real + 1e-9) == {"precision": 1.0, "recall": 1.0}
    assert M.precision_recall(real, fake + 100) == {"precision": 0.0, "recall": 0.0}


def test_similarity_scores():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(200, 64, generator=g)
    copies = train[:50] + 1e-4 * torch.randn(50, 64, generator=g)
    fresh = torch.randn(50, 64, generator=g)
    assert M.generalisation_score(copies, train)["score"] == 0.0
    assert M.generalisation_score(copies, train)["mean_nn_similarity"] > 0.999
    assert M.generalisation_score(fresh, train)["score"] > 0.9  # independent in 64-D: cos ~ N(0, 1/64)
    assert M.reproducibility_score(train[:50], copies) == pytest.approx({"score": 1.0, "mean_similarity": 1.0},
                                                                         abs=1e-6)
    assert M.reproducibility_score(fresh, copies)["score"] < 0.1
    assert M.pf_distance(train[:50], train[:50]) == 0.0
    assert M.pf_distance(train[:2], train[:2] + torch.tensor([[3.0] + [0] * 63, [0, 4.0] + [0] * 62])) == \
        pytest.approx(math.sqrt((9 + 16) / 2))


def test_class_score_and_bad_inputs():
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]])
    assert M.class_score(probs, torch.tensor([0, 1, 0])) == pytest.approx((0.9 + 0.7 + 0.5) / 3)
    good = torch.randn(10, 4)
    bad_nan = good.clone()
    bad_nan[3, 1] = float("nan")
    for fn in (M.fid, M.kid, M.precision_recall, M.pf_distance, M.generalisation_score):
        with pytest.raises(ValueError, match="NaN"):
            fn(good, bad_nan)
        with pytest.raises(ValueError, match=r"shape \(N, F\)"):
            fn(good, torch.randn(10, 1, 2, 2))
        with pytest.raises(ValueError, match="width"):
            fn(good, torch.randn(10, 5))
    with pytest.raises(ValueError, match="intended"):
        M.class_score(probs, torch.tensor([0, 2, 0]))
    with pytest.raises(ValueError):
        M.class_score(probs, torch.tensor([0, 1]))


# --- featurizer on real data ------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(featurizer_cache):
    return featurizer_cache


@pytest.fixture(scope="module")
def digits_featurizer(cache):
    return get_featurizer("digits", cache, progress=False)


def test_digits_featurizer_accuracy_fid_sanity_and_class_score(digits_featurizer, cache):
    feat = digits_featurizer
    assert float(feat.test_accuracy) >= 0.98
    info = json.loads((Path(cache) / "featurizer" / "digits" / "featurizer.json").read_text())
    assert info["test_accuracy"] == pytest.approx(float(feat.test_accuracy))
    test = load_dataset("digits", split="test")
    f, probs = feat.embed(test.images)
    acc = float((probs.argmax(1) == test.labels).double().mean())
    assert acc == pytest.approx(float(feat.test_accuracy))
    cs = M.class_score(probs, test.labels)  # a calibrated classifier: mean true-class probability ~ accuracy
    assert cs >= 0.95 and abs(cs - acc) < 0.03

    every = load_dataset("digits", split="all")
    perm = torch.randperm(every.images.shape[0], generator=torch.Generator().manual_seed(1))
    fa, _ = feat.embed(every.images[perm[:800]])
    fb, _ = feat.embed(every.images[perm[800:1600]])
    fid_split = M.fid(fa, fb)
    noise = torch.rand(800, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fid_noise = M.fid(fa, feat.embed(noise)[0])
    blurred = F.avg_pool2d(every.images[perm[800:1600]], 3, 1, 1)  # same digits, degraded
    fid_blur = M.fid(fa, feat.embed(blurred)[0])
    assert fid_split < 0.05 * fid_noise and fid_split < fid_blur
    if Path(DEBIAN_FASHION_DIR).is_dir():  # a different dataset, brought to 8x8
        fashion = load_dataset("fashion-mnist", split="test").images[:800]
        fid_other = M.fid(fa, feat.embed(F.interpolate(fashion, size=8, mode="area"))[0])
        assert fid_split < 0.05 * fid_other
    with pytest.raises(ValueError, match="shape"):
        feat.embed(torch.rand(4, 1, 28, 28))


# --- memorisation baseline and Jacobians ------------------------------------------------


def test_empirical_denoiser_is_the_softmax_over_training_points():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    emp = GaussianMixture.empirical(x)
    xt = 2 * torch.randn(9, 5, generator=g, dtype=torch.float64)
    for t in (0.01, 0.2, 0.9):
        tt = torch.tensor(t, dtype=torch.float64)
        s, gam = emp.schedule.s(tt), emp.schedule.gamma(tt)
        w = torch.softmax(-((xt[:, None] - s * x[None]) ** 2).sum(-1) / (2 * gam**2), 1)
        torch.testing.assert_close(emp.denoise(xt, t), w @ x, rtol=1e-10, atol=1e-10)
        ref_logp = torch.logsumexp(torch.distributions.MultivariateNormal(
            s * x, gam**2 * torch.eye(5, dtype=torch.float64)).log_prob(xt[:, None]) - math.log(40), 1)
        torch.testing.assert_close(emp.log_prob(xt, t), ref_logp, rtol=1e-10, atol=1e-10)
    # the probability-flow ODE of the empirical distribution ends on training points (memorisation)
    sched = emp.schedule
    out = generate(emp.score, 64, 5, sched, make_grid(sched, 40, "karras"), "heun",
                   generator=torch.Generator().manual_seed(1))
    assert torch.cdist(out, x).min(1).values.max() < 1e-3
    assert M.generalisation_score(out, x)["score"] == 0.0


def test_denoiser_jacobian_of_a_gaussian_expert_is_its_closed_form_with_rank_r():
    d, r = 12, 3
    e = GaussianExpert(d, r, seed=0).double()
    u = torch.randn(4, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in (0.05, 0.5):
        J = denoiser_jacobian(e, u, t)
        s, g = e.st(u, t)
        S = (e.U[0] @ e.U[0].T).detach()
        exact = s * S @ torch.linalg.inv(s**2 * S + g**2 * torch.eye(d, dtype=torch.float64))
        torch.testing.assert_close(J, exact.T.expand(4, d, d), rtol=1e-8, atol=1e-10)  # symmetric anyway
        assert all(numerical_rank(sv) == r for sv in torch.linalg.svdvals(J))


# --- end to end -------------------------------------------------------------------------


def test_evaluate_and_jacobian_cli(digits_run, digits_featurizer, cache, capsys):
    assert main(["evaluate", str(digits_run), "--samples", "60", "--reference", "400", "--cache", str(cache),
                 "--no-progress"]) == 0
    res = json.loads((digits_run / "evaluation.json").read_text())
    assert set(res["models"]) == {"test split", "mog", "gaussian", "unet", "memorise"}
    mem = res["models"]["memorise"]
    assert mem["nn_similarity_pixels"] > 0.999 and mem["generalisation_pixels"] == 0.0  # it copies latents
    assert res["models"]["mog"]["parameters"] > 0 and mem["parameters"] == 0
    assert "mog vs memorise" in res["pairs"] and (digits_run / "evaluation_samples.png").is_file()
    for row in res["models"].values():
        assert all(np.isfinite(v) for v in row.values() if isinstance(v, float))

    out = digits_run / "jac"
    assert main(["analyze", "jacobian", str(digits_run), "--t", "0.05,0.5", "--points", "2",
                 "--out", str(out)]) == 0
    jac = json.loads((out / "jacobian.json").read_text())
    assert set(jac["models"]) == {"mog", "gaussian", "unet", "memorise"}
    assert jac["models"]["gaussian"]["0.05"]["rank_max"] <= 4  # --rank 4 (default): rank <= r
    assert (out / "jacobian.png").is_file() and (out / "jacobian.csv").is_file()
    assert main(["analyze", "jacobian", str(digits_run), "--cluster", "99"]) == 2
    assert "--cluster must lie in" in capsys.readouterr().err


def test_compare_cli_writes_the_table(tmp_path, digits_featurizer, cache, monkeypatch):
    import collections

    import molrmog.pipeline.run
    from molrmog.models.vae import ConvVAE

    out = tmp_path / "cmp"
    args = ["compare", "--dataset", "digits", "--out", str(out), "--samples", "40", "--reference", "300",
            "--cache", str(cache), *TINY]
    vae_loads, data_reads = collections.Counter(), collections.Counter()
    load_vae, read = ConvVAE.load.__func__, molrmog.pipeline.run.load_dataset

    def counted_load(cls, path, *a, **k):
        vae_loads[str(path)] += 1
        return load_vae(cls, path, *a, **k)

    def counted_read(spec, **k):
        data_reads[spec, k["split"]] += 1
        return read(spec, **k)

    monkeypatch.setattr(ConvVAE, "load", classmethod(counted_load))
    monkeypatch.setattr(molrmog.pipeline.run, "load_dataset", counted_read)
    monkeypatch.setattr(molrmog.pipeline.run, "_DATA", collections.OrderedDict())  # nothing read by earlier tests
    monkeypatch.setattr(molrmog.pipeline.run, "_OPEN", collections.OrderedDict())
    assert main(args) == 0
    # training (this process: workers 1), evaluation, the exact-sampler rows, reports and panels share one Run
    # per run directory: each VAE is read once, each split of the data once (for both runs)
    assert len(vae_loads) == 11 and max(vae_loads.values()) == 1, vae_loads  # 10 dedicated + 1 unified
    assert data_reads == {("digits", "train"): 1, ("digits", "test"): 1}, data_reads
    res = json.loads((out / "comparison.json").read_text())
    assert list(res["rows"]) == ["MoG expert", "MoG expert, exact sampler (1 step)", "Gaussian expert",
                                 "Gaussian expert, exact sampler (1 step)", "U-Net expert", "MoG expert, unified VAE",
                                 "memorisation baseline", "real test images"]
    one = res["rows"]["MoG expert, exact sampler (1 step)"]  # the learned mixture drawn in one exact step
    assert np.isfinite(one["fid"]) and one["sample_images_per_second"] > 0
    assert one["parameters"] == res["rows"]["MoG expert"]["parameters"]
    assert res["rows"]["MoG expert"]["parameters"] > res["rows"]["Gaussian expert"]["parameters"]
    assert res["rows"]["U-Net expert"]["parameters"] > 10 * res["rows"]["MoG expert"]["parameters"]
    for f in ("comparison.md", "comparison_samples.png", "comparison_losses.png"):
        assert (out / f).is_file()
    weights = out / "dedicated" / "experts" / "mog" / "0" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main(args) == 0  # finished runs are resumed, not retrained
    assert weights.stat().st_mtime_ns == before
    # --draws: re-evaluated only, every row the median of two sets of samples; the first set is the one above
    assert main([*args, "--draws", "2"]) == 0
    assert weights.stat().st_mtime_ns == before
    two = json.loads((out / "comparison.json").read_text())
    assert list(two["rows"]) == list(res["rows"]) and two["draws"] == 2
    for name, row in two["rows"].items():
        assert row["draws"] == 2 and len(row["fid_sets"]) == 2, name
        assert row["fid"] == pytest.approx(statistics.median(row["fid_sets"])), name
        assert (row["fid_min"], row["fid_max"]) == (min(row["fid_sets"]), max(row["fid_sets"]))
        assert row["fid_sets"][0] == pytest.approx(res["rows"][name]["fid"], rel=1e-4), name
        assert row["fid_sets"][1] != pytest.approx(row["fid_sets"][0], rel=1e-4), name  # other noise, other images
    md = (out / "comparison.md").read_text()
    lo, hi = two["rows"]["MoG expert"]["fid_min"], two["rows"]["MoG expert"]["fid_max"]
    assert "2 sets of them (seeds 0-1)" in md and f"({lo:.1f}-{hi:.1f})" in md


def test_compare_continues_with_the_saved_kinds(tmp_path, digits_featurizer, cache):
    # a comparison asked again with only --out (e.g. to re-evaluate it with --draws) reads its run's kinds,
    # not the default ones (which raised KeyError 'mog' before)
    out = tmp_path / "cmp"
    assert main(["train", "--out", str(out / "dedicated"), *tiny(("gaussian",))]) == 0
    assert main(["compare", "--out", str(out), "--no-unified", "--samples", "20", "--reference", "200", "--cache",
                 str(cache), "--no-progress", "--draws", "2"]) == 0
    res = json.loads((out / "comparison.json").read_text())
    assert list(res["rows"]) == ["Gaussian expert", "Gaussian expert, exact sampler (1 step)", "memorisation baseline",
                                 "real test images"]
    assert all(len(r["fid_sets"]) == 2 for r in res["rows"].values())


def test_few_step_analysis_cli(digits_run, digits_featurizer, cache, capsys):
    out = digits_run / "fs"
    assert main(["analyze", "few-step", str(digits_run), "--kinds", "mog,gaussian", "--sampler", "exact", "--steps",
                 "1,2", "--samples", "40", "--reference", "300", "--cache", str(cache), "--out", str(out)]) == 0
    res = json.loads((out / "few_step_exact.json").read_text())
    got = {(r["kind"], r["sampler"], r["steps"]) for r in res["rows"]}
    assert got == {(k, s, n) for k in ("mog", "gaussian") for s, n in (("exact", 1), ("exact", 2), ("heun", 3))}
    assert all(np.isfinite(r["fid"]) and r["images_per_second"] > 0 for r in res["rows"])
    assert (out / "few_step_exact.png").is_file() and (out / "few_step_exact.csv").is_file()
    assert main(["analyze", "few-step", str(digits_run), "--kinds", "unet", "--sampler", "exact", "--steps", "1",
                 "--cache", str(cache), "--out", str(out)]) == 2
    assert "needs a closed-form mixture" in capsys.readouterr().err
