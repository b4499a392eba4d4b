"""Dataset loaders: digits, Fashion-MNIST IDX files (real and hand-made), image folders."""

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from molrmog.data import DEBIAN_FASHION_DIR, load_dataset, load_digits, load_fashion_mnist, read_idx


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
