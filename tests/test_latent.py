"""The latent space (issue 18): the VAE's cycle term and the round trip it shortens, on tiny data."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from molrmog.cli import main
from molrmog.models.vae import ConvVAE, recon_nll, roundtrip_ratio, vae_loss
from molrmog.pipeline.config import ADDED_KEYS
from molrmog.pipeline.data import load_dataset
from molrmog.pipeline.stages import load_config
from molrmog.training.train import fit
from tests.conftest import tiny


def test_the_cycle_term_is_the_elbo_plus_the_weighted_round_trip_of_the_posterior_draw():
    x = load_dataset("digits").images[:16]
    vae = ConvVAE((1, 8, 8), (2, 4, 4), 8, beta=0.1, seed=0)
    plain = vae_loss(vae, x, torch.Generator().manual_seed(3))
    with_cycle = vae_loss(vae, x, torch.Generator().manual_seed(3), cycle=2.5)
    # the same draw by hand: z = mean + sigma eps; the cycle term is 2.5 ||E(sigmoid(D(z))) - z||^2 per image
    mean, logvar = vae.encode(x)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    rec = F.binary_cross_entropy_with_logits(vae.decode(z), x, reduction="sum") / 16
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum() / 16
    back = vae.encode(torch.sigmoid(vae.decode(mean)))[0]  # the cycle is taken at the encoder mean
    torch.testing.assert_close(plain, rec + 0.1 * kl)
    torch.testing.assert_close(with_cycle, rec + 0.1 * kl + 2.5 * (back - mean).pow(2).sum() / 16)
    back = vae.encode(torch.sigmoid(vae.decode(z)))[0]
    ratio = roundtrip_ratio(vae, z.detach(), mean.mean(0))
    expected = (back - z).flatten(1).norm(dim=1) / (z - mean.mean(0)).flatten(1).norm(dim=1)
    torch.testing.assert_close(ratio, expected.detach())


@pytest.mark.parametrize("recon", ["bernoulli", "normal", "laplace"])
def test_each_reconstruction_likelihood_is_the_log_density_torch_distributions_gives(recon):
    from torch.distributions import Bernoulli, Laplace, Normal

    x = load_dataset("digits").images[:6]
    vae = ConvVAE((1, 8, 8), (2, 4, 4), 8, beta=0.1, seed=0, recon=recon)
    logits = vae.decode(torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(1)))
    if recon == "bernoulli":
        law = Bernoulli(logits=logits, validate_args=False)  # grey pixels: the cross-entropy, as VAEs use it
    else:
        with torch.no_grad():  # a scale that differs per pixel, so a mix-up of pixels would show
            vae.log_scale.copy_(torch.linspace(-3, 0.5, 64).view(1, 8, 8))
        law = (Normal if recon == "normal" else Laplace)(torch.sigmoid(logits), vae.log_scale.exp())
    torch.testing.assert_close(recon_nll(vae, logits, x), -law.log_prob(x).sum() / 6)


def test_a_learned_pixel_scale_trains_saves_and_loads(tmp_path):
    data = load_dataset("digits")
    x = data.images[data.labels == 3]
    vae = ConvVAE((1, 8, 8), (2, 4, 4), 16, beta=0.1, seed=0, recon="laplace")
    before = vae.log_scale.detach().clone()

    def loss_fn(m, gen):
        return vae_loss(m, x[torch.randint(0, x.shape[0], (64,), generator=gen)], gen)

    fit(vae, loss_fn, steps=150, lr=3e-3, seed=0, progress=False)
    # the scale follows the pixel errors: smaller where the digit's pixels are predictable (the border)
    err = (vae.eval().reconstruct(x) - x).abs().mean(0).detach()
    assert not torch.equal(vae.log_scale.detach(), before)
    assert torch.corrcoef(torch.stack([vae.log_scale.detach().flatten(), err.flatten().log()]))[0, 1] > 0.5
    vae.save(tmp_path / "v")
    back = ConvVAE.load(tmp_path / "v", "VAE")
    assert back.recon == "laplace" and torch.equal(back.log_scale, vae.log_scale)


def _trained(cycle: float) -> tuple[ConvVAE, torch.Tensor]:
    data = load_dataset("digits")
    x = data.images[data.labels == 3]
    vae = ConvVAE((1, 8, 8), (2, 4, 4), 16, beta=0.1, seed=0)

    def loss_fn(m, gen):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        return vae_loss(m, x[idx], gen, cycle=cycle)

    fit(vae, loss_fn, steps=300, lr=3e-3, seed=0, progress=False)
    return vae.eval(), x


def test_the_cycle_term_shrinks_the_round_trip_of_generated_latents():
    ratios, recon = {}, {}
    for cycle in (0.0, 10.0):
        vae, x = _trained(cycle)
        with torch.no_grad():
            z = vae.encode(x)[0].flatten(1)
            recon[cycle] = float(F.mse_loss(vae.reconstruct(x), x))
        # what an expert generates, stood in for by the Gaussian fit of the cluster's latents
        chol = torch.linalg.cholesky(torch.cov(z.T) + 1e-4 * torch.eye(z.shape[1]))
        draws = z.mean(0) + torch.randn(256, z.shape[1], generator=torch.Generator().manual_seed(0)) @ chol.T
        ratios[cycle] = [float(roundtrip_ratio(vae, v.view(-1, 2, 4, 4), z.mean(0)).median()) for v in (z, draws)]
    assert ratios[10.0][0] < 0.7 * ratios[0.0][0], ratios  # the latents it was trained to invert
    assert ratios[10.0][1] < 0.9 * ratios[0.0][1], ratios  # and draws around them
    assert recon[10.0] < 1.5 * recon[0.0], recon  # inverting costs little reconstruction


@pytest.fixture(scope="module")
def cycle_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("latent") / "run"
    assert main(["train", "--dataset", "digits", "--out", str(out), *tiny(("mog", "unet")), "--vae-cycle", "5",
                 "--vae-recon", "normal"]) == 0
    return out


def test_analyze_roundtrip_reports_every_cluster_and_source(cycle_run, tmp_path, capsys):
    from molrmog.pipeline.run import Run

    assert load_config(cycle_run).vae_cycle == 5.0 and Run.load(cycle_run).vae(0).recon == "normal"
    out = tmp_path / "rt"
    assert main(["analyze", "roundtrip", str(cycle_run), "--samples", "16", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "roundtrip.json").read_text())
    assert (out / "roundtrip.png").is_file() and (out / "roundtrip.csv").is_file()
    assert set(res["median_over_clusters"]) == {"mog", "unet", "training latents"}
    assert len(res["rows"]) == 3 * 10 and all(r["ratio_median"] >= 0 for r in res["rows"])
    assert {r["sampler"] for r in res["rows"] if r["source"] == "mog"} == {"exact-1"}
    capsys.readouterr()
    assert main(["analyze", "roundtrip", str(cycle_run), "--samples", "1", "--out", str(out)]) == 2
    assert "--samples must lie in [2, 100000]" in capsys.readouterr().err


def test_a_run_written_before_a_setting_existed_loads_as_it_was_trained(cycle_run, tmp_path):
    raw = json.loads((cycle_run / "config.json").read_text())
    for key in ADDED_KEYS:
        raw.pop(key)
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(raw))
    cfg = load_config(run)
    assert all(getattr(cfg, k) == (v(raw) if callable(v) else v) for k, v in ADDED_KEYS.items())
    assert cfg.vae_cycle == 0.0 and cfg.vae_recon == "bernoulli"
    assert cfg.lora_steps == cfg.vae_steps == 16  # LoRA adapters trained as long as the VAEs before --lora-steps


# --- ring-key watermarks (Tree-Ring / Shallow Diffuse) -----------------------------------------------------


def test_the_ring_key_is_constant_on_rings_and_a_marked_latent_carries_it_exactly():
    from molrmog.applications.watermark import _inject_ring, ring_distance, ring_key

    latent = (2, 8, 8)
    mask, values = ring_key("k", latent)
    yy, xx = torch.meshgrid(torch.arange(8) - 4, torch.arange(8) - 4, indexing="ij")
    r2 = yy**2 + xx**2
    assert torch.equal(mask, r2 <= 4)  # radius 8 // 4 = 2 around the centre of the shifted spectrum
    for lo, hi in ((0, 1), (2, 4)):  # ring 1 (centre included) and ring 2 each hold one value
        ring = values[(r2 >= lo) & (r2 <= hi)]
        assert torch.allclose(ring, ring[0].expand_as(ring)) and ring.abs().min() > 0
    assert not torch.equal(ring_key("other", latent)[1], values)
    u = torch.randn(5, 128, dtype=torch.float64)
    marked = _inject_ring(u, latent, 0, mask, values)
    assert ring_distance(marked, latent, "k").max() < 1e-9 < ring_distance(u, latent, "k").min()
    torch.testing.assert_close(marked.view(5, 2, 8, 8)[:, 1], u.view(5, 2, 8, 8)[:, 1])  # channel 1 untouched
    # the spectrum outside the disk is untouched too
    F_u, F_m = (torch.fft.fftshift(torch.fft.fft2(x.view(5, 2, 8, 8)[:, 0]), dim=(-2, -1)) for x in (u, marked))
    torch.testing.assert_close(F_m[:, ~mask], F_u[:, ~mask])
    # a mix moves the disk's spectrum that fraction of the way: the distance shrinks by exactly 1 - mix, the
    # latent stays real (the key is symmetric on the disk) and changes by mix x the full key's change
    for mix in (0.25, 0.6):
        part = _inject_ring(u, latent, 0, mask, values, mix=mix)
        torch.testing.assert_close(ring_distance(part, latent, "k"), (1 - mix) * ring_distance(u, latent, "k"))
        torch.testing.assert_close(part - u, mix * (marked - u))


def test_ring_watermarks_separate_marked_from_clean_on_a_tiny_run(cycle_run, tmp_path, capsys):
    import numpy as np

    out = tmp_path / "wm"
    assert main(["watermark", "embed", str(cycle_run), "--method", "ring", "--n", "24", "--out", str(out),
                 "--no-progress"]) == 0
    key = json.loads((out / "key.json").read_text())
    assert key["method"] == "ring"
    from molrmog.applications.watermark import detection_scores, embed, latent_scores, roc
    from molrmog.pipeline.run import Run

    run = Run.load(cycle_run)
    vaes, experts = run.vaes(), run.experts("mog")
    marked, clean, _, u_m, u_c = embed(experts[0], vaes[0], 24, "12345", method="ring", latents=True, seed=5)
    s_m, s_c = (latent_scores(experts[0], u, "12345", method="ring") for u in (u_m, u_c))
    assert s_m.min() > s_c.max()  # from the latents the key separates every marked from every clean draw
    # from images (encoder mean, decoder inversion, ODE back to t_w): MAP under the expert's law (the default) and
    # least squares both separate most of them on this tiny run (AUC 0.83 and 0.95 here; README: on the trained
    # digits and Fashion-MNIST runs MAP is the better one)
    for how in ({}, {"invert_sigma": 0.0}):  # the default (MAP), least squares
        d_m, d_c = (detection_scores(experts[0], vaes[0], x, "12345", method="ring", **how) for x in (marked, clean))
        assert roc(d_c, d_m)["auc"] > 0.75
    np.save(tmp_path / "clean.npy", clean.numpy())
    capsys.readouterr()
    for images in (out / "watermarked.npy", tmp_path / "clean.npy"):
        assert main(["watermark", "detect", str(cycle_run), "--images", str(images), "--out", str(out),
                     "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 48 and all(len(line.split("\t")) == 3 for line in lines)


def test_white_noise_like_spends_each_marks_mse_on_clipped_white_noise():
    from molrmog.applications.watermark import white_noise_like

    g = torch.Generator().manual_seed(0)
    clean = torch.rand(6, 1, 8, 8, generator=g)
    clean[:3, :, :4] = 0.0  # a black background: noise below 0 is clipped away, so the scale must grow
    mark = 0.03 * torch.randn(6, 1, 8, 8, generator=g) * torch.arange(1, 7).view(-1, 1, 1, 1)
    marked = (clean + mark).clamp(0, 1)
    noisy = white_noise_like(clean, marked, torch.Generator().manual_seed(1))
    mse = lambda x: (x - clean).pow(2).flatten(1).mean(1)  # noqa: E731
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert torch.allclose(mse(noisy), mse(marked), rtol=1e-4)
    change = (noisy - clean).flatten(1)
    assert (change - (marked - clean).flatten(1)).abs().max() > 0.01  # not the mark itself
    assert torch.equal(white_noise_like(clean, clean.clone()), clean)  # no change, no noise


def test_watermark_evaluate_measures_the_fid_change_on_its_own_larger_sets(cycle_run, featurizer_cache, tmp_path):
    from molrmog.applications.watermark import embed, white_noise_like
    from molrmog.evaluation.evaluate import image_scores, reference_features
    from molrmog.evaluation.featurizer import get_featurizer
    from molrmog.pipeline.run import Run, cluster_seed

    out = tmp_path / "wm-eval"
    assert main(["watermark", "evaluate", str(cycle_run), "--method", "ring", "--n", "4", "--invert-steps", "2",
                 "--fid-samples", "40", "--draws", "2", "--cache", str(featurizer_cache), "--out", str(out),
                 "--no-progress"]) == 0
    res = json.loads((out / "watermark.json").read_text())
    assert res["fid_samples"] == 40 and len(res["fid_change_sets"]) == 2 and (out / "watermark.md").is_file()
    assert res["fid_change"] == pytest.approx(sum(res["fid_change_sets"]) / 2)  # the median of two sets
    # the second set by hand: 40 draws of clusters by weight with seed 1, each cluster's marked and clean images
    # from the same noise (seed cluster_seed(1, k)), FID of each against the run's reference features
    r = Run.load(cycle_run)
    counts = torch.bincount(torch.multinomial(r.weights, 40, True, generator=torch.Generator().manual_seed(1)),
                            minlength=r.K)
    pairs = [embed(r.expert("mog", k), r.vae(k), int(c), "12345", seed=cluster_seed(1, k))[:2]
             for k, c in enumerate(counts.tolist()) if c]
    feat = get_featurizer("digits", featurizer_cache, progress=False)
    ref = reference_features(r, feat, 10000, 0)
    marked, clean = (torch.cat([p[j] for p in pairs]) for j in (0, 1))
    noisy = white_noise_like(clean, marked, torch.Generator().manual_seed(1))
    fid = [image_scores(feat.embed(x)[0], ref)["fid"] for x in (marked, clean, noisy)]
    assert res["fid_change_sets"][1] == pytest.approx(fid[0] - fid[1], rel=1e-6, abs=1e-9)
    assert res["fid_change_white_noise_sets"][1] == pytest.approx(fid[2] - fid[1], rel=1e-6, abs=1e-9)
    assert "white Gaussian noise" in (out / "watermark.md").read_text()
    assert res["fid_change_sets"][0] != res["fid_change_sets"][1]  # the sets are different draws
    from molrmog.applications.watermark import evaluate_watermark
    from molrmog.core.errors import MolrmogError

    for bad in ({"fid_samples": 1}, {"fid_samples": 2.5}, {"draws": 0}):  # refused before anything is computed
        with pytest.raises(MolrmogError, match="fid_samples|draws"):
            evaluate_watermark(cycle_run, out=tmp_path / "never", **bad)
    assert not (tmp_path / "never").exists()


def test_the_key_fit_with_the_key_held_reaches_the_marked_image_from_the_clean_images_noise(cycle_run):
    """key_fit at lr 0 is the error of its start: from a clean image's own latent at t_w the free fit is exact
    and the held fit (the disk replaced by the key) makes the marked image from the same noise, so its error is
    the RMS difference between the marked and the clean image that `embed` returned."""
    from molrmog.applications.editing import edit_time, ode
    from molrmog.applications.watermark import embed, key_fit
    from molrmog.pipeline.run import Run

    run = Run.load(cycle_run)
    e, v = run.expert("mog", 0), run.vae(0)
    marked, clean, _ = embed(e, v, 6, "k", seed=3)
    sched = e.schedule  # embed's noise at t_w, as embed draws it
    u_T = float(sched.gamma(torch.tensor(sched.t_max))) * torch.randn(6, e.shift.numel(),
                                                                        generator=torch.Generator().manual_seed(3))
    u_w = ode(e, u_T, sched.t_max, edit_time(sched, 0.3), sched, 40)
    free = key_fit(e, v, clean, u_w, steps=1, ode_steps=40, lr=0.0)
    held = key_fit(e, v, clean, u_w, "k", steps=1, ode_steps=40, lr=0.0)
    rms = (marked - clean).pow(2).flatten(1).mean(1).sqrt()
    assert free.max() < 1e-4 and rms.min() > 1e-3
    torch.testing.assert_close(held, rms, rtol=1e-3, atol=1e-5)
    # with steps the held fit moves towards the clean image (the prior at t_w is weak at sigma 0.01); the
    # parameters of the VAE and the expert are left trainable afterwards
    start = key_fit(e, v, clean, u_w, "k", steps=1, ode_steps=10, lr=0.0)
    moved = key_fit(e, v, clean, u_w, "k", steps=30, ode_steps=10)
    assert (moved < start).float().mean() >= 5 / 6 and moved.median() < 0.8 * start.median()
    assert all(p.requires_grad for m in (e, v) for p in m.parameters())


def test_analyze_key_bound_reports_each_attack_and_the_keys_own_size(cycle_run, tmp_path, capsys):
    from molrmog.applications.watermark import embed
    from molrmog.pipeline.run import Run, cluster_seed

    out = tmp_path / "kb"
    assert main(["analyze", "key-bound", str(cycle_run), "--n", "4", "--fit-steps", "3", "--attacks",
                 "none,gaussian_noise", "--cluster", "1", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "key_bound.json").read_text())
    assert [a["attack"] for a in res["attacks"]] == ["none", "gaussian_noise"]
    for name in ("key_bound.md", "key_bound.csv", "key_bound.png"):
        assert (out / name).is_file()
    for a in res["attacks"]:
        assert all(a[k] >= 0 and math.isfinite(a[k]) for k in ("excess_marked", "excess_clean")) and 0 <= a["auc"] <= 1
    assert res["attacks"][0]["attack_rms_marked"] == 0 and res["attacks"][1]["attack_rms_marked"] > 0.01
    run = Run.load(cycle_run)  # the key's own size: marked against clean from the same noise, as embed makes them
    marked, same, _ = embed(run.expert("mog", 1), run.vae(1), 4, "12345", seed=cluster_seed(0, 1))
    assert res["key_rms"] == pytest.approx(float((marked - same).pow(2).flatten(1).mean(1).sqrt().median()), rel=1e-5)


def test_decoder_inversion_finds_a_latent_the_decoder_maps_to_the_image():
    from molrmog.applications.watermark import invert_decoder

    vae, x = _trained(10.0)
    with torch.no_grad():
        z = vae.encode(x[:32])[0].flatten(1)
        z_true = z + 0.3 * z.std(0) * torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
        images = torch.sigmoid(vae.decode(z_true))  # images the decoder made from known latents
        z0 = vae.encode(images)[0].flatten(1)
    vae.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    z_inv = invert_decoder(vae, images, z0, steps=300)
    with torch.no_grad():
        err0, err = ((torch.sigmoid(vae.decode(v)) - images).pow(2).sum() for v in (z0, z_inv))
    assert err < 0.2 * err0, (float(err), float(err0))
    assert (z_inv - z_true).norm() < (z0 - z_true).norm()
    assert all(torch.equal(p, before[n]) and p.requires_grad and p.grad is None for n, p in vae.named_parameters())


def test_map_decoder_inversion_is_the_map_latent_and_the_prior_decides_the_blind_directions():
    """A decoder that sees 3 of 6 latent dims: least squares leaves the blind ones where the encoder put them;
    MAP inversion (the expert's law as the prior, in its standardised coordinates) reaches the optimum SciPy
    finds for the same objective, blind directions at the prior's mode."""
    import numpy as np
    from scipy.optimize import minimize

    from molrmog.applications.watermark import invert_decoder
    from molrmog.core.errors import MolrmogError

    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 3, generator=g, dtype=torch.float64)
    shift = torch.randn(6, generator=g, dtype=torch.float64)
    scale = 0.5 + torch.rand(6, generator=g, dtype=torch.float64)

    class Decoder(torch.nn.Module):  # logits of 8 "pixels" from the first 3 latent dims only
        def __init__(self):
            super().__init__()
            self.W = torch.nn.Parameter(W.clone())

        def decode(self, z):
            return z[:, :3] @ self.W.T

    class Expert:  # a standard normal law in u = (z - shift) / scale: score -u at every t
        class schedule:
            t_min = 1e-3

        def standardise(self, z):
            return (z - shift) / scale

        def unstandardise(self, u):
            return u * scale + shift

        def __call__(self, u, t):
            return -u

    dec, expert, sigma = Decoder(), Expert(), 0.05
    z_true = expert.unstandardise(torch.randn(4, 6, generator=g, dtype=torch.float64))
    with torch.no_grad():
        images = torch.sigmoid(dec.decode(z_true))
    z0 = z_true + 2.0 * scale  # the encoder's guess, off by two standard deviations in every direction
    z_ls = invert_decoder(dec, images, z0, steps=2000)
    z_map = invert_decoder(dec, images, z0, steps=4000, lr=0.01, expert=expert, sigma=sigma)
    torch.testing.assert_close(z_ls[:, 3:], z0[:, 3:])  # blind: least squares never moves them
    for i in range(4):  # the same MAP objective, solved by SciPy from the truth
        x = images[i].numpy()

        def f(z, x=x):
            r = 1 / (1 + np.exp(-(W.numpy() @ z[:3]))) - x
            return (r @ r) / (2 * sigma**2) + 0.5 * (((z - shift.numpy()) / scale.numpy()) ** 2).sum()

        best = minimize(f, z_true[i].numpy(), method="BFGS", options={"gtol": 1e-10}).x
        np.testing.assert_allclose(z_map[i].numpy(), best, atol=2e-3)
        np.testing.assert_allclose(best[3:], shift[3:].numpy(), atol=1e-6)  # the prior's mode where pixels are blind
    with pytest.raises(MolrmogError, match="needs sigma > 0 and the expert"):
        invert_decoder(dec, images, z0, steps=1, sigma=0.1)
    assert all(p.requires_grad and p.grad is None for p in dec.parameters())


