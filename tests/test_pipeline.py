"""The image pipeline end to end on small settings: train, sample, resume after SIGKILL, the kind registry,
the generated configuration, VAE layouts."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from molrmog.cli import build_parser, main
from molrmog.core.options import flag_of
from molrmog.models import kinds
from molrmog.pipeline.config import CommonOptions, RunConfig
from molrmog.pipeline.data import DEBIAN_FASHION_DIR, load_dataset
from tests.conftest import tiny

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "molrmog.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _weights(run: Path) -> dict:
    out = {}
    for f in sorted(run.glob(f"vae/*/{WEIGHTS}")) + sorted(run.glob(f"experts/*/*/{WEIGHTS}")):
        out[str(f.relative_to(run))] = load_file(str(f))
    return out


def test_train_writes_a_complete_run_directory(digits_run):
    for name in ("config.json", "clusters.safetensors", "clusters.json", "losses.csv", "loss_curves.png", "report.md",
                 "report.json", "samples_mog.png", "samples_gaussian.png", "samples_unet.png", "samples_data.png"):
        assert (digits_run / name).is_file(), name
    assert len(list(digits_run.glob(f"vae/*/{WEIGHTS}"))) == 10
    for kind in ("mog", "gaussian", "unet"):
        assert len(list(digits_run.glob(f"experts/{kind}/*/config.json"))) == 10
    rep = json.loads((digits_run / "report.json").read_text())
    e = rep["experts"]
    assert e["mog"]["parameters_per_expert"] * 10 <= e["unet"]["parameters_per_expert"]
    assert e["gaussian"]["parameters_per_expert"] < e["mog"]["parameters_per_expert"]
    assert "| mog |" in (digits_run / "report.md").read_text()
    cfg = json.loads((digits_run / "config.json").read_text())
    assert cfg["format_version"] == 2 and set(cfg["expert_options"]) == {"mog", "gaussian", "unet"}
    assert cfg["expert_options"]["mog"]["modes"] == 10 and cfg["latent"] == [2, 4, 4]  # every value written out


def test_sample_command_writes_png_and_npy(digits_run, tmp_path, capsys):
    out = tmp_path / "s.png"
    r = _cli("sample", str(digits_run), "--n", "6", "--class", "3", "--steps", "4", "--out", str(out), "--npy")
    assert r.returncode == 0, r.stderr
    arr = np.load(out.with_suffix(".npy"))
    assert arr.shape == (6, 1, 8, 8) and 0 <= arr.min() and arr.max() <= 1
    assert out.stat().st_size > 100
    capsys.readouterr()
    assert main(["sample", str(digits_run), "--class", "12"]) == 2
    err = capsys.readouterr().err
    assert "--class must lie in 0..9" in err and "Traceback" not in err


def test_a_unet_expert_can_be_edited(digits_run, tmp_path):
    """Forward-mode autodiff through the U-Net (attention on the math kernel): its pixel Jacobian exists."""
    out = tmp_path / "edit"
    assert main(["edit", str(digits_run), "--kind", "unet", "--directions", "1", "--lambdas", "0,0.1",
                 "--held-out", "0", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "edit.json").read_text())["singular_values"]


def test_resume_after_sigkill_reaches_the_same_weights(tmp_path, digits_run, monkeypatch):
    monkeypatch.setenv("MOLRMOG_THREADS", "2")  # the thread count of digits_run (the killed process inherits it)
    args = ["train", "--dataset", "digits", *tiny(("mog", "gaussian"))]
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "molrmog.cli", *args, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(run.glob("checkpoints/vae-3/checkpoint.safetensors")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "report.md").exists(), "the run finished before it could be killed"
    (run / "vae" / ".stale.tmp").write_text("half a file")  # what a killed atomic write leaves behind
    (run / "vae" / ".save-killed").mkdir()  # and what a Model.save killed before its rename leaves
    (run / "vae" / ".save-killed" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert not (run / "vae" / ".stale.tmp").exists() and not (run / "vae" / ".save-killed").exists()
    resumed = _weights(run)
    reference = {k: v for k, v in _weights(digits_run).items() if "unet" not in k}
    assert resumed.keys() == reference.keys() and len(reference) == 30
    for name, tensors in reference.items():
        for key, v in tensors.items():
            assert (resumed[name][key] == v).all(), f"{name}:{key} differs after resume"


def test_existing_run_is_not_overwritten(digits_run, capsys):
    before = (digits_run / "config.json").read_text()
    assert main(["train", "--out", str(digits_run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (digits_run / "config.json").read_text() == before


def test_lora_adapters_default_to_a_quarter_of_the_vae_steps():
    from molrmog.pipeline.config import RunConfig, resolve_config

    assert resolve_config(RunConfig(dataset="digits", vae="lora"), (1, 8, 8)).lora_steps == 100  # 400 / 4
    assert resolve_config(RunConfig(dataset="digits", vae="lora", vae_steps=2), (1, 8, 8)).lora_steps == 1
    assert resolve_config(RunConfig(dataset="digits", vae="lora", lora_steps=7), (1, 8, 8)).lora_steps == 7


@pytest.mark.parametrize("vae", ["unified", "lora"])
def test_unified_and_lora_vaes(tmp_path, vae):
    run = tmp_path / vae
    lora = ["--lora-steps", "6", "--workers", "2"] if vae == "lora" else []  # the adapters: 10 tasks on a pool
    assert main(["train", "--dataset", "digits", "--vae", vae, "--out", str(run), *tiny(("gaussian",)), *lora]) == 0
    assert (run / "samples_gaussian.png").is_file()
    if vae == "lora":  # peft adapters, one per cluster, on the shared backbone; adapters differ after training
        from molrmog.models.vae import ConvVAE, LoRAVAE

        v = LoRAVAE.load(run / "vae" / "lora")
        assert v.clusters == 10 and (run / "vae" / "backbone" / "config.json").is_file()
        b0, b1 = v.adapter_parameters(0)[1], v.adapter_parameters(1)[1]  # lora_B (zero at the start)
        assert b0.abs().sum() > 0 and not torch.equal(b0, b1)
        steps = {f.stem: len(json.loads(f.read_text())["loss"]) for f in (run / "logs").glob("vae-*.json")}
        assert steps == {"vae-backbone": 16, **{f"vae-lora-{k}": 6 for k in range(10)}}  # one backbone, 10 adapters
        backbone = ConvVAE.load(run / "vae" / "backbone").state_dict()
        for name, w in v.state_dict().items():  # the backbone, frozen under every adapter
            if ".lora_" not in name and name.replace(".base_layer.", ".") in backbone:
                assert torch.equal(w, backbone[name.replace(".base_layer.", ".")]), name
        for k in range(10):  # each adapter task's file is what the assembled VAE holds
            part = load_file(str(run / "vae" / "lora-adapters" / f"{k}.safetensors"))
            assert part and all(torch.equal(v.state_dict()[n], w) for n, w in part.items())


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
    assert main(["train", "--dataset", f"folder:{folder}", "--size", "8", "--clusters", "2", "--out", str(run),
                 *tiny(("gaussian",)), "--gaussian-rank", "2", "--vae-steps", "60"]) == 0
    labels = load_file(str(run / "clusters.safetensors"))["labels"].numpy()
    imgs = load_dataset(f"folder:{folder}", size=8).images  # the run's (train split) images, in order
    parity = (imgs[:, 0, :, :4].mean((1, 2)) > imgs[:, 0, :, 4:].mean((1, 2))).numpy().astype(int)
    agree = (labels == parity).mean()
    assert agree in (0.0, 1.0), "k-means on unified-VAE features should split the two kinds"


@pytest.mark.skipif(not Path(DEBIAN_FASHION_DIR, "train-images-idx3-ubyte.gz").is_file()
                    and not os.environ.get("CI"), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_subset_runs(tmp_path):
    run = tmp_path / "fm"
    assert main(["train", "--dataset", "fashion-mnist", "--limit", "600", "--out", str(run),
                 *tiny(("mog", "gaussian"))]) == 0
    rep = json.loads((run / "report.json").read_text())
    assert rep["latent"] == [4, 7, 7] and rep["clusters"] == 10


# --- the registry of expert kinds -------------------------------------------------------------


def readme_python(heading: str) -> str:
    """The first ```python block after `heading` in the README, as written there."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    part = text[text.index(heading):]
    start = part.index("```python\n") + len("```python\n")
    return part[start:part.index("```", start)]


