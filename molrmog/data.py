"""Image datasets: scikit-learn digits (embedded), Fashion-MNIST (IDX files), image folders.

Every loader returns an `ImageData`: images (N, C, H, W) float32 in [0, 1], integer labels
(N,) or None, and class names.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import MolrmogError

__all__ = ["ImageData", "load_digits", "load_fashion_mnist", "load_image_folder", "load_dataset",
           "read_idx", "fashion_mnist_dir", "holdout_split", "FASHION_CLASSES"]

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MAX_IMAGE_PIXELS = 4096 * 4096  # larger images are refused before they are decoded

log = logging.getLogger(__name__)


@dataclass
class ImageData:
    images: Tensor  # (N, C, H, W) in [0, 1]
    labels: Tensor | None  # (N,) int64
    classes: list[str]
    name: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, idx) -> ImageData:
        return ImageData(self.images[idx], None if self.labels is None else self.labels[idx], self.classes,
                         self.name)


def load_digits() -> ImageData:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes); no download."""
    from sklearn.datasets import load_digits as _ld

    d = _ld()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    return ImageData(x, torch.as_tensor(d.target, dtype=torch.int64), [str(i) for i in range(10)], "digits")


# --- Fashion-MNIST -----------------------------------------------------------------------


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """root, else $MOLRMOG_DATA/fashion-mnist, else Debian's /usr/share/datasets/fashion-mnist."""
    if root is not None:
        return Path(root)
    env = os.environ.get("MOLRMOG_DATA")
    if env:
        return Path(env) / "fashion-mnist"
    return Path(DEBIAN_FASHION_DIR)


def _open_idx(directory: Path, stem: str):
    for name in (stem + ".gz", stem):
        p = directory / name
        if p.is_file():
            return p
    raise MolrmogError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}. Install Debian's package "
        f"(apt-get install dataset-fashion-mnist, files go to {DEBIAN_FASHION_DIR}) or put the four "
        f"official IDX files into $MOLRMOG_DATA/fashion-mnist or the folder given with --data-dir")


MAX_IDX_BYTES = 2**31  # a header promising more data than this is refused before anything is inflated


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed); checks the magic number, then reads exactly the size its
    header gives (at most MAX_IDX_BYTES: a damaged gz cannot inflate without bound) and checks nothing follows."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise MolrmogError(f"{path}: too short for an IDX header ({len(head)} bytes); the file is truncated")
            zero, dtype_code, ndim = head[0] * 256 + head[1], head[2], head[3]
            if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
                raise MolrmogError(f"{path}: bad IDX magic number {head.hex()} (expected 00000801 or 00000803)")
            shape = f.read(4 * ndim)
            if len(shape) < 4 * ndim:
                raise MolrmogError(f"{path}: the IDX header is cut short; the file is truncated")
            dims = struct.unpack(">" + "I" * ndim, shape)
            if dims[0] == 0:
                raise MolrmogError(f"{path}: the IDX file holds no items (its header says 0); use the complete file")
            size = int(np.prod(dims, dtype=np.int64))
            if size > MAX_IDX_BYTES:
                raise MolrmogError(f"{path}: its header promises {dims} = {size} bytes, more than the "
                                   f"{MAX_IDX_BYTES} this reader accepts; the file is corrupt")
            body = f.read(size)
            extra = len(f.read(1))
    except (OSError, EOFError, zlib.error) as e:
        raise MolrmogError(f"{path}: cannot read IDX file ({e}); the file is corrupt or truncated: download or "
                           f"reinstall it") from e
    if len(body) != size or extra:
        raise MolrmogError(f"{path}: the data {'is shorter than' if len(body) != size else 'runs past'} its header "
                           f"{dims} ({size} bytes); the file is truncated or corrupt")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None,
                       limit: int | None = None) -> ImageData:
    """Fashion-MNIST 28x28 from IDX files (gz or raw)."""
    if split not in FASHION_FILES:
        raise MolrmogError(f"split must be 'train' or 'test', got {split!r}")
    directory = fashion_mnist_dir(root)
    img_stem, lab_stem = FASHION_FILES[split]
    images = read_idx(_open_idx(directory, img_stem))
    labels = read_idx(_open_idx(directory, lab_stem))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise MolrmogError(f"{directory}: images {images.shape} and labels {labels.shape} do not match")
    if images.shape[1:] != (28, 28):
        raise MolrmogError(f"{directory}: Fashion-MNIST images are 28 x 28, these are {images.shape[1]} x "
                           f"{images.shape[2]}; the files are not Fashion-MNIST (use --dataset folder:PATH for "
                           f"other images)")
    if labels.max() >= 10:
        raise MolrmogError(f"{directory}: labels outside 0..9 (max {labels.max()})")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    return ImageData(x, torch.from_numpy(labels.astype(np.int64)), list(FASHION_CLASSES), "fashion-mnist")