def test_keys_written_before_a_setting_existed_keep_their_meaning_and_bad_values_are_refused():
    from molrmog.applications.watermark import check_key
    from molrmog.core.errors import MolrmogError

    old = {"key": "1", "kind": "mog", "cluster": 0, "t": 0.3, "threshold": 0.1}
    checked = check_key(dict(old), "key.json", "mog", 10)
    # what detection did when it was written: no decoder inversion, and least squares without a prior
    assert checked["method"] == "null" and checked["invert_steps"] == 0 and checked["invert_sigma"] == 0
    for bad, message in (({"method": "rings"}, "method must be one of"), ({"invert_steps": -1}, "invert_steps"),
                         ({"invert_steps": 1.5}, "invert_steps"), ({"invert_sigma": -0.1}, "invert_sigma"),
                         ({"invert_sigma": "0.1"}, "invert_sigma"), ({"invert_sigma": True}, "invert_sigma")):
        with pytest.raises(MolrmogError, match=message):
            check_key({**old, **bad}, "key.json", "mog", 10)


# --- decoder watermarks (Stable Signature) --------------------------------------------------------------------


def test_the_key_bits_and_the_statistic_are_the_extractors_agreement_with_them():
    from molrmog.applications.signature import Extractor, bit_accuracy, key_bits, scores

    m = key_bits("k", 24)
    assert m.shape == (24,) and set(m.tolist()) <= {0.0, 1.0} and torch.equal(m, key_bits("k", 24))
    assert not torch.equal(m, key_bits("other", 24))
    W = Extractor((1, 8, 8), 24, width=4, seed=1).eval()
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = W(x)
    torch.testing.assert_close(scores(W, "k", x), ((2 * m - 1) * logits).mean(1))
    torch.testing.assert_close(bit_accuracy(W, "k", x), ((logits > 0).float() == m).float().mean(1))


