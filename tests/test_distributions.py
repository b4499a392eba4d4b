"""Constructors, save/load, bad input and the synth command."""

import json
import subprocess
import sys

import pytest
import torch

from molrmog.cli import main
from molrmog.core.distributions import GaussianMixture, MoLRG, MoLRMoG, load_distribution

from .conftest import ragged_molrmog


@pytest.mark.parametrize(
    "make",
    [lambda: ragged_molrmog(0), lambda: MoLRG.random(20, 3, [2, 3, 4], seed=1),
     lambda: GaussianMixture.random(6, n=4, r=2, seed=2),
     lambda: MoLRMoG.random(30, 2, 5, [2, 4], 3, seed=3, schedule="cosine", dtype=torch.float32)],
)
def test_save_load_round_trip(tmp_path, make):
    dist = make()
    dist.save(tmp_path / "d")
    back = load_distribution(tmp_path / "d")
    assert type(back) is type(dist)
    assert (back.d, back.n, back.r, back.dtype) == (dist.d, dist.n, dist.r, dist.dtype)
    assert back.schedule.config() == dist.schedule.config()
    x = torch.randn(5, dist.D, dtype=dist.dtype)
    assert torch.allclose(back.score(x, 0.3), dist.score(x, 0.3), rtol=1e-6)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["_class_name"] == type(dist).__name__ and cfg["_molrmog_format"] == 2  # the models' format


def test_a_distribution_of_molrmog_0_2_still_loads_and_other_formats_are_refused(tmp_path):
    """molrmog 0.2 wrote {"class", "format_version": 1} + params.safetensors; it reads as it was."""
    dist = ragged_molrmog(0)
    dist.save(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    old = {"class": cfg.pop("_class_name"), "format_version": 1, **{k: v for k, v in cfg.items()
                                                                     if k != "_molrmog_format"}}
    (tmp_path / "d" / "config.json").write_text(json.dumps(old))
    (tmp_path / "d" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "d" / "params.safetensors")
    back = load_distribution(tmp_path / "d")
    x = torch.randn(4, dist.D, dtype=dist.dtype)
    assert type(back) is type(dist) and torch.allclose(back.score(x, 0.3), dist.score(x, 0.3), rtol=1e-6)
    (tmp_path / "d" / "config.json").write_text(json.dumps({**old, "format_version": 7}))
    with pytest.raises(ValueError, match="distribution format 7 is not one this molrmog reads"):
        load_distribution(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text(json.dumps({**cfg, "_class_name": "MoLRMoG", "_molrmog_format": 9}))
    with pytest.raises(ValueError, match="artefact format 9"):
        load_distribution(tmp_path / "d")


def test_load_reports_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_distribution(tmp_path)
    ragged_molrmog(0).save(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read"):
        load_distribution(tmp_path)


def test_random_constructor_separation_controls_mean_spread():
    near = MoLRMoG.random(40, 2, 6, 5, seed=0, separation=1.0)
    far = MoLRMoG.random(40, 2, 6, 5, seed=0, separation=8.0)
    assert far.mixture.mu.norm().item() == pytest.approx(8 * near.mixture.mu.norm().item(), rel=1e-12)


def _A(D=6, d=2):
    return torch.linalg.qr(torch.randn(D, d, dtype=torch.float64))[0]


def test_non_orthonormal_A_names_the_measured_error():
    A = 1.5 * _A()
    with pytest.raises(ValueError, match=r"orthonormal columns: \|\|A\^T A - I\|\|_F = 1\.77"):
        MoLRMoG([A], [torch.zeros(1, 2)], [torch.ones(1, 2, 1)])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mu=[torch.zeros(1, 3)], U=[torch.ones(1, 3, 1)]), "A\\[0\\] must have shape"),
        (dict(U=[torch.ones(1, 3, 1)]), "U\\[0\\]\\[0\\] must have shape"),
        (dict(U=[torch.ones(1, 2, 3)]), "0 <= r <= d_k"),
        (dict(w=[0.5, 0.5]), "w must have shape"),
        (dict(pi=[[0.5, 0.5]]), "pi\\[0\\] must have shape"),
        (dict(mu=[torch.zeros(2, 2)], U=[torch.ones(2, 2, 1)], pi=[[1.0, 0.0]]), "strictly positive"),
        (dict(mu=[torch.zeros(2, 2)], U=[torch.ones(2, 2, 1)], pi=[[0.7, -0.3]]), "strictly positive"),
        (dict(mu=[torch.zeros(2, 2)], U=[torch.ones(2, 2, 1)], pi=[[0.7, 0.7]]), "normalize=True"),
        (dict(mu=[torch.full((1, 2), float("nan"))]), "NaN"),
    ],
)
def test_bad_parameters_fail_with_clear_messages(kwargs, match):
    args = dict(A=[_A()], mu=[torch.zeros(1, 2)], U=[torch.ones(1, 2, 1)], w=None, pi=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MoLRMoG(args["A"], args["mu"], args["U"], w=args["w"], pi=args["pi"])


def test_weights_normalised_on_purpose():
    d = MoLRMoG([_A()], [torch.zeros(2, 2)], [torch.ones(2, 2, 1)], pi=[[2.0, 6.0]], normalize=True)
    assert torch.allclose(d.mode_weights[0], torch.tensor([0.25, 0.75], dtype=d.mode_weights.dtype))


def test_bad_x_and_t_fail_with_clear_messages():
    dist = ragged_molrmog(0)
    x = torch.zeros(3, dist.D, dtype=torch.float64)
    with pytest.raises(ValueError, match="range"):
        dist.score(x, 50.0)
    with pytest.raises(ValueError, match="range"):
        dist.score(x, 0.0)
    with pytest.raises(ValueError, match="shape \\(B,\\)"):
        dist.score(x, torch.full((5,), 0.5))
    with pytest.raises(ValueError, match="shape \\(B, D\\) with D = 12"):
        dist.score(torch.zeros(3, 5), 0.5)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf \\(rows \\[1\\]"):
        dist.score(x, 0.5)
    with pytest.raises(ValueError, match="n must be a whole number"):
        dist.sample(0)
    with pytest.raises(ValueError, match="must not exceed the ambient"):
        MoLRMoG.random(4, 2, 6)
    with pytest.raises(ValueError, match="rank r"):
        MoLRMoG.random(10, 2, 3, 2, r=4)


def test_synth_command_writes_png_and_json_and_matches_truth(tmp_path):
    out = tmp_path / "synth"
    code = main(["synth", "--D", "16", "--K", "2", "--d", "3", "--n", "2", "--samples", "600",
                 "--steps", "20", "--out", str(out), "--no-progress"])
    assert code == 0
    res = json.loads((out / "synth.json").read_text())
    assert (out / "synth.png").stat().st_size > 10_000
    assert (out / "distribution" / "diffusion_pytorch_model.safetensors").is_file()
    # generated points are as close to the data as a second true sample is (up to a small factor)
    assert res["energy_distance"] < 3 * res["energy_distance_true_vs_true"] + 0.01
    assert res["mode_weights_generated"]["max_abs"] < 0.08


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["synth", "--D", "4", "--d", "9", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("molrmog: error:")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_every_subcommand_has_help(capsys):
    proc = subprocess.run([sys.executable, "-m", "molrmog.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "synth" in proc.stdout
    from molrmog.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:  # in-process: every subcommand's --help exits 0 and says something
        assert main([name, "--help"]) == 0, name
        assert len(capsys.readouterr().out) > 200, name
    assert main(["synth", "--help"]) == 0 and "--separation" in capsys.readouterr().out
