"""Faults and bad inputs a careless or unlucky user produces (issue 11): the last good checkpoint is truly
good, divergence is exit 1, bad input and damaged artefacts are exit 2 with one line, validation happens
before any file is written, one process trains a run, and nothing that existed before a command changes."""

import gzip
import hashlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from molrmog.cli import main
from molrmog.core.artefacts import atomic_write
from molrmog.core.distributions import GaussianMixture, MoLRG, load_distribution
from molrmog.core.errors import MolrmogError, TrainingDiverged
from molrmog.core.losses import dsm_loss
from molrmog.models.experts import MoGExpert
from molrmog.pipeline.data import load_dataset, read_idx
from molrmog.training.train import fit
from tests.conftest import ragged_molrmog, tiny

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("molrmog: error:") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --- the last good checkpoint is good -----------------------------------------------------------


def test_a_nan_gradient_with_a_finite_loss_never_reaches_a_checkpoint(tmp_path):
    m = MoGExpert(3, 2).double()
    x = torch.randn(64, 3, dtype=torch.float64)
    calls = []
    m.U.register_hook(lambda g: g * math.nan if len(calls) == 7 else g)  # step 6's gradient is NaN

    def loss_fn(model, gen):
        calls.append(1)
        return dsm_loss(model, x, model.schedule, generator=gen)  # always finite

    # step 6's update made U NaN; step 7's forward pass finds it, and the checkpoint of step 6 stays
    with pytest.raises(TrainingDiverged, match=r"step 7.*last good checkpoint \(step 6\)"):
        fit(m, loss_fn, steps=20, lr=1e-2, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    with safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["state"])["step"] == 6
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys() if not k.startswith("rng"))


def test_an_exploding_loss_stops_training_before_it_is_saved(tmp_path):
    m = MoGExpert(3, 2).double()
    x = torch.randn(64, 3, dtype=torch.float64)
    calls = []

    def loss_fn(model, gen):  # healthy, then the loss rises a thousandfold (finite all along)
        calls.append(1)
        loss = dsm_loss(model, x, model.schedule, generator=gen)
        return loss * (1e3 if len(calls) > 60 else 1.0)

    with pytest.raises(TrainingDiverged, match=r"exploded at step 6\d: .* more than 100x the reference"):
        fit(m, loss_fn, steps=200, lr=1e-3, checkpoint_dir=tmp_path, checkpoint_every=20, progress=False)
    with safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["state"])["step"] == 60


def test_divergence_in_a_run_is_exit_1_naming_expert_step_and_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--out", str(run), *tiny(("mog",), mog=300), "--mog-lr", "10", "--mog-ema-decay", "0",
                 "--checkpoint-every", "20"])
    err = capsys.readouterr().err
    assert code == 1 and "molrmog: training diverged: mog-" in err and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    diverged = sorted({int(k) for k in re.findall(r"\bmog-(\d+): ", line)})
    assert diverged and "exploded at step" in line and "checkpoints/mog-" in line
    for k in diverged:  # a diverged expert is never saved as finished
        assert not (run / "experts" / "mog" / str(k) / "config.json").exists()


def test_a_closed_form_breakdown_in_training_is_divergence_not_bad_input(tmp_path):
    m = MoGExpert(3, 2).double()
    x = torch.randn(64, 3, dtype=torch.float64)

    def loss_fn(model, gen):
        with torch.no_grad():
            if model.U.abs().max() < 1e300:
                model.U.mul_(1e200)  # U^T U overflows: the capacitance matrix is no longer finite
        return dsm_loss(model, x, model.schedule, generator=gen)

    with pytest.raises(TrainingDiverged, match="closed-form maths broke down at step 0"):
        fit(m, loss_fn, steps=5, lr=1e-2, progress=False)


# --- one writer per run, atomic files ---------------------------------------------------------------