def test_luminance_masking_makes_a_change_on_a_dark_background_cost_more_than_on_the_object():
    from molrmog.applications.signature import visibility

    clean = torch.zeros(1, 1, 8, 8)
    clean[..., :, 4:] = 0.8  # dark left half, bright right half
    dark, bright = torch.zeros_like(clean), torch.zeros_like(clean)
    dark[..., 3, 1], bright[..., 3, 6] = 0.1, 0.1  # the same change, one pixel each
    assert visibility(dark, clean, 0.0) == visibility(bright, clean, 0.0) == dark.pow(2).mean()  # plain MSE
    assert visibility(dark, clean, 0.1) > 10 * visibility(bright, clean, 0.1)
    # on a uniform image every weight is 1: the MSE again
    flat = torch.full_like(clean, 0.3)
    torch.testing.assert_close(visibility(dark, flat, 0.1), dark.pow(2).mean())


def test_the_smooth_image_loss_charges_fine_detail_and_leaves_a_smooth_change_at_its_mse():
    from molrmog.applications.signature import Extractor, extractor_dir, visibility

    clean = torch.full((1, 1, 8, 8), 0.4)
    checker = 0.1 * (-1.0) ** (torch.arange(8).view(-1, 1) + torch.arange(8).view(1, -1)).expand(1, 1, 8, 8)
    flat = torch.full_like(clean, 0.1)  # the same MSE as the checkerboard, no detail at all
    k = torch.exp(-torch.arange(-2.0, 3.0) ** 2 / 2)
    a = float((k * (-1.0) ** torch.arange(5)).sum() / k.sum()) ** 2  # a unit-sigma blur keeps a times a checkerboard
    mse = checker.pow(2).mean()
    torch.testing.assert_close(visibility(checker, clean, 0.0, 10.0), mse * (1 + 10 * (1 - a) ** 2))
    torch.testing.assert_close(visibility(flat, clean, 0.0, 10.0), mse)
    torch.testing.assert_close(visibility(checker, clean, 0.0, 0.0), mse)  # smooth 0: the MSE
    torch.testing.assert_close(visibility(checker, clean, 0.1, 10.0), mse * (1 + 10 * (1 - a) ** 2))  # flat: w = 1
    W = Extractor((1, 8, 8), 8, width=4, smooth=10.0)
    assert W.config["smooth"] == 10.0
    assert extractor_dir("o", 16, 2000, 36, 0).name == "extractor-16b-2000s-36dB-weber0-seed0"  # as before
    assert extractor_dir("o", 16, 2000, 36, 0, 0.1, 10).name == "extractor-16b-2000s-36dB-weber0.1-smooth10-seed0"


