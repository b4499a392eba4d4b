"""Attacks on images that a watermark's detector must survive, and what both watermark methods share (issues 15.3
and 18): `ATTACKS` (noise, blur, JPEG, brightness, the VAE round trip), `roc` (AUC and TPR at 1% FPR) and `frozen`
(a model's parameters held while its inputs are fitted), `key_seed` (a secret key as a random seed). Used by
`watermark` (latent keys) and `signature` (a decoder that carries the key)."""

from __future__ import annotations

import contextlib
import hashlib
import io

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from molrmog.core.errors import MolrmogError

__all__ = ["ATTACKS", "attack", "blur", "jpeg", "noisy_mean", "roc", "frozen", "key_seed", "psnr_mse"]


def key_seed(key) -> int:
    """A random seed drawn from a secret key (any integer or string): the first 60 bits of its SHA-256."""
    return int(hashlib.sha256(str(key).encode()).hexdigest()[:15], 16)


def psnr_mse(psnr: float) -> float:
    """The per-pixel MSE 10^(-psnr / 10) of a watermark's PSNR target (images in [0, 1]), the target checked to
    lie in [10, 80] dB."""
    if not 10 <= psnr <= 80:
        raise MolrmogError(f"the watermark's PSNR target must lie in [10, 80] dB, got {psnr}", param="psnr")
    return 10 ** (-psnr / 10)


@contextlib.contextmanager
def frozen(*modules):
    """The modules' trainable parameters frozen inside the block (a fit of their inputs), trainable again after."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# --- attacks on images (N, C, H, W) in [0, 1] -----------------------------------------------------------------


def jpeg(x: Tensor, quality: int = 75) -> Tensor:
    from PIL import Image

    out = []
    for img in x:
        arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        im = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(back[None] if back.ndim == 2 else back.transpose(2, 0, 1)))
    return torch.stack(out)


def blur(x: Tensor, sigma: float = 0.6) -> Tensor:
    r = 2
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma**2))
    k = (k / k.sum())
    k2 = (k[:, None] * k[None, :])[None, None].expand(x.shape[1], 1, -1, -1)
    return F.conv2d(F.pad(x, (r,) * 4, mode="reflect"), k2, groups=x.shape[1])


def noisy_mean(x: Tensor, sigma: Tensor | float) -> Tensor:
    """E[clip(x + sigma eps, 0, 1)], eps ~ N(0, 1) per pixel: what the noise attack leaves on average, in closed
    form: E[max(X, 0)] - E[max(X - 1, 0)] for X ~ N(x, sigma^2), E[max(X, 0)] = x Phi(x / sigma) + sigma phi(x /
    sigma). `sigma` > 0, a number or one per image (N,). Clipping at 0 lifts a dark background (by 0.4 sigma where
    x = 0), which an encoder reads as content."""
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    a, b = x / s, (x - 1) / s

    def pdf(t: Tensor) -> Tensor:
        return torch.exp(-t * t / 2) / (2 * torch.pi) ** 0.5

    return x * torch.special.ndtr(a) + s * pdf(a) - (x - 1) * torch.special.ndtr(b) - s * pdf(b)


ATTACKS = {
    "none": lambda x, vae, g: x,
    "gaussian_noise": lambda x, vae, g: (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1),
    "blur": lambda x, vae, g: blur(x),
    "jpeg": lambda x, vae, g: jpeg(x, 75),
    "brightness": lambda x, vae, g: (x * 1.15).clamp(0, 1),
    "vae_reencode": lambda x, vae, g: torch.sigmoid(vae.decode(vae.encode(x)[0])),
}


def attack(name: str, x: Tensor, vae, seed: int = 0) -> Tensor:
    if name not in ATTACKS:
        raise MolrmogError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    with torch.no_grad():
        return ATTACKS[name](x, vae, torch.Generator().manual_seed(seed))


def roc(clean: Tensor, marked: Tensor) -> dict:
    """AUC and the true-positive rate at a 1% false-positive rate (threshold: the clean scores' 99th percentile)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(clean)), np.ones(len(marked))]
    s = np.r_[clean.numpy(), marked.numpy()]
    thr = float(np.quantile(clean.numpy(), 0.99))
    return {"auc": float(roc_auc_score(y, s)), "tpr_at_1pct_fpr": float((marked.numpy() > thr).mean()),
            "threshold": thr}
