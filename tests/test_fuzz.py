"""A fuzz harness for bad input (issue 20): every file a command reads from a run, damaged systematically, and
numeric options at and just beyond their bounds. Every case must end in exit 0 with finite output, or in exit 2
with one line `molrmog: error: ...`; never a traceback, never exit 0 with NaN. A new command joins by adding
its argument lists to COMMANDS (and its options to BOUNDS)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from molrmog.cli import main
from tests.conftest import tiny

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "run"
    assert main(["train", "--dataset", "digits", "--out", str(out), *tiny(("mog", "gaussian"))]) == 0
    return out


def _outcome(capsys, code: int, outputs: list[Path]) -> str:
    """'ok' or 'refused'; fails the test on a traceback, a multi-line error, or exit 0 with non-finite output."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    if code == 0:
        for f in outputs:
            if f.suffix == ".npy" and f.is_file():
                assert np.isfinite(np.load(f)).all(), f"{f} holds NaN or Inf after exit 0"
            if f.suffix == ".json" and f.is_file():
                text = f.read_text()
                assert not any(c in text for c in ("NaN", "Infinity")), f"{f} holds NaN or Inf after exit 0"
                json.loads(text)
        return "ok"
    errors = [line for line in err.splitlines() if line.startswith("molrmog: error: ")]
    other = [line for line in err.splitlines() if line.strip() and not line.startswith("molrmog: ")]
    assert code == 2 and len(errors) == 1 and not other, (code, err[-2000:])
    return "refused"


# --- damaged files --------------------------------------------------------------------------------------------

