"""Image datasets: scikit-learn digits (embedded), Fashion-MNIST and MNIST (IDX files), CIFAR-10 (its
binary version), image folders.

Every loader returns an `ImageData`: images (N, C, H, W) float32 in [0, 1], integer labels
(N,) or None, and class names. `DATASETS` is the registry `--dataset` reads (see `molrmog.core.registry`):
a new dataset is one loader function and one `@register_dataset(...)`:

    @register_dataset("mine", "my images (in --data-dir)")
    def load_mine(split, opts: LoadOptions) -> ImageData:
        ...  # split is 'train' or 'test' with has_split=True, else always 'all' (a fixed 20% is held out)

Readers of files check what they read (sizes against headers, labels against classes) and refuse a bad
file with one `MolrmogError` naming it.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from molrmog.core.errors import MolrmogError
from molrmog.core.registry import Registry

__all__ = ["ImageData", "Dataset", "DATASETS", "LoadOptions", "register_dataset", "get_dataset", "split_spec",
           "load_digits", "load_fashion_mnist", "load_mnist", "load_cifar10", "load_image_folder", "load_dataset",
           "read_idx", "read_cifar10_batch", "fashion_mnist_dir", "dataset_dir", "holdout_split", "FASHION_CLASSES",
           "CIFAR10_CLASSES"]

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_FILES = IDX_FILES  # the same names as MNIST's
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}
CIFAR10_RECORD = 1 + 3 * 32 * 32  # one label byte, then 1024 red, 1024 green, 1024 blue bytes
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MAX_IMAGE_PIXELS = 4096 * 4096  # larger images are refused before they are decoded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    """What a loader may use besides the split (each dataset reads what applies to it)."""

    path: str | None = None  # the PATH of a 'name:PATH' spec (takes_path datasets)
    data_dir: str | None = None  # --data-dir: the folder holding the dataset's files
    size: int = 28  # image size of datasets that resize (folders)
    channels: int = 1  # image channels of datasets that convert (folders)
    skip_bad: bool = False  # skip unreadable images instead of stopping (folders)


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


def dataset_dir(name: str, root: str | os.PathLike | None = None, fallback: str | None = None) -> Path:
    """root (--data-dir), else $MOLRMOG_DATA/<name>, else `fallback` (a system folder), else
    ~/.cache/molrmog/data/<name>."""
    if root is not None:
        return Path(root)
    env = os.environ.get("MOLRMOG_DATA")
    if env:
        return Path(env) / name
    return Path(fallback) if fallback else Path.home() / ".cache" / "molrmog" / "data" / name


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """root, else $MOLRMOG_DATA/fashion-mnist, else Debian's /usr/share/datasets/fashion-mnist."""
    return dataset_dir("fashion-mnist", root, DEBIAN_FASHION_DIR)


def _open_idx(directory: Path, stem: str, what: str = "Fashion-MNIST", slug: str = "fashion-mnist"):
    for name in (stem + ".gz", stem):
        p = directory / name
        if p.is_file():
            return p
    debian = (f"Install Debian's package (apt-get install dataset-fashion-mnist, files go to {DEBIAN_FASHION_DIR}) "
              f"or put" if slug == "fashion-mnist" else "Put")
    raise MolrmogError(
        f"{what} file {stem}[.gz] not found in {directory}. {debian} the four official IDX files into "
        f"$MOLRMOG_DATA/{slug} or the folder given with --data-dir")


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


def _load_idx_split(directory: Path, split: str, what: str, slug: str, classes: list[str],
                    limit: int | None) -> ImageData:
    """One split of an MNIST-format dataset (28x28 images, labels 0..9) from its IDX files (gz or raw)."""
    if split not in IDX_FILES:
        raise MolrmogError(f"split must be 'train' or 'test', got {split!r}")
    img_stem, lab_stem = IDX_FILES[split]
    images = read_idx(_open_idx(directory, img_stem, what, slug))
    labels = read_idx(_open_idx(directory, lab_stem, what, slug))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise MolrmogError(f"{directory}: images {images.shape} and labels {labels.shape} do not match")
    if images.shape[1:] != (28, 28):
        raise MolrmogError(f"{directory}: {what} images are 28 x 28, these are {images.shape[1]} x "
                           f"{images.shape[2]}; the files are not {what} (use --dataset folder:PATH for "
                           f"other images)")
    if labels.max() >= len(classes):
        raise MolrmogError(f"{directory}: labels outside 0..{len(classes) - 1} (max {labels.max()})")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    return ImageData(x, torch.from_numpy(labels.astype(np.int64)), list(classes), slug)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None,
                       limit: int | None = None) -> ImageData:
    """Fashion-MNIST 28x28 from IDX files (gz or raw)."""
    return _load_idx_split(fashion_mnist_dir(root), split, "Fashion-MNIST", "fashion-mnist", FASHION_CLASSES, limit)


