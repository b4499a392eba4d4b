"""Dataset loaders: digits, Fashion-MNIST IDX files (real and hand-made), image folders."""

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from molrmog.pipeline.data import DEBIAN_FASHION_DIR, load_dataset, load_digits, load_fashion_mnist, read_idx


def test_digits_shape_range_and_labels():
    d = load_digits()
    assert d.images.shape == (1797, 1, 8, 8)
    assert 0 <= d.images.min() and d.images.max() <= 1
    assert torch.equal(torch.unique(d.labels), torch.arange(10))


def _write_idx(path: Path, arr: np.ndarray, gz: bool = True):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _fake_fashion(root: Path, n: int = 5, gz: bool = True):
    rng = np.random.default_rng(0)
    imgs, labs = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    sfx = ".gz" if gz else ""
    _write_idx(root / f"train-images-idx3-ubyte{sfx}", imgs, gz)
    _write_idx(root / f"train-labels-idx1-ubyte{sfx}", labs, gz)
    return imgs, labs


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_round_trip(tmp_path, gz):
    imgs, labs = _fake_fashion(tmp_path, gz=gz)
    d = load_fashion_mnist("train", tmp_path)
    assert d.images.shape == (5, 1, 28, 28)
    assert np.allclose(d.images[:, 0].numpy() * 255, imgs, atol=1e-3)
    assert d.labels.tolist() == labs.tolist()


def test_missing_files_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLRMOG_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist") as e:
        load_fashion_mnist("train")
    assert str(tmp_path / "fashion-mnist") in str(e.value)


def test_truncated_and_corrupt_idx_are_refused(tmp_path):
    _fake_fashion(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(p)
    p.write_bytes(b"\x01\x02\x03\x04" + b"\x00" * 20)
    with pytest.raises(ValueError, match="magic number"):
        read_idx(p)
    gzp = tmp_path / "x.gz"
    gzp.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 100) + b"\x00" * 100)[:-8])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_idx(gzp)


REAL = Path(DEBIAN_FASHION_DIR, "train-images-idx3-ubyte.gz").is_file()


@pytest.mark.skipif(not REAL and not os.environ.get("CI"), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_the_debian_package():
    train = load_fashion_mnist("train", DEBIAN_FASHION_DIR)
    test = load_fashion_mnist("test", DEBIAN_FASHION_DIR)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert 0.2 < train.images.mean() < 0.4  # Fashion-MNIST's mean pixel is about 0.286


def test_image_folder_labelled_resized_and_bad_files(tmp_path):
    from PIL import Image

    for cls, colour in (("cats", 200), ("dogs", 40)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (20 + i, 17), (colour, colour, colour)).save(tmp_path / cls / f"{i}.png")
    d = load_dataset(f"folder:{tmp_path}", size=16, channels=1, split="all")
    assert d.images.shape == (6, 1, 16, 16) and d.classes == ["cats", "dogs"]
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert abs(d.images[0].mean().item() - 200 / 255) < 0.02
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png.*--skip-bad"):
        load_dataset(f"folder:{tmp_path}", size=16)
    assert load_dataset(f"folder:{tmp_path}", size=16, skip_bad=True, split="all").images.shape[0] == 6
    rgb = load_dataset(f"folder:{tmp_path}", size=8, channels=3, skip_bad=True, split="all")
    assert rgb.images.shape == (6, 3, 8, 8)


def test_holdout_split_of_digits_is_fixed_disjoint_and_complete():
    every = load_dataset("digits", split="all")
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert train.images.shape[0] == 1438 and test.images.shape[0] == 359
    key = lambda d: {tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(d.images, d.labels, strict=True)}
    assert key(train) | key(test) == key(every) and len(key(train) & key(test)) < 5  # (a few exact duplicates)
    assert torch.equal(load_dataset("digits", split="test").images, test.images)
    with pytest.raises(ValueError, match="split must be"):
        load_dataset("digits", split="validation")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


# --- the registry's other datasets: MNIST (IDX) and CIFAR-10 (binary version), read from files written here ------


def _fake_mnist(root: Path, n_train: int = 7, n_test: int = 3):
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, stem, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        imgs, labs = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        _write_idx(root / f"{stem}-images-idx3-ubyte.gz", imgs)
        _write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labs)
        out[split] = (imgs, labs)
    return out


def test_mnist_reads_its_idx_files_from_data_dir_or_molrmog_data(tmp_path, monkeypatch):
    written = _fake_mnist(tmp_path / "mnist")
    d = load_dataset("mnist", data_dir=str(tmp_path / "mnist"), split="test")
    assert d.name == "mnist" and d.images.shape == (3, 1, 28, 28) and d.classes == [str(i) for i in range(10)]
    assert np.allclose(d.images[:, 0].numpy() * 255, written["test"][0], atol=1e-3)
    assert d.labels.tolist() == written["test"][1].tolist()
    monkeypatch.setenv("MOLRMOG_DATA", str(tmp_path))
    assert load_dataset("mnist", split="all").images.shape[0] == 10  # its own 7 / 3 split, united
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match=r"MNIST file t10k-labels-idx1-ubyte\[.gz\] not found") as e:
        load_dataset("mnist", split="test")
    assert "MOLRMOG_DATA/mnist" in str(e.value) and "apt-get" not in str(e.value)
    _write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", np.array([1, 2]))  # 2 labels for 3 images
    with pytest.raises(ValueError, match="do not match"):
        load_dataset("mnist", split="test")