def _json_damages(raw: bytes):
    obj = json.loads(raw)
    yield "truncated", raw[: len(raw) // 2]
    yield "not json", b"\x00\xffnot json"
    yield "a list", b"[1, 2, 3]"
    if isinstance(obj, dict) and obj:
        key = sorted(k for k in obj if not k.startswith("_"))[0]
        yield f"missing {key}", json.dumps({k: v for k, v in obj.items() if k != key}).encode()
        yield "unknown key", json.dumps({**obj, "surprise": 1}).encode()
        for k, v in sorted(obj.items()):
            if isinstance(v, int | float) and not isinstance(v, bool):
                yield f"{k} as text", json.dumps({**obj, k: "twelve"}).encode()
                yield f"{k} negative", json.dumps({**obj, k: -abs(v) - 1}).encode()
                break


def _tensor_damages(path: Path):
    raw = path.read_bytes()
    t = load_file(str(path))
    yield "truncated", raw[: len(raw) // 2]
    flipped = bytearray(raw)
    for i in range(8, len(flipped), max(1, len(flipped) // 7)):
        flipped[i] ^= 0xFF
    yield "bytes flipped", bytes(flipped)
    name = sorted(k for k, v in t.items() if v.is_floating_point())[0]

    def saved(d: dict) -> bytes:
        tmp = path.with_suffix(".fuzz")
        save_file(d, str(tmp))
        data = tmp.read_bytes()
        tmp.unlink()
        return data

    for label, value in (("NaN", math.nan), ("Inf", math.inf)):
        bad = t[name].clone()
        bad.view(-1)[0] = value
        yield f"{name} {label}", saved({**t, name: bad})
    yield f"{name} negative", saved({**t, name: -t[name].abs() - 1})
    yield "float16", saved({k: v.half() if v.is_floating_point() else v for k, v in t.items()})
    yield f"{name} wrong shape", saved({**t, name: t[name].reshape(-1)[:1].clone()})
    yield f"{name} missing", saved({k: v for k, v in t.items() if k != name})


FILES = ["config.json", "clusters.json", "clusters.safetensors", f"vae/0/{WEIGHTS}", "vae/0/config.json",
         f"experts/mog/0/{WEIGHTS}", "experts/mog/0/config.json", f"experts/gaussian/1/{WEIGHTS}"]


def _cases():
    for rel in FILES:
        yield rel, "a directory"
        kinds = ("truncated", "not json", "a list", "missing", "unknown key", "as text", "negative") \
            if rel.endswith(".json") else ("truncated", "bytes flipped", "NaN", "Inf", "negative", "float16",
                                            "wrong shape", "missing")
        for k in kinds:
            yield rel, k


def _damage(run: Path, rel: str, kind: str) -> bool:
    path = run / rel
    if kind == "a directory":
        path.unlink()
        path.mkdir()
        return True
    gen = _json_damages(path.read_bytes()) if rel.endswith(".json") else _tensor_damages(path)
    for label, data in gen:
        if kind in label:
            path.write_bytes(data)
            return True
    return False


@pytest.mark.parametrize("rel,kind", list(_cases()), ids=lambda v: str(v).replace("/", "_"))
def test_a_damaged_run_file_is_refused_in_one_line_or_harmless(clean_run, tmp_path, capsys, rel, kind):
    run = tmp_path / "run"
    shutil.copytree(clean_run, run, ignore=shutil.ignore_patterns("checkpoints", "logs", "*.png"))
    if not _damage(run, rel, kind):
        pytest.skip(f"{kind} does not apply to {rel}")
    out = tmp_path / "out"
    out.mkdir()
    kind_of = "gaussian" if "gaussian" in rel else "mog"
    for args, outputs in (
        (["sample", str(run), "--kind", kind_of, "--n", "6", "--steps", "3", "--out", str(out / "s.png"), "--npy",
          "--no-progress"],
         [out / "s.npy"]),
        (["watermark", "embed", str(run), "--kind", kind_of, "--method", "ring", "--n", "4", "--out", str(out / "wm"),
          "--no-progress", "--invert-steps", "5"],
         [out / "wm" / "watermarked.npy", out / "wm" / "key.json"]),
        (["analyze", "roundtrip", str(run), "--kinds", kind_of, "--samples", "4", "--out", str(out / "rt"),
          "--no-progress"],
         [out / "rt" / "roundtrip.json"]),
    ):
        _outcome(capsys, main(args), outputs)


# --- numeric options at and beyond their bounds -----------------------------------------------------------------

BOUNDS = [
    ["sample", "{run}", "--n", "0"], ["sample", "{run}", "--n", "-3"], ["sample", "{run}", "--n", "1000001"],
    ["sample", "{run}", "--steps", "0"], ["sample", "{run}", "--class", "-1"], ["sample", "{run}", "--class", "10"],
    ["sample", "{run}", "--seed", "-1"], ["sample", "{run}", "--seed", "99999999999"],
    ["sample", "{run}", "--n", "2", "--steps", "1", "--sampler", "exact"],
    ["sample", "{run}", "--device", "cuda:7"], ["sample", "{run}", "--kind", "unet"],
    ["sample", "{run}", "--out", "{file}"],
    ["edit", "{run}", "--lambdas", "abc"], ["edit", "{run}", "--lambdas", "nan,inf"],
    ["edit", "{run}", "--mask", "0,0,8,8"], ["edit", "{run}", "--held-out", "-1"], ["edit", "{run}", "--t", "0"],
    ["edit", "{run}", "--cluster", "99"], ["edit", "{run}", "--directions", "0"], ["edit", "{run}", "--out", "{file}"],
    ["watermark", "embed", "{run}", "--n", "0"], ["watermark", "embed", "{run}", "--n", "100000000"],
    ["watermark", "evaluate", "{run}", "--n", "0"], ["watermark", "embed", "{run}", "--strength", "nan"],
    ["watermark", "detect", "{run}"], ["watermark", "detect", "{run}", "--images", "{file}"],
    ["watermark", "embed", "{run}", "--invert-steps", "-1"], ["watermark", "embed", "{run}", "--method", "rings"],
    ["watermark", "embed", "{run}", "--method", "ring", "--n", "2", "--invert-steps", "0"],
    ["watermark", "embed", "{run}", "--invert-sigma", "-0.01"],
    ["watermark", "embed", "{run}", "--invert-sigma", "nan"],
    ["watermark", "evaluate", "{run}", "--invert-sigma", "2"],
    ["watermark", "evaluate", "{run}", "--fid-samples", "1"], ["watermark", "evaluate", "{run}", "--draws", "0"],
    ["analyze", "key-bound", "{run}", "--attacks", "rain"], ["analyze", "key-bound", "{run}", "--n", "1"],
    ["analyze", "key-bound", "{run}", "--fit-sigma", "0"], ["analyze", "key-bound", "{run}", "--cluster", "99"],
    ["analyze", "roundtrip", "{run}", "--samples", "1"], ["analyze", "roundtrip", "{run}", "--samples", "100001"],
    ["analyze", "roundtrip", "{run}", "--kinds", "unet"], ["analyze", "roundtrip", "{run}", "--out", "{file}"],
    ["analyze", "jacobian", "{run}", "--tol", "-1"], ["analyze", "jacobian", "{run}", "--tol", "nan"],
    ["analyze", "jacobian", "{run}", "--cluster", "-1"], ["analyze", "jacobian", "{run}", "--out", "{file}"],
    ["synth", "--D", "100000", "--K", "1000", "--d", "100", "--out", "{tmp}/synth"],
    ["synth", "--seed", "-1", "--out", "{tmp}/synth"],
    ["synth", "--sampler", "exact", "--steps", "2", "--samples", "100", "--out", "{tmp}/synth"],
    ["synth", "--device", "cuda", "--out", "{tmp}/synth"],
    ["experiment", "few-step", "--quick", "--seed", "-1", "--out", "{tmp}/fs"],
    ["experiment", "few-step", "--quick", "--device", "cuda", "--out", "{tmp}/fs"],
    ["train", "--dataset", "digits", "--out", "{file}", *tiny(("gaussian",))],
]


@pytest.mark.parametrize("argv", BOUNDS, ids=lambda a: " ".join(a[:6]))
def test_an_option_at_or_beyond_its_bounds_is_refused_in_one_line_or_works(clean_run, tmp_path, capsys, argv):
    if any("cuda" in a for a in argv) and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: --device cuda is valid here")
    file = tmp_path / "a-file.txt"
    file.write_text("not a folder, not images")
    args = [a.format(run=clean_run, file=file, tmp=tmp_path) for a in argv] + ["--no-progress"]
    if args[0] in ("sample", "edit", "analyze", "watermark") and "--out" not in args:
        args += ["--out", str(tmp_path / ("o.png" if args[0] == "sample" else "o"))]
    _outcome(capsys, main(args), list(tmp_path.rglob("*.npy")) + list(tmp_path.rglob("*.json")))
    assert file.read_text() == "not a folder, not images"  # nothing that existed was changed


def test_commands_that_used_to_fail_on_valid_input_now_work(clean_run, tmp_path, capsys):
    """synth's exact sampler (offered by --help) and watermark detect on the files embed wrote."""
    assert main(["synth", "--sampler", "exact", "--steps", "2", "--samples", "100", "--out", str(tmp_path / "s"),
                 "--no-progress"]) == 0
    wm = tmp_path / "wm"
    assert main(["watermark", "embed", str(clean_run), "--n", "4", "--out", str(wm), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["watermark", "detect", str(clean_run), "--images", str(wm / "watermarked.npy"), "--out", str(wm),
                 "--no-progress"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
    np.save(tmp_path / "u8.npy", (np.load(wm / "watermarked.npy") * 255).astype(np.uint8))
    assert main(["watermark", "detect", str(clean_run), "--images", str(tmp_path / "u8.npy"), "--out", str(wm),
                 "--no-progress"]) == 2
    assert "divide by 255" in capsys.readouterr().err


def test_the_exact_sampler_keeps_half_precision():
    from molrmog.core.distributions import MoLRMoG
    from molrmog.core.samplers import generate
    from molrmog.core.schedules import make_grid

    p = MoLRMoG.random(D=8, K=2, d=2, n=2, seed=0, dtype=torch.float32)
    x = generate(p.score, 16, 8, p.schedule, make_grid(p.schedule, 2, "karras"), "exact",
                 generator=torch.Generator().manual_seed(0), dtype=torch.float16)
    assert x.dtype == torch.float16 and torch.isfinite(x).all()


# --- the library: bad input is a MolrmogError naming the parameter, never a deep RuntimeError ------------------

def test_library_refusals_and_half_precision(tmp_path):
    import gzip
    import struct

    from molrmog.core.em import select_mppca
    from molrmog.core.errors import MolrmogError
    from molrmog.core.samplers import generate
    from molrmog.core.schedules import make_grid
    from molrmog.models.experts import MoGExpert
    from molrmog.models.kinds import LatentExpert
    from molrmog.pipeline.data import read_idx
    from molrmog.training.train import train_score

    net = MoGExpert(6, n=2, r=2, seed=0)
    with pytest.raises(MolrmogError, match=r"6-dim points; give data of shape \(N, 6\)"):
        train_score(net, torch.randn(20, 7), steps=1, progress=False)
    e = LatentExpert.wrap("mog", (1, 2, 3), net)
    u = torch.randn(5, 6, dtype=torch.float16)
    assert e.score(u, torch.tensor(0.5)).dtype == torch.float16 and torch.isfinite(e.score(u, torch.tensor(0.5))).all()
    x = generate(e, 8, 6, e.schedule, make_grid(e.schedule, 5, "karras"), "heun",
                 generator=torch.Generator().manual_seed(0), dtype=torch.float16)
    assert x.dtype == torch.float16 and torch.isfinite(x).all()
    with pytest.raises(MolrmogError, match="param_cap 1 is below the smallest candidate"):
        select_mppca(torch.randn(50, 4), [1, 2], [1, 2], param_cap=1)
    bomb = tmp_path / "bomb-idx3-ubyte.gz"  # a small header, then a stream that inflates far past it
    with gzip.open(bomb, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", 1, 28, 28))
        f.write(bytes(20 * 2**20))
    assert bomb.stat().st_size < 2**20
    with pytest.raises(MolrmogError, match="runs past its header"):
        read_idx(bomb)


# --- damaged training inputs: IDX files, image folders, checkpoints ---------------------------------------------
# A refused `train` must leave no --out behind; an accepted one must train a finite run.

def _idx(arr: np.ndarray) -> bytes:
    import struct

    return bytes([0, 0, 8, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.astype(np.uint8).tobytes()


FASHION = {"train-images-idx3-ubyte.gz": "images", "train-labels-idx1-ubyte": "labels",
           "t10k-images-idx3-ubyte": "images", "t10k-labels-idx1-ubyte.gz": "labels"}


def _fashion_files(root: Path) -> None:
    """Tiny Fashion-MNIST in the real format: 40 training and 20 test images, gz and raw files mixed."""
    import gzip

    rng = np.random.default_rng(0)
    for name, what in FASHION.items():
        n = 40 if name.startswith("train") else 20
        arr = rng.integers(0, 256, (n, 28, 28)) if what == "images" else np.arange(n) % 10
        raw = _idx(arr)
        (root / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)


def _idx_damages(path: Path):
    import gzip

    raw = path.read_bytes()
    body = gzip.decompress(raw) if path.suffix == ".gz" else raw
    pack = (lambda b: gzip.compress(b)) if path.suffix == ".gz" else (lambda b: b)
    yield "truncated", raw[: len(raw) // 2]
    yield "header only", pack(body[:8])
    yield "bad magic", pack(b"\x08\x08" + body[2:])
    yield "ndim 2", pack(body[:3] + b"\x02" + body[4:])
    yield "count off by one", pack(body[:4] + (int.from_bytes(body[4:8], "big") + 1).to_bytes(4, "big") + body[8:])
    yield "trailing bytes", pack(body + b"\x00" * 7)
    yield "empty file", b""
    if body[3] == 1:
        yield "label 200", pack(body[:8] + bytes([200]) + body[9:])
    else:
        n = int.from_bytes(body[4:8], "big")
        yield "images 14x14", pack(_idx(np.frombuffer(body[16:], np.uint8).reshape(n, 28, 28)[:, ::2, ::2]))
    if path.suffix == ".gz":
        yield "not gzip", body


def _fashion_cases():
    for name in FASHION:
        for kind in ("a directory", "missing", "truncated", "header only", "bad magic", "ndim 2", "count off by one",
                     "trailing bytes", "empty file", "label 200", "images 14x14", "not gzip"):
            if ("label" in kind and "labels" not in name) or ("images 14" in kind and "images" not in name) \
                    or (kind == "not gzip" and not name.endswith(".gz")):
                continue
            yield name, kind


def _train_outcome(capsys, out: Path, args: list[str], command: str = "train") -> str:
    extra = ["--samples", "4", "--reference", "4", "--no-unified", "--cache", str(out.parent / "cache")] \
        if command == "compare" else []
    result = _outcome(capsys, main([command, *args, "--out", str(out), *tiny(("gaussian",), gaussian=1),
                                    "--vae-steps", "2", *extra]), [])
    if result == "refused":
        assert not out.exists(), f"a refused train left {sorted(p.name for p in out.iterdir())} in {out}"
    else:
        assert (out / "report.json").is_file()
    return result


@pytest.mark.parametrize("name,kind", list(_fashion_cases()), ids=lambda v: str(v))
def test_a_damaged_idx_file_is_refused_before_anything_is_written(tmp_path, capsys, name, kind):
    root = tmp_path / "fashion"
    root.mkdir()
    _fashion_files(root)
    path = root / name
    if kind == "a directory":
        path.unlink()
        path.mkdir()
    elif kind == "missing":
        path.unlink()
    else:
        path.write_bytes(dict(_idx_damages(path))[kind])
    command = "train" if name.startswith("train") else "compare"  # train reads no test split; compare does
    result = _train_outcome(capsys, tmp_path / "run", ["--dataset", "fashion-mnist", "--data-dir", str(root)],
                            command)
    assert result == "refused", "a damaged Fashion-MNIST file was read as if it were whole"


def _folder(root: Path, classes: dict[str, int]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


FOLDER_DAMAGES = {
    "truncated png": lambda d: (d / "a" / "0.png").write_bytes((d / "a" / "0.png").read_bytes()[:30]),
    "text as png": lambda d: (d / "a" / "1.png").write_text("not an image"),
    "empty png": lambda d: (d / "a" / "2.png").write_bytes(b""),
    "folder named png": lambda d: (d / "a" / "3.png").unlink() or (d / "a" / "3.png").mkdir(),
    "empty class": lambda d: (d / "c").mkdir(),
    "one image class": lambda d: _folder(d / "tmp", {"c": 1}) and (d / "tmp" / "c").rename(d / "c"),
    "no images at all": lambda d: [p.unlink() for p in d.rglob("*.png")],
}


@pytest.mark.parametrize("damage", list(FOLDER_DAMAGES))
@pytest.mark.parametrize("skip_bad", [False, True], ids=["strict", "skip-bad"])
def test_a_damaged_image_folder_is_refused_before_train_writes_anything(tmp_path, capsys, damage, skip_bad):
    root = _folder(tmp_path / "imgs", {"a": 8, "b": 8})
    FOLDER_DAMAGES[damage](root)
    shutil.rmtree(root / "tmp", ignore_errors=True)
    args = ["--dataset", f"folder:{root}", "--size", "8"] + (["--skip-bad"] if skip_bad else [])
    result = _train_outcome(capsys, tmp_path / "run", args)
    unreadable = damage in ("truncated png", "text as png", "empty png")
    harmless = damage == "folder named png"  # not a file: not an image either
    assert result == ("ok" if harmless or (skip_bad and unreadable) else "refused")


CHECKPOINT = "checkpoints/vae-3/checkpoint.safetensors"


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A tiny run stopped with VAE 3 unfinished: its checkpoint is what --resume reads first."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert main(["train", "--dataset", "digits", "--out", str(out), *tiny(("gaussian",), gaussian=1),
                 "--vae-steps", "8", "--checkpoint-every", "4"]) == 0
    shutil.rmtree(out / "vae" / "3")
    for p in [*out.glob("experts/gaussian/*"), out / "report.json", out / "report.md", out / "logs" / "vae-3.json"]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert (out / CHECKPOINT).is_file()
    return out


@pytest.mark.parametrize("kind", ["a directory", "truncated", "bytes flipped", "NaN", "Inf", "float16",
                                  "wrong shape", "missing"])
def test_a_damaged_checkpoint_is_named_on_resume(stopped_run, tmp_path, capsys, kind):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    path = run / CHECKPOINT
    if kind == "a directory":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(dict(_tensor_damages(path)).get(next(k for k, _ in _tensor_damages(path) if kind in k)))
    damaged = _snapshot_bytes(path)
    code = main(["train", "--resume", str(run), "--no-progress"])
    if _outcome(capsys, code, []) == "refused":
        assert _snapshot_bytes(path) == damaged  # the evidence stays as it was
    else:
        assert (run / "report.json").is_file() and torch.isfinite(load_file(str(run / "vae" / "3" / WEIGHTS))[
            "decoder.0.bias"]).all()


def _snapshot_bytes(path: Path):
    return path.read_bytes() if path.is_file() else sorted(p.name for p in path.iterdir())