@pytest.fixture
def toy_kind():
    """The README's "Adding an expert kind" example, run as written: one class (MLPScore) and one entry."""
    assert "widemlp" not in kinds.kind_names()  # the example must register a new kind, not an existing one
    exec(compile(readme_python("### Adding an expert kind"), "README.md", "exec"), {})
    yield kinds.get_kind("widemlp")
    kinds.unregister("widemlp")


def test_a_kind_registered_in_a_test_goes_through_train_sample_and_compare(toy_kind, tmp_path, capsys,
                                                                            featurizer_cache):
    out = tmp_path / "cmp"  # the unified-VAE ablation (the headline kind's) is test_compare_cli_writes_the_table's
    assert main(["compare", "--out", str(out), "--samples", "30", "--reference", "200", "--cache",
                 str(featurizer_cache), "--no-unified", *tiny(("mog", "widemlp")), "--widemlp-hidden", "4"]) == 0
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert "Wide MLP expert" in rows and "MoG expert" in rows
    run = out / "dedicated"  # compare trained it as `train` does
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["expert_options"]["widemlp"]["hidden"] == 4 and (run / "samples_widemlp.png").is_file()
    assert json.loads((run / "experts" / "widemlp" / "0" / "config.json").read_text())["net_config"]["hidden"] == 4
    assert main(["sample", str(run), "--kind", "widemlp", "--n", "4", "--steps", "3",
                 "--out", str(tmp_path / "t.png")]) == 0