def _cifar_records(n: int, seed: int, label_max: int = 10) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labs = rng.integers(0, label_max, n, dtype=np.uint8)
    raw = b"".join(bytes([lab]) + img.tobytes() for lab, img in zip(labs, imgs, strict=True))
    return raw, imgs, labs


def _fake_cifar10(root: Path, n: int = 2) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate([f"data_batch_{j}.bin" for j in range(1, 6)] + ["test_batch.bin"]):
        raw, imgs, labs = _cifar_records(n, i)
        (root / name).write_bytes(raw)
        out[name] = (imgs, labs)
    return out


def test_cifar10_reads_the_binary_version_planes_and_labels(tmp_path):
    written = _fake_cifar10(tmp_path / "cifar-10-batches-bin")
    train = load_dataset("cifar10", data_dir=str(tmp_path), split="train")  # finds the sub-folder of the archive
    assert train.images.shape == (10, 3, 32, 32) and train.name == "cifar10" and train.classes[0] == "airplane"
    first = written["data_batch_1.bin"]
    # record layout: red plane, green plane, blue plane, each 32 rows of 32
    assert np.allclose(train.images[:2].numpy() * 255, first[0], atol=1e-3)
    assert train.labels[:2].tolist() == first[1].tolist()
    assert train.labels[-2:].tolist() == written["data_batch_5.bin"][1].tolist()
    test = load_dataset("cifar10", data_dir=str(tmp_path / "cifar-10-batches-bin"), split="test")
    assert test.images.shape == (2, 3, 32, 32)


def test_cifar10_bad_files_are_refused_naming_the_file(tmp_path):
    from molrmog.pipeline.data import read_cifar10_batch

    _fake_cifar10(tmp_path)
    p = tmp_path / "test_batch.bin"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(ValueError, match="not a whole number of CIFAR-10 records") as e:
        load_dataset("cifar10", data_dir=str(tmp_path), split="test")
    assert str(p) in str(e.value)
    p.write_bytes(b"")
    with pytest.raises(ValueError, match="not a whole number"):
        read_cifar10_batch(p)
    p.write_bytes(bytes([42]) + bytes(3072))  # one record, label 42 (CIFAR-100 layouts differ)
    with pytest.raises(ValueError, match="label 42 outside 0..9"):
        read_cifar10_batch(p)
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(ValueError, match="data_batch_3.bin not found") as e:
        load_dataset("cifar10", data_dir=str(tmp_path), split="train")
    assert "--data-dir" in str(e.value)


def test_dataset_specs_are_checked_against_the_registry(tmp_path):
    from molrmog.pipeline.data import DATASETS, split_spec

    assert {"digits", "fashion-mnist", "mnist", "cifar10", "folder"} <= set(DATASETS)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; use digits, fashion-mnist, mnist, cifar10, "
                                         "folder:PATH"):
        split_spec("imagenet")
    with pytest.raises(ValueError, match="needs a path: folder:PATH"):
        split_spec("folder")
    with pytest.raises(ValueError, match="takes no path"):
        split_spec("mnist:/tmp")
    assert split_spec(f"folder:{tmp_path}")[1] == str(tmp_path)


def test_a_cifar10_run_trains_and_samples_from_written_files(tmp_path):
    """Colour 32x32 all the way through: VAEs, experts, report and `molrmog sample` on the binary version."""
    import json

    from molrmog.cli import main
    from tests.conftest import tiny

    rng = np.random.default_rng(3)
    root = tmp_path / "cifar"
    root.mkdir()
    for name in [f"data_batch_{j}.bin" for j in range(1, 6)] + ["test_batch.bin"]:
        labs = np.arange(10, dtype=np.uint8)  # one image of each class per file
        imgs = rng.integers(0, 256, (labs.size, 3, 32, 32), dtype=np.uint8)
        imgs[labs == 1, 0] = 250  # automobiles are red
        (root / name).write_bytes(b"".join(bytes([lab]) + img.tobytes() for lab, img in zip(labs, imgs,
                                                                                             strict=True)))
    run = tmp_path / "run"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(root), "--out", str(run),
                 *tiny(("mog",)), "--mog-modes", "2", "--mog-rank", "2", "--vae", "unified"]) == 0
    rep = json.loads((run / "report.json").read_text())
    assert rep["latent"] == [4, 8, 8] and rep["clusters"] == 10
    assert main(["sample", str(run), "--kind", "mog", "--class", "1", "--n", "4", "--npy",
                 "--out", str(tmp_path / "s.png"), "--no-progress"]) == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (4, 3, 32, 32) and np.isfinite(x).all()
