"""The image pipeline end to end on small settings: train, sample, resume after SIGKILL, bad config."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from molrmog.cli import main
from molrmog.data import DEBIAN_FASHION_DIR, load_dataset

TINY = ["--vae-steps", "16", "--expert-steps", "12", "--unet-steps", "3", "--batch", "32",
        "--sample-steps", "3", "--checkpoint-every", "4", "--no-progress"]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "molrmog.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _weights(run: Path) -> dict:
    out = {}
    for f in sorted(run.glob("vae/*/model.safetensors")) + sorted(run.glob("experts/*/*/model.safetensors")):
        out[str(f.relative_to(run))] = load_file(str(f))
    return out


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "--dataset", "digits", "--out", str(out), *TINY]) == 0
    return out


def test_train_writes_a_complete_run_directory(digits_run):
    for name in ("config.json", "clusters.safetensors", "losses.csv", "loss_curves.png", "report.md",
                 "report.json", "samples_mog.png", "samples_gaussian.png", "samples_unet.png",
                 "samples_data.png"):
        assert (digits_run / name).is_file(), name
    assert len(list(digits_run.glob("vae/*/model.safetensors"))) == 10
    for kind in ("mog", "gaussian", "unet"):
        assert len(list(digits_run.glob(f"experts/{kind}/*/config.json"))) == 10
    rep = json.loads((digits_run / "report.json").read_text())
    e = rep["experts"]
    assert e["mog"]["parameters_per_expert"] * 10 <= e["unet"]["parameters_per_expert"]
    assert e["gaussian"]["parameters_per_expert"] < e["mog"]["parameters_per_expert"]
    assert "| mog |" in (digits_run / "report.md").read_text()


def test_sample_command_writes_png_and_npy(digits_run, tmp_path):
    out = tmp_path / "s.png"
    r = _cli("sample", str(digits_run), "--n", "6", "--class", "3", "--steps", "4", "--out", str(out),
             "--npy")
    assert r.returncode == 0, r.stderr
    arr = np.load(out.with_suffix(".npy"))
    assert arr.shape == (6, 1, 8, 8) and 0 <= arr.min() and arr.max() <= 1
    assert out.stat().st_size > 100
    r = _cli("sample", str(digits_run), "--class", "12")
    assert r.returncode == 2 and "--class must lie in 0..9" in r.stderr and "Traceback" not in r.stderr


def test_resume_after_sigkill_reaches_the_same_weights(tmp_path, digits_run):
    args = ["train", "--dataset", "digits", "--experts", "mog,gaussian", *TINY]
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "molrmog.cli", *args, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(run.glob("checkpoints/vae-3/checkpoint.safetensors")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "report.md").exists(), "the run finished before it could be killed"
    r = _cli("train", "--resume", str(run), "--no-progress")
    assert r.returncode == 0, r.stderr
    resumed = _weights(run)
    reference = {k: v for k, v in _weights(digits_run).items() if "unet" not in k}
    assert resumed.keys() == reference.keys()
    for name, tensors in reference.items():
        for key, v in tensors.items():
            assert (resumed[name][key] == v).all(), f"{name}:{key} differs after resume"


def test_corrupt_checkpoint_is_named(tmp_path):
    run = tmp_path / "c"
    assert main(["train", "--dataset", "digits", "--experts", "gaussian", "--out", str(run), *TINY]) == 0
    (run / "vae" / "0" / "model.safetensors").unlink()
    (run / "checkpoints" / "vae-0" / "checkpoint.safetensors").write_bytes(b"garbage")
    r = _cli("train", "--resume", str(run))
    assert r.returncode == 2 and "checkpoints/vae-0/checkpoint.safetensors is corrupt" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--experts", "mog,transformer"], "unknown expert kind"),
    (["--latent", "2,3,3"], "does not fit 8x8 images"),
    (["--modes", "0"], "--modes must be >= 1"),
    (["--dataset", "cifar"], "unknown dataset"),
    (["--vae", "huge"], "unknown --vae"),
])
def test_bad_config_fails_before_training(tmp_path, args, message):
    r = _cli("train", "--out", str(tmp_path / "x"), *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "vae").exists()


def test_existing_run_is_not_overwritten(digits_run):
    r = _cli("train", "--out", str(digits_run))
    assert r.returncode == 2 and "--resume" in r.stderr


@pytest.mark.parametrize("vae", ["unified", "lora"])
def test_unified_and_lora_vaes(tmp_path, vae):
    run = tmp_path / vae
    assert main(["train", "--dataset", "digits", "--experts", "gaussian", "--vae", vae, "--out", str(run),
                 *TINY]) == 0
    assert (run / "samples_gaussian.png").is_file()


def test_unlabelled_folder_is_clustered(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(40):  # two kinds of images: bright left half or bright right half
        a = np.zeros((8, 8), np.uint8)
        (a[:, :4] if i % 2 else a[:, 4:]).fill(200 + rng.integers(0, 50))
        Image.fromarray(a).save(folder / f"{i:03d}.png")  # loaded in sorted name order
    run = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{folder}", "--size", "8", "--clusters", "2", "--experts",
                 "gaussian", "--out", str(run), "--rank", "2", *TINY, "--vae-steps", "60"]) == 0
    labels = load_file(str(run / "clusters.safetensors"))["labels"].numpy()
    imgs = load_dataset(f"folder:{folder}", size=8).images  # the run's (train split) images, in order
    parity = (imgs[:, 0, :, :4].mean((1, 2)) > imgs[:, 0, :, 4:].mean((1, 2))).numpy().astype(int)
    agree = (labels == parity).mean()
    assert agree in (0.0, 1.0), "k-means on unified-VAE features should split the two kinds"


@pytest.mark.skipif(not Path(DEBIAN_FASHION_DIR, "train-images-idx3-ubyte.gz").is_file()
                    and not os.environ.get("CI"), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_subset_runs(tmp_path):
    run = tmp_path / "fm"
    assert main(["train", "--dataset", "fashion-mnist", "--limit", "600", "--experts", "mog,gaussian",
                 "--out", str(run), *TINY]) == 0
    rep = json.loads((run / "report.json").read_text())
    assert rep["latent"] == [4, 7, 7] and rep["clusters"] == 10