def test_the_readme_library_snippet_runs_as_written(digits_run, tmp_path, monkeypatch):
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "dedicated").symlink_to(digits_run)  # the trained run the snippet loads
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(readme_python("## Library"), "README.md", "exec"), ns)
    assert ns["samples"].shape == (1000, 64) and torch.isfinite(ns["samples"]).all()
    assert (tmp_path / "my_dist" / "config.json").is_file() and type(ns["e"]).__name__ == "LatentExpert"


def test_seeds_come_from_kind_names_not_positions(toy_kind):
    seeds = {k: kinds.expert_seed(0, k, 3) for k in kinds.kind_names()}
    # the built-in kinds keep the salts their runs were made with, whatever else is registered
    assert {k: seeds[k] for k in ("mog", "gaussian", "unet")} == {"mog": 1003, "gaussian": 2003, "unet": 3003}
    assert len(set(seeds.values())) == len(seeds)
    with pytest.raises(ValueError, match="seed salt"):
        kinds.register(dataclasses.replace(toy_kind, name="widemlp2", seed_salt=1))


def test_kind_names_appear_only_in_the_registry_and_their_classes():
    root = Path(__file__).resolve().parents[1]
    allowed = {"molrmog/models/kinds.py", "molrmog/models/experts.py"}  # the registry and the kinds' own classes
    hits = []
    for p in sorted(list((root / "molrmog").rglob("*.py")) + list((root / "benchmarks").glob("*.py"))):
        rel = str(p.relative_to(root))
        if rel in allowed:
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if any(q in code for q in ('"mog"', '"gaussian"', '"unet"', "'mog'", "'gaussian'", "'unet'")):
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, "expert-kind names outside the registry:\n" + "\n".join(hits)


