"""Uses of the low-dimensional structure (issue 15): LOCO editing along the denoiser Jacobian, null-space
watermarks, and the memorisation-to-generalisation sweep."""

import json

import pytest
import torch

from molrmog.applications import watermark as wm
from molrmog.applications.editing import _pixel_map, edit_time, latent_jacobian, pixel_jacobian, top_directions
from molrmog.cli import main
from molrmog.experiments import generalisation as gen
from molrmog.pipeline.run import Run
from tests.conftest import tiny


@pytest.fixture(scope="module")
def mog_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("lowdim") / "run"
    assert main(["train", "--out", str(run), *tiny(("mog",), mog=40)]) == 0
    return run


@pytest.fixture(scope="module")
def cluster0(mog_run):
    run = Run.load(mog_run, device="cpu")
    return run.expert("mog", 0), run.vae(0)


def _latent(expert, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(expert.shift.numel(), generator=g)


def test_pixel_jacobian_closed_form_matches_autograd(cluster0):
    expert, vae = cluster0
    t = edit_time(expert.schedule, 0.6)
    u = _latent(expert)
    J = pixel_jacobian(expert, vae, u, t)  # closed-form denoiser Jacobian times the decoder's (jvp)
    ref = torch.autograd.functional.jacobian(_pixel_map(expert, vae, t), u)  # reverse mode through the score
    assert J.shape == ref.shape == (64, u.numel())  # digits: 8 x 8
    torch.testing.assert_close(J, ref.to(J.dtype), rtol=1e-3, atol=1e-5)


def test_masked_directions_change_the_outside_less_than_the_plain_ones(cluster0):
    expert, vae = cluster0
    t = edit_time(expert.schedule, 0.6)
    u = _latent(expert, 1)
    J = pixel_jacobian(expert, vae, u, t)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[0:3, :] = True
    mask = mask.flatten()
    V0, S0 = top_directions(expert, vae, u, t, 3)
    assert torch.allclose(V0.T @ V0, torch.eye(3, dtype=V0.dtype), atol=1e-5)
    assert torch.all(S0[:-1] >= S0[1:])
    Vm, _ = top_directions(expert, vae, u, t, 3, mask, null_tol=0.3)

    def outside_share(v):
        return float((J[~mask] @ v).norm() / (J @ v).norm())

    assert outside_share(Vm[:, 0]) < outside_share(V0[:, 0])
    with pytest.raises(Exception, match="null_tol"):
        top_directions(expert, vae, u, t, 3, mask, null_tol=1.5)


def test_edit_cli_writes_grid_and_metrics_and_refuses_a_bad_mask(mog_run, tmp_path, capsys):
    out = tmp_path / "edit"
    assert main(["edit", str(mog_run), "--directions", "2", "--lambdas=-0.1,0,0.1", "--mask", "0,0,8,3",
                 "--held-out", "1", "--out", str(out)]) == 0
    res = json.loads((out / "edit.json").read_text())
    assert (out / "edit.png").is_file() and len(res["singular_values"]) >= 1
    assert all(0 <= r <= 1 for r in res["image"]["linearity_r2"])
    assert "locality_without_projection" in res
    assert main(["edit", str(mog_run), "--mask", "0,0,12,3", "--out", str(tmp_path / "bad")]) == 2
    assert "--mask" in capsys.readouterr().err


def test_null_projector_is_an_orthogonal_projector_onto_the_jacobians_null_space(cluster0):
    expert, _ = cluster0
    t = edit_time(expert.schedule, 0.3)
    u = torch.randn(3, expert.shift.numel(), generator=torch.Generator().manual_seed(2))
    P, rank = wm.null_projector(expert, u, t)
    torch.testing.assert_close(P @ P, P, atol=1e-8, rtol=0)
    torch.testing.assert_close(P, P.transpose(1, 2))
    J = latent_jacobian(expert, u, t).double()
    assert ((J @ P).norm(dim=(1, 2)) <= 0.02 * J.norm(dim=(1, 2)) * J.shape[1] ** 0.5).all()
    assert (rank >= 1).all() and (rank < u.shape[1]).all()


def test_the_mark_is_found_in_the_latents_and_the_key_matters(cluster0):
    expert, vae = cluster0
    marked, clean, info, um, uc = wm.embed(expert, vae, 12, "k1", strength=1.0, seed=0, latents=True, method="null")
    assert marked.shape == clean.shape == (12, 1, 8, 8) and 0 < info["mean_rank"] < um.shape[1]
    right = wm.latent_scores(expert, um, "k1", method="null")
    wrong = wm.latent_scores(expert, um, "another key", method="null")
    none = wm.latent_scores(expert, uc, "k1", method="null")
    assert right.mean() > wrong.mean() + 0.2 and right.mean() > none.mean() + 0.2
    assert wm.roc(none, right)["auc"] > 0.9
    scores = wm.detection_scores(expert, vae, marked, "k1", method="null")  # through the VAE: reported, not promised
    assert scores.shape == (12,) and torch.isfinite(scores).all()


def test_attacks_keep_images_in_range_and_roc_is_sklearns():
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for name in ("gaussian_noise", "blur", "jpeg", "brightness"):
        y = wm.attack(name, x, None)
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1 and not torch.equal(x, y)
    r = wm.roc(torch.tensor([0.0, 0.1, 0.2]), torch.tensor([0.15, 0.3, 0.4]))
    assert r["auc"] == pytest.approx(8 / 9)
    with pytest.raises(Exception, match="unknown attack"):
        wm.attack("crop", x, None)


def test_noisy_mean_is_the_noise_attacks_expectation_by_monte_carlo():
    """attacks.noisy_mean: E[clip(x + sigma eps, 0, 1)] in closed form, against 200,000 draws of the clipped
    noise per pixel (pixels at 0, 1 and inside, where the clip lifts, lowers or leaves the mean) and the noise
    attack's own images (sigma 0.03); sigma -> 0 leaves x."""
    from molrmog.applications.attacks import noisy_mean

    g = torch.Generator().manual_seed(0)
    x = torch.tensor([0.0, 0.01, 0.3, 0.99, 1.0]).view(5, 1, 1, 1)
    for sigma in (0.03, 0.2):
        draws = (x + sigma * torch.randn(5, 200_000, 1, 1, generator=g, dtype=torch.float64)).clamp(0, 1).mean(1)
        torch.testing.assert_close(noisy_mean(x.double(), sigma).view(5), draws.view(5), atol=4 * sigma / 447, rtol=0)
    assert float(noisy_mean(x, 0.03)[0]) == pytest.approx(0.03 * 0.3989, rel=1e-3)  # sigma phi(0) at the dark end
    torch.testing.assert_close(noisy_mean(x, 1e-6), x)
    per_image = noisy_mean(x, torch.tensor([0.03, 0.2, 0.03, 0.2, 0.03]))
    torch.testing.assert_close(per_image[1], noisy_mean(x[1:2], 0.2)[0])
    y = torch.rand(2, 1, 8, 8, generator=g)
    attacked = torch.stack([wm.attack("gaussian_noise", y, None, seed=s) for s in range(4000)]).mean(0)
    torch.testing.assert_close(noisy_mean(y, 0.03), attacked, atol=4 * 0.03 / 63, rtol=0)


def test_watermark_cli_embed_then_detect(mog_run, tmp_path, capsys):
    out = tmp_path / "wm"
    assert main(["watermark", "embed", str(mog_run), "--n", "4", "--out", str(out)]) == 0
    key = json.loads((out / "key.json").read_text())
    assert {"threshold", "t", "cluster", "key"} <= set(key)
    capsys.readouterr()
    assert main(["watermark", "detect", str(mog_run), "--images", str(out / "watermarked.npy"), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(ln.split("\t")[2] in ("watermarked", "clean") for ln in lines)
    assert main(["watermark", "detect", str(mog_run), "--out", str(out)]) == 2


def test_memorisation_metric_tells_copies_from_new_points():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(50, 8, generator=g)
    assert gen.memorisation(train[:20] + 1e-4 * torch.randn(20, 8, generator=g), train)["memorisation"] == 1.0
    fresh = gen.memorisation(torch.randn(200, 8, generator=g), train)
    assert fresh["memorisation"] < 0.3 and fresh["nn_similarity"] < 0.99
    rows = [{"kind": "a", "N": n, "memorisation": m} for n, m in ((2, 1.0), (8, 0.7), (32, 0.2), (128, 0.1))]
    assert gen.transition(rows, "a") == 32
    assert gen.transition([{"kind": "a", "N": 2, "memorisation": 0.9}], "a") is None
    assert gen.transition([{"kind": "a", "N": 2, "memorisation": 0.1}, {"kind": "a", "N": 8, "memorisation": 0}],
                          "a") is None  # nothing memorised: the transition lies below the sweep


def test_generalisation_sweep_goes_from_copies_to_new_samples(tmp_path):
    res = gen.run_generalisation(tmp_path, "quick", progress=False, Ns=[2, 128], steps=150, mlp_steps=150,
                                 eval_n=200)
    rows = {(r["kind"], r["N"]): r for r in res["rows"]}
    assert rows[("mixture", 2)]["memorisation"] > 0.8 > 0.5 > rows[("mixture", 128)]["memorisation"]
    assert rows[("mixture", 128)]["score_error"] < rows[("mixture", 2)]["score_error"]
    assert rows[("mixture", 128)]["rp"] > rows[("mixture", 2)]["rp"]
    for f in ("generalisation.csv", "generalisation.json", "generalisation.png"):
        assert (tmp_path / f).is_file()
