"""The offline feature extractor: a small CNN classifier trained on the dataset itself.

FID/KID, precision/recall, class score and the similarity scores need an image embedding.
Downloading Inception weights is not an option here, so each dataset gets its own classifier,
trained once (`molrmog featurizer --dataset NAME`) on the train split and cached as
config.json + model.safetensors with its test accuracy recorded. Its penultimate layer (after
the ReLU) is the feature space; its softmax gives the class score.

Cache: --cache DIR, else $MOLRMOG_CACHE, else ~/.cache/molrmog; one folder per dataset.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from molrmog.core.artefacts import Model, is_saved, register_to_config, write_json
from molrmog.core.errors import MolrmogError
from molrmog.pipeline.data import ImageData, get_dataset, load_dataset, split_spec
from molrmog.training.train import fit

__all__ = ["Featurizer", "train_featurizer", "get_featurizer", "featurizer_dir", "check_featurizer"]

log = logging.getLogger(__name__)

# training steps at batch 128 are the dataset's `featurizer_steps` (molrmog.data.DATASETS): digits 600 (~50 epochs
# of 1438 images), Fashion-MNIST 2500 (~5 epochs of 60k)


class Featurizer(Model):
    """conv32-[pool]-conv64-pool-conv64-avgpool(4x4)-fc(features)-fc(classes), batch-normalised.

    Its weights are initialised from the global RNG (like any torch module): `train_featurizer`
    seeds it inside a forked RNG state."""

    @register_to_config
    def __init__(self, image_shape=(1, 28, 28), classes: int = 10, features: int = 128, width: int = 32,
                 seed: int = 0):
        super().__init__()
        C = image_shape[0]
        w = width
        self.image_shape = tuple(int(v) for v in image_shape)
        pool = min(image_shape[1:]) >= 16  # 28x28: pool to 14 first; 8x8: keep the resolution
        self.body = nn.Sequential(
            nn.Conv2d(C, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.MaxPool2d(2) if pool else nn.Identity(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Dropout(0.25), nn.Linear(2 * w * 16, features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(features, classes))
        self.num_features = int(features)  # torchmetrics reads this for custom feature modules
        self.register_buffer("test_accuracy", torch.tensor(float("nan")))

    def check_images(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise MolrmogError(f"images must have shape (N, {', '.join(map(str, self.image_shape))}) for this "
                             f"featurizer, got {tuple(x.shape)}; resize them or train a featurizer for "
                             f"this image size")
        if not torch.isfinite(x).all():
            raise MolrmogError("images contain NaN or Inf")
        return x

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (N, num_features) of images in [0, 1]."""
        return self.body(2 * self.check_images(x) - 1)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (N, classes)."""
        return self.head(self.features(x))

    @torch.no_grad()
    def embed(self, x: Tensor, batch: int = 1024) -> tuple[Tensor, Tensor]:
        """(features, class probabilities) in eval mode, batched; float32 on the model's device."""
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        feats, probs = [], []
        for b in self.check_images(x).split(batch):
            f = self.body(2 * b.to(dev, torch.float32) - 1)
            feats.append(f.cpu())
            probs.append(self.head(f).softmax(-1).cpu())
        self.train(was)
        return torch.cat(feats), torch.cat(probs)


def _slug(dataset: str) -> str:
    entry, path = split_spec(dataset)
    if path is not None:  # folder:PATH -> folder-<hash of the absolute path>
        return f"{entry.name}-" + hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:12]
    return entry.name


def featurizer_dir(dataset: str, cache: str | os.PathLike | None = None) -> Path:
    root = Path(cache or os.environ.get("MOLRMOG_CACHE") or Path.home() / ".cache" / "molrmog")
    return root / "featurizer" / _slug(dataset)


def _dataset_kwargs(size: int, channels: int, data_dir: str | None) -> dict:
    return {"size": size, "channels": channels, "data_dir": data_dir}


@torch.no_grad()
def accuracy(model: Featurizer, data: ImageData) -> float:
    _, probs = model.embed(data.images)
    return float((probs.argmax(1) == data.labels).double().mean())