def test_training_attacks_are_the_evaluated_attacks_made_differentiable():
    from molrmog.applications.attacks import ATTACKS, attack, jpeg
    from molrmog.applications.signature import train_attack

    vae = ConvVAE((1, 8, 8), (2, 4, 4), 8, seed=0)
    x = load_dataset("digits").images[:6].clone().requires_grad_(True)
    for name in ATTACKS:
        g = torch.Generator().manual_seed(2)
        y = train_attack(x, vae, g, [name])
        (grad,) = torch.autograd.grad(y.sum(), x)
        assert y.shape == x.shape and grad.abs().sum() > 0, name  # a gradient reaches the image under every attack
    # JPEG is straight-through: the forward pass is the real JPEG at the drawn quality, the gradient the identity
    g = torch.Generator().manual_seed(4)
    y = train_attack(x, vae, g, ["jpeg"])
    g = torch.Generator().manual_seed(4)
    torch.randint(1, (), generator=g)  # the draw of the attack's name
    q = int(50 + 40 * float(torch.rand((), generator=g)))
    torch.testing.assert_close(y.detach(), jpeg(x.detach(), q))
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], torch.ones_like(x))
    # the VAE round trip is the evaluated one, through the same (clean) VAE
    torch.testing.assert_close(train_attack(x, vae, g, ["vae_reencode"]).detach(), attack("vae_reencode", x, vae))