def test_a_second_process_cannot_train_a_run_that_is_being_trained(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "molrmog.cli", "train", "--out", str(run),
                             *tiny(("gaussian",)), "--vae-steps", "5000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(run.glob("checkpoints/vae-0/*")):
            time.sleep(0.1)
        before = _snapshot(run / "vae") if (run / "vae").exists() else {}
        r = subprocess.run([sys.executable, "-m", "molrmog.cli", "train", "--resume", str(run)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and f"is being trained by process {proc.pid}" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert "config.json" in os.listdir(run)
        assert proc.poll() is None and before.keys() <= _snapshot(run / "vae").keys()
    finally:
        proc.kill()
        proc.wait()


def test_an_atomic_write_that_fails_leaves_the_old_file(tmp_path):
    path = tmp_path / "losses.csv"
    path.write_text("old")

    def broken(p):
        Path(p).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["losses.csv"]


def test_sample_out_may_be_a_folder_or_a_new_path(tmp_path, capsys, gaussian_run):
    folder = tmp_path / "pngs"
    folder.mkdir()
    assert main(["sample", str(gaussian_run), "--kind", "gaussian", "--n", "2", "--steps", "2", "--out",
                 str(folder)]) == 0
    assert (folder / "sample_gaussian.png").is_file()
    new = tmp_path / "a" / "b" / "x.png"
    assert main(["sample", str(gaussian_run), "--kind", "gaussian", "--n", "2", "--steps", "2", "--out",
                 str(new)]) == 0
    assert new.is_file() and os.listdir(new.parent) == ["x.png"]
    capsys.readouterr()
    _one_line_error(capsys, main(["sample", str(gaussian_run), "--kind", "gaussian", "--out", str(tmp_path / "x.txt")]),
                    "must be a .png file or an existing folder")


# --- validation before work -------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--latent", "1000000,4,4"], "latent channels 1000000 exceed 256"),
    (["--latent", "2,3,3"], "does not fit 8x8 images"),
    (["--unet-steps", "0"], "--unet-steps must lie in [1,"),
    (["--unet-steps", "-1"], "--unet-steps must lie in [1,"),
    (["--vae-beta=-1e6"], "--vae-beta must lie in [0,"),
    (["--vae-beta", "nan"], "--vae-beta must be a finite number"),
    (["--mog-modes", "0"], "--mog-modes must lie in [1,"),
    (["--mog-rank", "64"], "rank 64 exceeds the latent dimension 32"),
    (["--vae-width", "100000"], "--vae-width must lie in [1, 1024]"),
    (["--experts", "mog,transformer"], "unknown value(s) ['transformer']"),
    (["--experts", "gaussian", "--mog-modes", "3"], "options were given for expert kind(s) ['mog']"),
    (["--dataset", "cifar"], "argument --dataset: unknown dataset 'cifar'"),
    (["--vae", "huge"], "invalid choice: 'huge'"),
    (["--mog-steps", "ten"], "invalid int value: 'ten'"),
])
def test_bad_run_options_fail_before_any_file_is_written(tmp_path, capsys, monkeypatch, args, message):
    from molrmog.pipeline import stages as pipeline

    def no_work(*a, **k):
        raise AssertionError("training tasks started before the options were refused")

    monkeypatch.setattr(pipeline, "run_tasks", no_work)  # refused before any work, not only before any file
    _one_line_error(capsys, main(["train", "--out", str(tmp_path / "x"), *args]), message)
    assert not (tmp_path / "x").exists()


def test_synth_refuses_sizes_it_cannot_hold(tmp_path, capsys):
    _one_line_error(capsys, main(["synth", "--samples", "100000000", "--out", str(tmp_path / "s")]),
                    "--samples must lie in [2, 10000]")
    _one_line_error(capsys, main(["synth", "--D", "4", "--d", "9", "--out", str(tmp_path / "s")]), "must not exceed")
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "g"
    assert main(["train", "--out", str(run), *tiny(("gaussian",))]) == 0
    return run


def test_resume_refuses_flags_that_change_the_run_and_accepts_the_safe_ones(gaussian_run, capsys):
    before = _snapshot(gaussian_run)
    line = _one_line_error(capsys, main(["train", "--resume", str(gaussian_run), "--mog-modes", "3", "--experts",
                                         "unet", "--vae-steps", "99"]), "--resume keeps the run's settings")
    for flag in ("--experts", "--vae-steps 99", "--mog-modes 3"):
        assert flag in line
    assert _snapshot(gaussian_run) == before
    same = json.loads((gaussian_run / "config.json").read_text())["vae_steps"]
    assert main(["train", "--resume", str(gaussian_run), "--vae-steps", str(same), "--device", "cpu",
                 "--no-progress", "--workers", "1"]) == 0  # unchanged values and safe flags are fine


def test_an_empty_class_folder_is_refused(tmp_path):
    from PIL import Image

    for cls in ("a", "b", "c"):
        (tmp_path / cls).mkdir()
    for cls in ("a", "b"):
        for i in range(3):
            Image.new("L", (8, 8), 100).save(tmp_path / cls / f"{i}.png")
    with pytest.raises(MolrmogError, match=r"class folder .*/c has no readable images"):
        load_dataset(f"folder:{tmp_path}", size=8)


# --- damaged artefacts: one line naming the file, nothing changed -------------------------------------


def _expert_cfg(run):
    return run / "experts" / "gaussian" / "0" / "config.json"


def _edit_json(path, fn):
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


DAMAGE = {
    "expert config with an extra key": (lambda r: _edit_json(_expert_cfg(r), lambda c: {**c, "colour": "red"}),
                                        "unknown key(s) ['colour']"),
    "expert config missing a key": (lambda r: _edit_json(_expert_cfg(r), lambda c: {k: v for k, v in c.items()
                                                                                     if k != "net_config"}),
                                    "net_config"),
    "run config that is a JSON list": (lambda r: (r / "config.json").write_text("[1, 2]"), "must hold a JSON object"),
    "wrong-shaped weights": (lambda r: save_file({"net.U": torch.zeros(1, 2, 2), "shift": torch.zeros(32),
                                                  "scale": torch.ones(32)},
                                                 str(r / "experts" / "gaussian" / "0" / WEIGHTS)), "wrong shapes"),
    "truncated clusters.safetensors": (lambda r: (r / "clusters.safetensors").write_bytes(
        (r / "clusters.safetensors").read_bytes()[:40]), "clusters.safetensors cannot be read"),
    "corrupt clusters.json": (lambda r: (r / "clusters.json").write_text('["0", "1"'),
                              "clusters.json is not valid JSON"),
    "experts as a string": (lambda r: _edit_json(r / "config.json", lambda c: {**c, "experts": "gaussian"}),
                            "experts must be a list of kind names"),
    "a kind named ../../x": (lambda r: _edit_json(r / "config.json", lambda c: {**c, "experts": ["../../x"]}),
                             "unknown value(s) ['../../x']"),
    "a run of another format": (lambda r: _edit_json(r / "config.json", lambda c: {**c, "format_version": 7}),
                                "run format 7"),
    # values read back from config.json are named by file and key, not by the flag that set them
    "a negative step count": (lambda r: _edit_json(r / "config.json", lambda c: {**c, "vae_steps": -1}),
                              "config.json: vae_steps must lie in [1,"),
    "a kind option out of range": (lambda r: _edit_json(r / "config.json", lambda c: {
        **c, "expert_options": {"gaussian": {**c["expert_options"]["gaussian"], "lr": -1}}}),
        "config.json: expert_options.gaussian.lr must lie in"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_artefacts_are_one_line_in_sample_and_evaluate(damage, gaussian_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(gaussian_run, run)
    edit, message = DAMAGE[damage]
    edit(run)
    before = _snapshot(run)
    capsys.readouterr()
    _one_line_error(capsys, main(["sample", str(run), "--kind", "gaussian", "--n", "2"]), message)
    _one_line_error(capsys, main(["evaluate", str(run), "--samples", "10", "--cache", str(tmp_path / "c")]), message)
    assert _snapshot(run) == before and not (tmp_path / "c").exists()


# --- damaged data ----------------------------------------------------------------------------------


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + \
        arr.astype(np.uint8).tobytes()


def test_damaged_idx_files_are_named(tmp_path):
    good = gzip.compress(_idx(np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256))
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    cases = {"flip.gz": bytes(flipped), "short": b"\x00\x00\x08\x03\x00\x00", "empty": _idx(np.zeros((0, 28, 28)))}
    messages = {"flip.gz": "corrupt or truncated", "short": "header is cut short", "empty": "holds no items"}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(MolrmogError, match=messages[name]) as e:
            read_idx(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)


def test_tiny_and_oversized_image_folders(tmp_path):
    from PIL import Image

    one = tmp_path / "one"
    one.mkdir()
    Image.new("L", (8, 8), 9).save(one / "a.png")
    with pytest.raises(MolrmogError, match="at least 2 are needed"):
        load_dataset(f"folder:{one}", size=8)
    (one / "cls").mkdir()
    (one / "a.png").rename(one / "cls" / "a.png")
    with pytest.raises(MolrmogError, match="at least 2 are needed"):
        load_dataset(f"folder:{one}", size=8)
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), 9).save(bomb / f"{i}.png")
    raw = bytearray((bomb / "0.png").read_bytes())
    raw[16:24] = struct.pack(">II", 30000, 30000)  # the IHDR claims 30000 x 30000 pixels
    (bomb / "0.png").write_bytes(bytes(raw))
    with pytest.raises(MolrmogError, match=r"0.png.*--skip-bad"):
        load_dataset(f"folder:{bomb}", size=8, split="all")
    assert load_dataset(f"folder:{bomb}", size=8, skip_bad=True, split="all").images.shape[0] == 2


# --- the library refuses or handles odd input -------------------------------------------------------


def test_library_inputs():
    dist = ragged_molrmog(0, dtype=torch.float32)
    x = torch.randn(4, dist.D)
    for dt in (torch.float16, torch.bfloat16):  # computed in float32, returned in the caller's dtype
        s = dist.score(x.to(dt), 0.5)
        assert s.dtype == dt and torch.allclose(s.float(), dist.score(x.to(dt).float(), 0.5), rtol=1e-2, atol=1e-2)
        assert dist.log_prob(x.to(dt), 0.5).dtype == dt
    with pytest.raises(MolrmogError, match="must be a matrix"):
        MoLRG([torch.randn(6)])
    with pytest.raises(MolrmogError, match="t must be numbers"):
        dist.score(x, "0.5")
    with pytest.raises(MolrmogError, match="complex"):
        dist.score(x.to(torch.complex64), 0.5)
    with pytest.raises(MolrmogError, match="whole number"):
        dist.sample(2.7)
    assert dist.sample(np.int64(3))[0].shape[0] == 3


@pytest.mark.parametrize("edit", [
    lambda c: {k: v for k, v in c.items() if k != "d"},  # KeyError before
    lambda c: {**c, "schedule": 3},  # AttributeError before
    lambda c: {**c, "n": [1]},  # IndexError before
    lambda c: {**c, "_class_name": "Nothing"},
    lambda c: [c],
])
def test_damaged_distribution_configs_are_one_error(tmp_path, edit):
    GaussianMixture.random(4, 2).save(tmp_path)
    _edit_json(tmp_path / "config.json", edit)
    with pytest.raises(MolrmogError) as e:
        load_distribution(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_argparse_errors_are_one_line(capsys):
    code = main(["train", "--no-such-flag"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unrecognized arguments" in err


def test_a_bug_is_exit_1_with_a_traceback(monkeypatch, capsys):
    import molrmog.experiments.synth as synth

    monkeypatch.setattr(synth, "run_synth", lambda *a, **k: {}["no such key"])
    assert main(["synth"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error" in err


# --- a refused command writes nothing and changes nothing (issue 20) ----------------------------------------


def test_a_refused_train_leaves_an_existing_run_and_its_lock_as_they_were(gaussian_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(gaussian_run, run)
    (run / ".lock").write_text("4242")  # the pid the last holder wrote
    before = _snapshot(run)
    _one_line_error(capsys, main(["train", "--out", str(run), *tiny(("gaussian",))]), "already holds a run")
    assert _snapshot(run) == before and (run / ".lock").read_text() == "4242"


def test_vae_from_a_damaged_run_names_the_source_file_and_writes_nothing(gaussian_run, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(gaussian_run, source)
    path = source / "vae" / "3" / WEIGHTS
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["decoder.0.bias"][0] = math.nan
    save_file(tensors, str(path))
    _one_line_error(capsys, main(["train", "--vae-from", str(source), "--out", str(tmp_path / "new"),
                                  *tiny(("gaussian",), vae=False)]), f"--vae-from {source}", str(path), "NaN")
    assert not (tmp_path / "new").exists()


def test_a_refused_compare_leaves_no_out_and_a_changed_one_is_refused(gaussian_run, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from molrmog.pipeline import stages as pipeline

    def no_work(*a, **k):
        raise AssertionError("training tasks started before the comparison was refused")

    monkeypatch.setattr(pipeline, "run_tasks", no_work)
    images = tmp_path / "unlabelled"
    images.mkdir()
    for i in range(30):
        Image.new("L", (8, 8), i * 8).save(images / f"{i}.png")
    out = tmp_path / "cmp"
    _one_line_error(capsys, main(["compare", "--dataset", f"folder:{images}", "--size", "8", "--clusters", "2",
                                  "--out", str(out), "--cache", str(tmp_path / "cache"), *tiny(("gaussian",))]),
                    "has no labels", "class sub-folders")
    assert not out.exists()
    shutil.copytree(gaussian_run, out / "dedicated")  # a comparison to continue, asked with other settings
    before = _snapshot(out)
    _one_line_error(capsys, main(["compare", "--out", str(out), *tiny(("gaussian",)), "--gaussian-steps", "99"]),
                    "holds a comparison", "--gaussian-steps 99")
    assert _snapshot(out) == before


@pytest.mark.parametrize("classes, message", [({"a": 12, "b": 1}, "class(es) 'b' (1) have fewer than 2"),
                                              ({None: 12}, "cannot make 10 clusters")])
def test_a_folder_that_cannot_make_its_clusters_is_refused_before_any_file(tmp_path, capsys, classes, message):
    from PIL import Image

    root = tmp_path / "imgs"
    for cls, n in classes.items():
        d = root / cls if cls else root
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("L", (8, 8), 10 * i).save(d / f"{i}.png")
    _one_line_error(capsys, main(["train", "--dataset", f"folder:{root}", "--size", "8", "--out",
                                  str(tmp_path / "run"), *tiny(("gaussian",))]), message)
    assert not (tmp_path / "run").exists()


def test_generalisation_checks_its_run_before_any_work(gaussian_run, tmp_path, capsys, monkeypatch):
    from molrmog.experiments import generalisation

    def no_work(*a, **k):
        raise AssertionError("the synthetic sweep started before the run was checked")

    monkeypatch.setattr(generalisation, "run_tasks", no_work)
    run = tmp_path / "run"
    shutil.copytree(gaussian_run, run)
    (run / "clusters.safetensors").write_bytes(b"damaged")
    _one_line_error(capsys, main(["experiment", "generalisation", "--quick", "--run", str(run), "--out",
                                  str(tmp_path / "g"), "--no-progress"]), "clusters.safetensors")
    assert not (tmp_path / "g").exists()