def test_train_help_lists_every_run_config_field():
    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    flags = {s for a in train._actions for s in a.option_strings}
    for f in dataclasses.fields(RunConfig):
        if f.name == "expert_options":
            continue
        if not f.metadata["option"]["cli"]:  # declared once, with the options every command shares
            assert f.name in {g.name for g in dataclasses.fields(CommonOptions)}
        assert flag_of(f) in flags, f"{f.name}: {flag_of(f)} missing from train --help"
    for name in kinds.kind_names():
        for f in dataclasses.fields(kinds.get_kind(name).options):
            assert f"--{name}-{f.name.replace('_', '-')}" in flags
    for needed in ("--vae-lr", "--lora-rank", "--mog-lr", "--unet-lr", "--mog-ema-decay", "--schedule",
                   "--samples-per-class", "--device", "--seed", "--no-progress", "--executor", "--workers"):
        assert needed in flags


def test_training_leaves_the_global_rng_alone_and_logs_each_stage(tmp_path, capsys):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    assert main(["train", "--out", str(tmp_path / "r"), *tiny(("gaussian",))]) == 0
    assert torch.equal(torch.get_rng_state(), state)
    err = capsys.readouterr().err
    for stage in ("clusters:", "vae-0:", "vae-9:", "gaussian-0:", "gaussian-9:", "report of"):
        assert stage in err, stage
    assert " s" in err.split("vae-0:")[1].splitlines()[0]  # each stage line carries its wall time


def test_run_config_is_not_mutated_by_training(tmp_path):
    from molrmog.pipeline.stages import train_run

    cfg = RunConfig(experts=("gaussian",), vae_steps=4, checkpoint_every=2,
                    expert_options={"gaussian": kinds.get_kind("gaussian").options(steps=4)})
    before = dataclasses.asdict(cfg)
    train_run(tmp_path / "r", cfg, progress=False)
    assert dataclasses.asdict(cfg) == before and cfg.latent is None


def test_the_molr_kind_trains_with_a_matched_floor_and_samples_exactly(tmp_path, capsys):
    """The MoLR-MoG expert: a learnable q-dim subspace of the latent with full-covariance modes in it, packed
    Cholesky factors, and the floor off the subspace matched to the data's variance after training."""
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), *tiny(("molr",)), "--molr-dim", "6", "--molr-modes", "3"]) == 0
    D, q, n = 32, 6, 3
    report = json.loads((run / "report.json").read_text())["experts"]["molr"]
    assert report["parameters_per_expert"] == D * q + 1 + n * (q + q * (q + 1) // 2 + 1)
    for k in range(10):
        net = kinds.LatentExpert.load(run / "experts" / "molr" / str(k), "expert").net
        assert type(net).__name__ == "MoEScore" and net.config["full_cov"] and net.floor > 0
        assert net.variance_gap() == pytest.approx(0, abs=1e-9)  # the law has the data's variance
        assert torch.equal(net.experts[0].U, net.experts[0].U.tril())
    out = tmp_path / "s.png"
    assert main(["sample", str(run), "--kind", "molr", "--sampler", "exact", "--steps", "1", "--n", "6", "--npy",
                 "--out", str(out)]) == 0
    imgs = np.load(out.with_suffix(".npy"))
    assert imgs.shape[0] == 6 and np.isfinite(imgs).all()
    # the kind's start: with floor 'match' DSM trains a law that already has the data's variance
    entry, g = kinds.get_kind("molr"), torch.Generator().manual_seed(0)
    u = torch.randn(300, 4, generator=g) @ torch.randn(4, D, generator=g) + 0.5 * torch.randn(300, D, generator=g)
    u = (u - u.mean(0)) / u.std(0)
    for floor in ("match", "none"):
        net = entry.build((2, 4, 4), entry.options(dim=q, modes=n, floor=floor), "vp", 0).double()
        entry.init_from_data(net, u.double(), entry.options(dim=q, modes=n, floor=floor), 0)
        if floor == "match":
            assert net.floor > 0 and net.variance_gap() == pytest.approx(0, abs=1e-9)
        else:
            assert net.floor == 0 and net.variance_gap() > 0
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "bad"), *tiny(("molr",)), "--molr-dim", "40"]) == 2
    assert "--molr-dim 40 exceeds the latent dimension 32" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything is written