def test_a_marked_decoder_is_held_at_its_psnr_and_leaves_the_clean_vae_as_it_was():
    from molrmog.applications.signature import Extractor, mark_decoder

    vae = ConvVAE((1, 8, 8), (2, 4, 4), 8, seed=0)
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    W = Extractor((1, 8, 8), 8, width=4, seed=1).eval()
    z = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    def psnr_of(marked):
        with torch.no_grad():
            mse = (torch.sigmoid(marked.decode(z)) - torch.sigmoid(vae.decode(z))).pow(2).mean()
        return -10 * math.log10(float(mse))

    for psnr in (30.0, 45.0):
        marked, facts = mark_decoder(W, "k", vae, z, steps=40, psnr=psnr, lr=1e-2)
        assert psnr - 1e-3 <= psnr_of(marked) < 80 and facts["psnr_latents"] == pytest.approx(psnr_of(marked))
        assert 0 <= facts["interpolation"] <= 1
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in vae.named_parameters())
    # the guard: a decoder further from the clean one than the PSNR allows is moved back along the straight
    # line of parameters, to the PSNR (bisection) -- not to the clean decoder
    from molrmog.applications.signature import _hold_psnr

    with torch.no_grad():
        for p in marked.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    far = psnr_of(marked)
    facts = _hold_psnr(marked, vae, z, far + 10)
    assert 0 < facts["interpolation"] < 1 and psnr_of(marked) == pytest.approx(far + 10, abs=0.05)


def _detect_calls(run, out, tmp_path, capsys) -> None:
    """`watermark detect` with OUT/key.json calls at least 80% of OUT/watermarked.npy (24 images) watermarked and
    of tmp_path/clean.npy (32) clean."""
    capsys.readouterr()
    for images, word in ((out / "watermarked.npy", "watermarked"), (tmp_path / "clean.npy", "clean")):
        assert main(["watermark", "detect", str(run), "--images", str(images), "--out", str(out)]) == 0
        calls = [line.split("\t")[2] for line in capsys.readouterr().out.strip().splitlines()]
        assert len(calls) == (24 if word == "watermarked" else 32) and calls.count(word) >= 0.8 * len(calls)


def _refuses_a_key_without_its_folder(run, key: dict, field: str, tmp_path, capsys) -> None:
    """A key file whose `field` (the extractor's or detector's folder) leaves its folder or is empty: exit 2,
    the message naming it."""
    for bad in ({field: "../elsewhere"}, {field: ""}):
        (tmp_path / "bad.json").write_text(json.dumps({**key, **bad}))
        assert main(["watermark", "detect", str(run), "--images", str(tmp_path / "clean.npy"),
                     "--keyfile", str(tmp_path / "bad.json")]) == 2
        assert field in capsys.readouterr().err


def test_decoder_watermarks_separate_marked_from_clean_on_a_tiny_run(cycle_run, tmp_path, capsys):
    import numpy as np

    from molrmog.applications.signature import scores
    from molrmog.applications.watermark import embed, roc
    from molrmog.core.errors import MolrmogError

    out = tmp_path / "wm-dec"
    fast = ["--method", "decoder", "--bits", "16", "--extractor-steps", "400", "--mark-steps", "150", "--psnr", "30",
            "--smooth", "1"]
    assert main(["watermark", "embed", str(cycle_run), *fast, "--n", "24", "--cluster", "2", "--out", str(out),
                 "--no-progress"]) == 0
    key = json.loads((out / "key.json").read_text())
    assert key["method"] == "decoder" and key["bits"] == 16 and (out / key["extractor"] / "config.json").is_file()
    assert key["smooth"] == 1 and "-smooth1-" in key["extractor"]  # the option reaches the image loss's owners
    assert not (out / key["extractor"] / "checkpoint.safetensors").exists()  # the training's checkpoint is gone
    assert key["mark"]["psnr_latents"] >= 30 - 1e-3 and (out / key["marked_vae"]).is_file()
    from molrmog.applications.signature import Extractor
    from molrmog.pipeline.run import Run

    run = Run.load(cycle_run)
    W = Extractor.load(out / key["extractor"])
    vae = run.vae(2)
    import copy

    from safetensors.torch import load_file

    marked_vae = copy.deepcopy(vae)  # the run's VAE with the saved marked weights
    marked_vae.load_state_dict(load_file(out / key["marked_vae"]))
    assert not torch.equal(marked_vae.decoder[0].weight, vae.decoder[0].weight)
    marked, clean, _ = embed(run.expert("mog", 2), vae, 32, "12345", method="decoder", marked_vae=marked_vae, seed=9)
    assert roc(scores(W, "12345", clean), scores(W, "12345", marked))["auc"] > 0.9
    np.save(tmp_path / "clean.npy", clean.numpy())
    _detect_calls(cycle_run, out, tmp_path, capsys)
    _refuses_a_key_without_its_folder(cycle_run, key, "extractor", tmp_path, capsys)
    with pytest.raises(MolrmogError, match="marked VAE"):
        embed(run.expert("mog", 2), vae, 2, "k", method="decoder")