def load_mnist(split: str = "train", root: str | os.PathLike | None = None, limit: int | None = None) -> ImageData:
    """MNIST 28x28 (the paper's dataset) from its four IDX files (gz or raw) in `root`, else $MOLRMOG_DATA/mnist,
    else ~/.cache/molrmog/data/mnist."""
    return _load_idx_split(dataset_dir("mnist", root), split, "MNIST", "mnist", [str(i) for i in range(10)], limit)


# --- CIFAR-10 (binary version) -------------------------------------------------------------


def read_cifar10_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One file of CIFAR-10's binary version: records of 1 label byte + 3072 image bytes (R, G, B planes of
    32 x 32). Returns (images (N, 3, 32, 32) uint8, labels (N,) uint8); a size that is not a whole number of
    records, an empty file or a label outside 0..9 is refused naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MolrmogError(f"{path}: cannot read CIFAR-10 batch ({e})") from e
    if not raw or len(raw) % CIFAR10_RECORD:
        raise MolrmogError(f"{path}: {len(raw)} bytes is not a whole number of CIFAR-10 records ({CIFAR10_RECORD} "
                           f"bytes each); the file is truncated or not CIFAR-10's binary version")
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
    labels = rec[:, 0]
    if labels.max() >= 10:
        raise MolrmogError(f"{path}: label {int(labels.max())} outside 0..9; the file is not CIFAR-10's binary "
                           f"version (CIFAR-100 has two label bytes)")
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels


def _cifar10_dir(root: str | os.PathLike | None) -> Path:
    d = dataset_dir("cifar10", root)
    return d / "cifar-10-batches-bin" if (d / "cifar-10-batches-bin").is_dir() else d