def train_featurizer(dataset: str, *, cache: str | os.PathLike | None = None, steps: int | None = None,
                     batch: int = 128, lr: float = 2e-3, seed: int = 0, size: int = 28, channels: int = 1,
                     data_dir: str | None = None, device: str = "cpu", progress: bool = True,
                     limit: int | None = None, force: bool = False) -> Featurizer:
    """Train (or resume, or load when finished) the featurizer of a labelled dataset."""
    out = featurizer_dir(dataset, cache)
    if not force and is_saved(out):
        return Featurizer.load(out, "featurizer", device)
    kw = _dataset_kwargs(size, channels, data_dir)
    train = load_dataset(dataset, split="train", limit=limit, **kw)
    test = load_dataset(dataset, split="test", **kw)
    if train.labels is None:
        raise MolrmogError(f"{dataset} has no labels; a featurizer is a classifier and needs class sub-folders")
    steps = int(steps or get_dataset(dataset).featurizer_steps)
    if steps < 1 or batch < 1:
        raise MolrmogError(f"steps and batch must be >= 1, got {steps} and {batch}", param="steps")
    x, y = train.images, train.labels

    def loss_fn(m, gen):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen, device=gen.device).cpu()
        xb = x[idx]
        # small random shifts (+-1 pixel on 8x8, +-2 on 28x28): cheap augmentation, no flips
        pad = 1 if xb.shape[-1] < 16 else 2
        dx, dy = torch.randint(-pad, pad + 1, (2,), generator=gen, device=gen.device).tolist()
        xb = torch.roll(F.pad(xb, (pad,) * 4), (dy, dx), (2, 3))[..., pad:-pad, pad:-pad]
        return F.cross_entropy(m(xb.to(device)), y[idx].to(device))

    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # initial weights and dropout from `seed`, the caller's RNG untouched
        torch.manual_seed(seed)
        model = Featurizer(train.shape, len(train.classes) or int(train.labels.max()) + 1, seed=seed).to(device)
        model.train()
        fit(model, loss_fn, steps=steps, lr=lr, optimizer="adamw", weight_decay=1e-4, seed=seed,
            lr_schedule="cosine", progress=progress, desc=f"featurizer {dataset}",
            checkpoint_dir=out / "checkpoint", checkpoint_every=200)
    acc = accuracy(model, test)
    model.test_accuracy.fill_(acc)
    model.save(out)
    info = {"dataset": dataset, "test_accuracy": acc, "test_images": int(test.images.shape[0]),
            "train_images": int(x.shape[0]), "steps": steps, "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "featurizer.json", info)
    log.info("featurizer for %s: test accuracy %.4f after %d steps in %.1f s", dataset, acc, steps, info["seconds"])
    return model.eval()


def check_featurizer(dataset: str, cache: str | os.PathLike | None = None, labelled: bool = True) -> None:
    """Refuse, before any work, an evaluation whose featurizer can neither be loaded nor trained."""
    out = featurizer_dir(dataset, cache)
    if not labelled and not is_saved(out):
        raise MolrmogError(f"{dataset} has no labels, so no featurizer (a classifier) can be trained for its FID, "
                           f"and none is saved in {out}: arrange the images in class sub-folders")


def get_featurizer(dataset: str, cache: str | os.PathLike | None = None, device: str = "cpu",
                   train_if_missing: bool = True, progress: bool = True, **kwargs) -> Featurizer:
    """The cached featurizer of a dataset; trained first (with a message) when there is none."""
    out = featurizer_dir(dataset, cache)
    if is_saved(out):
        return Featurizer.load(out, "featurizer", device).eval()
    if not train_if_missing:
        raise MolrmogError(f"no featurizer for {dataset} in {out}; train it once with "
                           f"`molrmog featurizer --dataset {dataset}`")
    log.info("no featurizer for %s in %s; training it now (once)", dataset, out)
    return train_featurizer(dataset, cache=cache, device=device, progress=progress, **kwargs)