def test_the_key_field_is_drawn_from_the_key_smooth_as_asked_and_of_unit_rms():
    from molrmog.applications.fieldmark import key_field
    from molrmog.core.errors import MolrmogError

    f = key_field("k", (1, 28, 28), 1.0)
    assert f.shape == (1, 1, 28, 28) and torch.equal(f, key_field("k", (1, 28, 28), 1.0))
    assert not torch.allclose(f, key_field("other", (1, 28, 28), 1.0))
    for sigma in (0.0, 1.0, 3.0):
        torch.testing.assert_close(key_field("k", (3, 28, 28), sigma).pow(2).mean(), torch.tensor(1.0))

    def neighbour_correlation(g):  # of horizontally adjacent pixels
        a, b = g[..., :, :-1].flatten(), g[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    white, smooth, smoother = (key_field(k, (1, 64, 64), s) for k, s in (("a", 0.0), ("b", 1.0), ("c", 3.0)))
    # white noise: uncorrelated; a Gaussian blur of std s: correlation exp(-1 / (4 s^2)) (0.78 at 1, 0.97 at 3)
    assert abs(neighbour_correlation(white)) < 0.05
    assert neighbour_correlation(smooth) == pytest.approx(math.exp(-1 / 4), abs=0.05)
    assert neighbour_correlation(smoother) == pytest.approx(math.exp(-1 / 36), abs=0.02)
    with pytest.raises(MolrmogError, match="sigma"):
        key_field("k", (1, 8, 8), -1.0)


def test_the_field_strength_sets_every_images_psnr_and_the_mark_is_the_clipped_product():
    from molrmog.applications.fieldmark import CAP, apply_field, key_field, mark_images, strengths
    from molrmog.core.errors import MolrmogError

    x = torch.cat([load_dataset("digits").images[:64], torch.zeros(1, 1, 8, 8), torch.full((1, 1, 8, 8), 1e-3)])
    f = key_field("k", (1, 8, 8))
    eps = {p: strengths(x, f, p) for p in (30.0, 40.0)}
    for p, e in eps.items():
        psnr = -10 * torch.log10((apply_field(x, f, e) - x).pow(2).flatten(1).mean(1).clamp_min(1e-12))
        reached = e < CAP
        assert reached[:64].all() and not reached[64:].any()  # black and nearly black images: the cap
        assert (psnr[:64] >= p).all() and psnr[:64].max() < p + 0.01  # every image at the PSNR, from above
        assert (psnr[64:] > p).all()
        torch.testing.assert_close(mark_images(x, f, p), apply_field(x, f, e))
    assert (eps[40.0][:64] < eps[30.0][:64]).all()
    e = torch.rand(len(x))
    torch.testing.assert_close(apply_field(x, f, e), (x * (1 + e[:, None, None, None] * f)).clamp(0, 1))
    torch.testing.assert_close(apply_field(x, f, 0.5), (x * (1 + 0.5 * f)).clamp(0, 1))
    assert torch.equal(apply_field(torch.zeros(2, 1, 8, 8), f, 0.5), torch.zeros(2, 1, 8, 8))  # black stays black
    with pytest.raises(MolrmogError, match="PSNR"):
        strengths(x, f, 5.0)


def test_the_field_detector_is_the_correlation_of_its_map_with_the_field_and_keeps_it(tmp_path):
    from molrmog.applications.fieldmark import FieldDetector, key_field

    f = key_field("k", (1, 8, 8))
    D = FieldDetector((1, 8, 8), width=4, seed=1)
    D.field.copy_(f)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        D.a.fill_(2.0)
        D.b.fill_(-0.5)
        m = D.net(2 * x - 1)  # the map: one value per pixel, at its place
        assert m.shape == (5, 1, 8, 8)
        want = torch.tensor([2.0 * float((m[i, 0] * f[0, 0]).sum()) / 8 - 0.5 for i in range(5)])
        torch.testing.assert_close(D(x), want)
        shifted = torch.roll(x, 1, dims=3)  # a map that moves with the image: not the same correlation
        assert not torch.allclose(D(shifted), D(x))
    D.save(tmp_path / "d")
    back = FieldDetector.load(tmp_path / "d")
    assert torch.equal(back.field, f)
    torch.testing.assert_close(back(x), D(x))


@pytest.mark.parametrize("what", ["field detector", "decoder key's extractor"])
def test_a_watermark_network_stopped_midway_resumes_to_the_weights_of_one_never_stopped(what, tmp_path, monkeypatch):
    """The field's detector and the decoder key's extractor train in `fit`: Ctrl-C at step 13 of 20, with a
    checkpoint at step 10, and the resumed training runs steps 11-20 only and ends where one never stopped does."""
    import molrmog.applications.fieldmark as fm
    import molrmog.applications.signature as sg

    pool = load_dataset("digits").images[:64]
    vae = ConvVAE((1, 8, 8), (2, 4, 4), 4, seed=0)
    how = {"image_shape": (1, 8, 8), "psnr": 25.0, "steps": 20, "batch": 8, "checkpoint_every": 5,
           "attacks": ("gaussian_noise", "none")}
    module, after = (fm, 8) if what == "field detector" else (sg, 0)  # the detector's facts read 8 more batches

    def train(folder):
        if module is fm:
            return fm.train_detector(lambda k: pool, [vae], torch.ones(1), fm.key_field("k", (1, 8, 8)), width=4,
                                     checkpoint_dir=folder, **how)
        return sg.train_extractor(lambda k: pool, [vae], torch.ones(1), bits=4, checkpoint_dir=folder, **how)

    whole, facts = train(tmp_path / "a")
    calls, attack = [0], module.train_attack

    def stops_at_step_13(*a, **k):
        calls[0] += 1
        if calls[0] == 13:
            raise KeyboardInterrupt  # Ctrl-C: steps 11-12 were taken but not checkpointed
        return attack(*a, **k)

    monkeypatch.setattr(module, "train_attack", stops_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b")
    assert (tmp_path / "b" / "checkpoint.safetensors").is_file()
    calls[0] = 100  # counted from here on; no more stops
    resumed, facts_b = train(tmp_path / "b")
    assert calls[0] - 100 == 10 + after  # steps 11-20, from the step-10 checkpoint
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    if module is fm:
        assert facts == facts_b and 0 <= facts["accuracy_after"] <= 1 and math.isfinite(facts["loss_last_tenth"])
    else:  # the multiplier is part of the checkpoint: the resumed training ends with the same lambda
        assert facts_b["lambda"] == facts["lambda"] and facts["lambda"] != 1e-3


def test_field_watermarks_separate_marked_from_clean_on_a_tiny_run(cycle_run, tmp_path, capsys):
    import numpy as np

    from molrmog.applications.fieldmark import FieldDetector, field_scores, key_field, mark_images
    from molrmog.applications.watermark import embed, roc
    from molrmog.core.errors import MolrmogError
    from molrmog.pipeline.run import Run

    out = tmp_path / "wm-field"
    fast = ["--method", "field", "--extractor-steps", "300", "--psnr", "22", "--field-sigma", "0.5"]
    assert main(["watermark", "embed", str(cycle_run), *fast, "--n", "24", "--cluster", "2", "--out", str(out),
                 "--no-progress"]) == 0
    key = json.loads((out / "key.json").read_text())
    assert key["method"] == "field" and key["sigma"] == 0.5 and key["psnr_target"] == 22 and key["steps"] == 300
    folder = out / key["detector"]
    assert (folder / "config.json").is_file() and (folder / "field.json").is_file() and "12345" not in key["detector"]
    assert not (folder / "checkpoint.safetensors").exists()  # the training's checkpoint goes when it is done
    run = Run.load(cycle_run)
    W = FieldDetector.load(folder)
    mark = lambda x: mark_images(x, key_field("12345", (1, 8, 8), 0.5), 22.0)  # noqa: E731
    marked, clean, _ = embed(run.expert("mog", 2), run.vae(2), 32, "12345", method="field", mark=mark, seed=9)
    assert torch.equal(marked, mark(clean))  # the same latents, the decoded image marked
    assert roc(field_scores(W, clean), field_scores(W, marked))["auc"] > 0.9
    np.save(tmp_path / "clean.npy", clean.numpy())
    _detect_calls(cycle_run, out, tmp_path, capsys)
    stamp = (folder / "config.json").stat().st_mtime_ns  # a second embed with the same key reads the detector back
    assert main(["watermark", "embed", str(cycle_run), *fast, "--n", "4", "--cluster", "3", "--out", str(out),
                 "--no-progress"]) == 0
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    facts = json.loads((folder / "field.json").read_text())
    assert json.loads((folder / "config.json").read_text())["psnr"] == 22  # the detector records its PSNR
    (folder / "field.json").write_text(json.dumps({**facts, "psnr_target": "much"}))  # a damaged record: an error
    capsys.readouterr()
    assert main(["watermark", "embed", str(cycle_run), *fast, "--n", "4", "--out", str(out), "--no-progress"]) == 2
    assert "PSNR target" in capsys.readouterr().err and (folder / "config.json").stat().st_mtime_ns == stamp
    (folder / "field.json").write_text(json.dumps(facts))
    _refuses_a_key_without_its_folder(cycle_run, key, "detector", tmp_path, capsys)
    with pytest.raises(MolrmogError, match="field method"):
        embed(run.expert("mog", 2), run.vae(2), 2, "k", method="field")


def test_the_subspace_keys_direction_comes_from_the_key_and_reads_the_mark_above_the_attacks(cycle_run):
    """`key_vector`: one unit vector per key and cluster, another for another key; per mode (`key_directions`) it
    is projected exactly off the mode's subspace; and on fresh images it reads what a marking can move far above
    what the attacks move, compared with random directions (the ratio v'Gv / v'Av it maximises, held out)."""
    from molrmog.applications import subspacemark as S
    from molrmog.applications.signature import train_attack
    from molrmog.core.errors import MolrmogError

    e, vae, x, _ = _decoded_from_modes(cycle_run, 64)
    fit, held = x[:32], x[32:]
    v = S.key_vector("k", e, vae, fit, 2)
    assert v.shape == e.net.mu.shape[1:] and abs(float(v.norm()) - 1) < 1e-5
    assert torch.equal(v, S.key_vector("k", e, vae, fit, 2))
    assert not torch.allclose(v, S.key_vector("o", e, vae, fit, 2))
    mu, Q = S._modes(e)
    w = S.key_directions(v, e)
    assert w.shape == mu.shape
    torch.testing.assert_close(w.norm(dim=1), torch.ones(len(w)))
    torch.testing.assert_close(torch.einsum("ndr,nd->nr", Q, w), torch.zeros(Q.shape[0], Q.shape[2]),
                               atol=1e-5, rtol=0)  # off the mode's subspace
    torch.testing.assert_close(torch.einsum("ndr,nds->nrs", Q, Q), torch.eye(Q.shape[-1]).expand(len(Q), -1, -1),
                               atol=1e-5, rtol=0)  # the bases are orthonormal
    with pytest.raises(MolrmogError, match="latent"):
        S.key_directions(torch.ones(3), e)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        u = S._encode(e, vae, held)
        moves = torch.cat([S._encode(e, vae, train_attack(held, vae, g, [a])) - u
                           for a in S.ATTACKS if a != "none" for _ in range(4)])
        pushes = torch.cat([S._encode(e, vae, held + 0.01 * torch.randn(held.shape, generator=g) *
                                      (held / S.DARK).clamp(max=1)) - u for _ in range(4)])

    def ratio(d):
        return (pushes @ d).pow(2).mean(0) / (moves @ d).pow(2).mean(0)

    random = torch.randn(len(v), 200, generator=g)
    assert float(ratio(v)) > 10 * float(ratio(random).median())  # 13-25x on four keys


def _decoded_from_modes(run, n: int):
    """Cluster 2's MoG expert and VAE, n images decoded from points of its modes' subspaces (modes in turn,
    coordinates N(0, 1), seed 0), and each image's mode mean (n, d)."""
    from molrmog.applications.subspacemark import _modes
    from molrmog.pipeline.run import Run

    r = Run.load(run)
    e, vae = r.expert("mog", 2), r.vae(2)
    mu, Q = _modes(e)
    j = torch.arange(n) % len(mu)
    c = torch.randn(n, Q.shape[-1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = torch.sigmoid(vae.decode(e.unstandardise(mu[j] + torch.einsum("ndr,nr->nd", Q[j], c))))
    return e, vae, x, mu[j]


def test_the_manifold_fit_leaves_images_the_decoder_makes_near_zero_and_fits_away_blur_and_gain(cycle_run):
    """Images decoded from a mode's subspace are on the fitted manifold: their residual is a small fraction of the
    encoding's distance to the mode's mean, and the blur mix and the gain are fitted away too (the attacks' blur
    at sigma 0.6, x 1.15 clipped), while a pixel change of the same PSNR as the mark's, along the key's direction,
    leaves a residual the fit cannot remove; black pixels stay black under the mark."""
    from molrmog.applications.attacks import blur
    from molrmog.applications.subspacemark import _encode, fit_residuals, key_directions, key_vector, mark_images

    e, vae, x, mu_j = _decoded_from_modes(cycle_run, 24)
    with torch.no_grad():
        spread = (_encode(e, vae, x) - mu_j).norm(dim=1)
    w = key_directions(key_vector("k", e, vae, x, 2), e)
    for img in (x, blur(x, 0.6), (x * 1.15).clamp(0, 1)):
        rho, _ = fit_residuals(e, vae, img, steps=80)
        assert float((rho.norm(dim=1) / spread).median()) < 0.1
    marked = mark_images(e, vae, x, w, psnr=30.0, steps=10)
    psnr = -10 * torch.log10((marked - x).pow(2).flatten(1).mean(1))
    assert float(psnr.min()) >= 30.0 - 1e-3  # the clip only shortens the change
    dark = x.clone()
    dark[..., :2, :] = 0  # two black rows: the mark leaves them black and moves the rest
    dark_marked = mark_images(e, vae, dark, w, psnr=30.0, steps=2)
    assert torch.equal(dark_marked[..., :2, :], dark[..., :2, :]) and not torch.equal(dark_marked, dark)
    rho_c, jc = fit_residuals(e, vae, x, steps=80)
    rho_m, jm = fit_residuals(e, vae, marked, steps=80)
    assert float((rho_m * w[jm]).sum(1).abs().median()) > 5 * float((rho_c * w[jc]).sum(1).abs().median())


def test_the_manifold_fit_reads_the_noise_attacks_sd_from_the_noised_images(cycle_run):
    """The fit's third nuisance, the mean of clipped pixel noise (`attacks.noisy_mean`): on images the decoder makes,
    noised by the attack (sd 0.03, clipped), the median fitted sd is near the attack's; on the same images clean it
    is a fraction of that."""
    from molrmog.applications import subspacemark as S
    from molrmog.applications.attacks import attack

    e, vae, x, _ = _decoded_from_modes(cycle_run, 48)
    sd_noised, sd_clean = (float(S.noise_sd(S._best_fit(e, vae, img, 80)[2][:, -2]).median())
                           for img in (attack("gaussian_noise", x, vae, 1), x))
    assert 0.02 < sd_noised < 0.05 and sd_clean < sd_noised / 2


def test_the_default_watermark_method_is_the_subspace_mark_where_the_expert_has_modes_else_the_field(cycle_run):
    from molrmog.applications.subspacemark import has_modes
    from molrmog.applications.watermark import choose_method
    from molrmog.pipeline.run import Run

    r = Run.load(cycle_run)
    assert has_modes(r.expert("mog", 0)) and not has_modes(r.expert("unet", 0))
    assert choose_method(r, "mog", "auto") == "subspace" and choose_method(r, "unet", "auto") == "field"
    assert [choose_method(r, "mog", m) for m in ("ring", "field")] == ["ring", "field"]  # a method given is kept


def test_subspace_watermarks_separate_marked_from_clean_on_a_tiny_run(cycle_run, tmp_path, capsys):
    import numpy as np

    from molrmog.applications.subspacemark import key_directions, statistic
    from molrmog.applications.watermark import embed, roc
    from molrmog.core.errors import MolrmogError
    from molrmog.pipeline.run import Run

    out = tmp_path / "wm-subspace"
    assert main(["watermark", "embed", str(cycle_run), "--n", "24", "--cluster", "2", "--out", str(out),
                 "--no-progress"]) == 0  # the default method, "auto", is the subspace mark for a MoG expert
    key = json.loads((out / "key.json").read_text())
    assert key["method"] == "subspace" and key["psnr_target"] == 35.0 and list(key["calibration"]) == ["2"]
    run = Run.load(cycle_run)
    e, vae = run.expert("mog", 2), run.vae(2)
    m0, sd = key["calibration"]["2"]
    marked = torch.from_numpy(np.load(out / "watermarked.npy"))
    clean = embed(e, vae, 32, "12345", seed=9)[1]
    np.save(tmp_path / "clean.npy", clean.numpy())
    w = key_directions(torch.tensor(key["directions"]["2"]), e)
    s = [(statistic(e, vae, x, w) - m0).abs() / sd for x in (clean, marked)]
    assert roc(*s)["auc"] > 0.95
    _detect_calls(cycle_run, out, tmp_path, capsys)
    for bad in ({"calibration": {"2": [0.0, 0.0]}}, {"calibration": {"3": [0.0, 1.0]}}, {"calibration": "x"}):
        (tmp_path / "bad.json").write_text(json.dumps({**key, **bad}))
        assert main(["watermark", "detect", str(cycle_run), "--images", str(tmp_path / "clean.npy"),
                     "--keyfile", str(tmp_path / "bad.json")]) == 2
        assert "calibration" in capsys.readouterr().err
    for bad in ({"directions": {"2": []}}, {"directions": {"2": [1.0, "x"]}}, {"directions": {"3": [1.0]}}):
        (tmp_path / "bad.json").write_text(json.dumps({**key, **bad}))
        assert main(["watermark", "detect", str(cycle_run), "--images", str(tmp_path / "clean.npy"),
                     "--keyfile", str(tmp_path / "bad.json")]) == 2
        assert "direction" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({**key, "directions": {"2": [1.0, 2.0]}}))  # another run's size
    assert main(["watermark", "detect", str(cycle_run), "--images", str(tmp_path / "clean.npy"),
                 "--keyfile", str(tmp_path / "bad.json")]) == 2
    assert "latent" in capsys.readouterr().err
    assert main(["watermark", "embed", str(cycle_run), "--method", "subspace", "--kind", "unet", "--n", "4",
                 "--out", str(tmp_path / "wm-unet"), "--no-progress"]) == 2
    assert "MoG expert" in capsys.readouterr().err
    with pytest.raises(MolrmogError, match="subspace method"):  # the subspace method marks the decoded images
        embed(e, vae, 2, "k", method="subspace")