# --- image folders ------------------------------------------------------------------------


def load_image_folder(path: str | os.PathLike, size: int = 28, channels: int = 1,
                      skip_bad: bool = False) -> ImageData:
    """Images under `path`: sub-folders are classes; files directly in `path` make an unlabelled set.
    Every image is converted to `channels` (1 or 3) and resized to size x size."""
    root = Path(path)
    if not root.is_dir():
        raise MolrmogError(f"image folder {root} does not exist")
    if channels not in (1, 3):
        raise MolrmogError(f"channels must be 1 or 3, got {channels}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if subdirs:
        groups = [(d.name, sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()))
                  for d in subdirs]
    else:
        groups = [(None, sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()))]
    xs, ys, bad = [], [], []
    for label, (name, files) in enumerate(groups):
        before = len(xs)
        for f in files:
            try:
                arr = _read_image(f, size, channels)
            except MolrmogError:
                if not skip_bad:
                    raise
                bad.append(str(f))
                continue
            xs.append(arr)
            ys.append(label)
        if name is not None and len(xs) == before:
            raise MolrmogError(f"class folder {root / name} has no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}"
                               f"); add images or remove the folder")
    if not xs:
        raise MolrmogError(f"no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    if bad:
        log.warning("skipped %d unreadable image(s): %s", len(bad), ", ".join(bad[:5]))
    labelled = groups[0][0] is not None
    return ImageData(torch.from_numpy(np.stack(xs)), torch.tensor(ys) if labelled else None,
                     [g[0] for g in groups] if labelled else [], f"folder:{root}")


def _read_image(f: Path, size: int, channels: int) -> np.ndarray:
    """One image as (channels, size, size) float32 in [0, 1]; any problem is a MolrmogError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise MolrmogError(f"image {f} claims {im.width} x {im.height} pixels (more than "
                                   f"{MAX_IMAGE_PIXELS:,}); remove it or pass --skip-bad")
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MolrmogError(f"cannot read image {f} ({type(e).__name__}: {e}); remove it or pass --skip-bad") from e
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


HOLDOUT_FRACTION = 0.2


def holdout_split(data: ImageData, split: str) -> ImageData:
    """A fixed train / test split for datasets without one: 20% of a seeded permutation is 'test'."""
    if split == "all":
        return data
    N = data.images.shape[0]
    if N < 2:
        raise MolrmogError(f"{data.name} has {N} image(s); at least 2 are needed (a fixed 20% is held out as the "
                           f"test split): add images")
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(20260101))
    n_test = max(1, round(HOLDOUT_FRACTION * N))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    return data.subset(idx.sort().values)


def load_dataset(spec: str, *, data_dir: str | None = None, limit: int | None = None, size: int = 28,
                 channels: int = 1, skip_bad: bool = False, split: str = "train") -> ImageData:
    """'digits', 'fashion-mnist' or 'folder:PATH'; split 'train', 'test' or 'all'.

    Fashion-MNIST has its official 60k / 10k split ('all' is their union). Digits and image
    folders have none: a fixed 20% of the images (`holdout_split`) is the test split.
    """
    if split not in ("train", "test", "all"):
        raise MolrmogError(f"split must be train, test or all, got {split!r}")
    if spec == "digits":
        data = holdout_split(load_digits(), split)
    elif spec == "fashion-mnist":
        if split == "all":
            a, b = load_fashion_mnist("train", data_dir), load_fashion_mnist("test", data_dir)
            data = ImageData(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]), a.classes, a.name)
        else:
            data = load_fashion_mnist(split, data_dir)
    elif spec.startswith("folder:"):
        data = holdout_split(load_image_folder(spec.removeprefix("folder:"), size, channels, skip_bad), split)
    else:
        raise MolrmogError(f"unknown dataset {spec!r}; use digits, fashion-mnist or folder:PATH")
    if limit is not None:
        if limit < 1:
            raise MolrmogError(f"--limit must be >= 1, got {limit}")
        g = torch.Generator().manual_seed(0)
        data = data.subset(torch.randperm(data.images.shape[0], generator=g)[:limit])
    return data