def load_cifar10(split: str = "train", root: str | os.PathLike | None = None,
                 limit: int | None = None) -> ImageData:
    """CIFAR-10 32x32 colour from its binary version (data_batch_1..5.bin, test_batch.bin; the folder or its
    cifar-10-batches-bin sub-folder) in `root`, else $MOLRMOG_DATA/cifar10, else ~/.cache/molrmog/data/cifar10.
    No pickle is read."""
    if split not in CIFAR10_FILES:
        raise MolrmogError(f"split must be 'train' or 'test', got {split!r}")
    directory = _cifar10_dir(root)
    missing = [f for f in CIFAR10_FILES[split] if not (directory / f).is_file()]
    if missing:
        raise MolrmogError(f"CIFAR-10 file(s) {', '.join(missing)} not found in {directory}; unpack the binary "
                           f"version (cifar-10-binary.tar.gz) into $MOLRMOG_DATA/cifar10 or the folder given with "
                           f"--data-dir")
    parts = [read_cifar10_batch(directory / f) for f in CIFAR10_FILES[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    return ImageData(x, torch.from_numpy(labels.astype(np.int64)), list(CIFAR10_CLASSES), "cifar10")


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


# --- the registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """A registered dataset: its loader and what the rest of molrmog needs to know about it."""

    name: str
    load: Callable[[str, LoadOptions], ImageData]
    description: str  # for --dataset's help
    has_split: bool = False  # its own train / test split; else `load` gets 'all' and 20% is held out
    takes_path: bool = False  # named as 'name:PATH' (folder:PATH)
    defaults: dict = field(default_factory=dict)  # RunConfig fields left None -> these values (vae_width, latent...)
    featurizer_steps: int = 2000  # training steps of its FID featurizer (batch 128)

    def spec_help(self) -> str:
        return f"{self.name}:PATH" if self.takes_path else self.name


DATASETS: Registry[Dataset] = Registry("dataset")


def register_dataset(name: str, description: str, *, has_split: bool = False, takes_path: bool = False,
                     defaults: dict | None = None, featurizer_steps: int = 2000, replace: bool = False):
    """Decorator: register `load(split, opts: LoadOptions) -> ImageData` as dataset `name`."""
    def add(load):
        DATASETS.register(name, Dataset(name, load, description, has_split, takes_path, dict(defaults or {}),
                                        featurizer_steps), replace=replace)
        return load
    return add


def split_spec(spec: str) -> tuple[Dataset, str | None]:
    """'name' or 'name:PATH' -> (its registry entry, PATH or None); a bad spec names the choices."""
    if not isinstance(spec, str):
        raise MolrmogError(f"a dataset must be a name, got {spec!r}")
    name, sep, path = spec.partition(":")
    if name not in DATASETS:
        raise MolrmogError(f"unknown dataset {spec!r}; use {', '.join(d.spec_help() for d in DATASETS.values())}")
    entry = DATASETS.get(name)
    if entry.takes_path and not path:
        raise MolrmogError(f"dataset {name} needs a path: {name}:PATH")
    if not entry.takes_path and sep:
        raise MolrmogError(f"dataset {name} takes no path ({spec!r}); its files are found with --data-dir")
    return entry, (path or None)


def get_dataset(spec: str) -> Dataset:
    return split_spec(spec)[0]


# digits: the VAEs are tuned for 8x8 (README: the latent space; the cycle term makes them invert what they decode)
@register_dataset("digits", "scikit-learn's 8x8 digits (bundled, no download)", featurizer_steps=600,
                  defaults={"latent": (2, 4, 4), "vae_width": 32, "vae_steps": 400, "vae_beta": 0.1, "vae_lr": 2e-3,
                            "vae_blocks": 0, "vae_lr_schedule": "constant", "vae_cycle": 10.0})
def _digits(split: str, opts: LoadOptions) -> ImageData:
    return load_digits()


# a small KL weight sharpens Fashion-MNIST reconstructions; the cycle term costs reconstruction FID and doubles the
# step time there (README: the VAE study)
# 28x28 grey: the VAE study's choice (README): batches of 32, 3000 steps (as many images as 750 steps of 128)
MNIST_LIKE = {"latent": (4, 7, 7), "vae_width": 16, "vae_steps": 3000, "vae_batch": 32, "vae_beta": 0.001,
              "vae_lr": 4e-3, "vae_blocks": 0, "vae_lr_schedule": "cosine", "vae_cycle": 0.0, "vae_recon": "bernoulli"}


@register_dataset("fashion-mnist", "Fashion-MNIST 28x28 (IDX files: --data-dir, $MOLRMOG_DATA/fashion-mnist or "
                  "Debian's dataset-fashion-mnist)", has_split=True, featurizer_steps=2500, defaults=MNIST_LIKE)
def _fashion(split: str, opts: LoadOptions) -> ImageData:
    return load_fashion_mnist(split, opts.data_dir)


# MNIST: Fashion-MNIST's VAE settings (same size and format); the featurizer as for Fashion-MNIST
@register_dataset("mnist", "MNIST 28x28, the paper's dataset (IDX files: --data-dir or $MOLRMOG_DATA/mnist)",
                  has_split=True, featurizer_steps=2500, defaults=MNIST_LIKE)
def _mnist(split: str, opts: LoadOptions) -> ImageData:
    return load_mnist(split, opts.data_dir)


@register_dataset("cifar10", "CIFAR-10 32x32 colour (binary version: --data-dir or $MOLRMOG_DATA/cifar10)",
                  has_split=True, featurizer_steps=4000,
                  defaults={"latent": (4, 8, 8), "vae_width": 32, "vae_steps": 1000, "vae_beta": 0.001,
                            "vae_lr": 2e-3, "vae_blocks": 0, "vae_lr_schedule": "cosine", "vae_cycle": 0.0})
def _cifar10(split: str, opts: LoadOptions) -> ImageData:
    return load_cifar10(split, opts.data_dir)


@register_dataset("folder", "an image folder (sub-folders are classes; --size, --channels, --skip-bad apply)",
                  takes_path=True)
def _folder(split: str, opts: LoadOptions) -> ImageData:
    return load_image_folder(opts.path, opts.size, opts.channels, opts.skip_bad)


def load_dataset(spec: str, *, data_dir: str | None = None, limit: int | None = None, size: int = 28,
                 channels: int = 1, skip_bad: bool = False, split: str = "train") -> ImageData:
    """A registered dataset ('digits', 'fashion-mnist', 'mnist', 'cifar10', 'folder:PATH', ...); split 'train',
    'test' or 'all'.

    Datasets with their own split (Fashion-MNIST, MNIST, CIFAR-10: `has_split`) use it ('all' is the union).
    The others (digits, image folders) have none: a fixed 20% of the images (`holdout_split`) is the test split.
    """
    if split not in ("train", "test", "all"):
        raise MolrmogError(f"split must be train, test or all, got {split!r}")
    entry, path = split_spec(spec)
    opts = LoadOptions(path, data_dir, size, channels, skip_bad)
    if not entry.has_split:
        data = holdout_split(entry.load("all", opts), split)
    elif split == "all":
        a, b = entry.load("train", opts), entry.load("test", opts)
        data = ImageData(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]), a.classes, a.name)
    else:
        data = entry.load(split, opts)
    if limit is not None:
        if limit < 1:
            raise MolrmogError(f"limit must be >= 1, got {limit}", param="limit")
        g = torch.Generator().manual_seed(0)
        data = data.subset(torch.randperm(data.images.shape[0], generator=g)[:limit])
    return data
