"""A keyed multiplicative field as the watermark (issue 18, point 3): the cheapest mark measured.

The decoder key (`signature`) is read through every attack but costs Fashion-MNIST's FID about what white noise of
its MSE costs (+6 at 36 dB), because it writes fine detail on the black background. Which changes this project's
featurizer does not charge was measured (README: what the FID change measures): a smooth multiplicative change of
the garment is nearly free. So the mark here is exactly that, fixed by the key:

    x -> clip(x (1 + eps f)),  f = the key's field: white noise blurred at `sigma` pixels, unit RMS,

one field for every channel (a change of brightness, not of colour), eps set once per run so that the marked
reconstructions of the run's training images have the mean per-image PSNR `psnr` (`strength_for`). It is applied
to the decoded image, as diffusers' Stable Diffusion XL pipelines apply their invisible watermark after decoding;
it is not in the latent or in the decoder's weights. Detection is zero-bit: a detector W (`signature.Extractor`
with one logit) is trained once per run and key, on the VAE reconstructions of the run's training images (what
the experts' images look like), clean against marked, each step under one attack drawn by
`signature.train_attack` (the attacks evaluated, at random strengths, the VAE re-encoding through the image's
cluster VAE); its logit is the statistic, thresholded at the clean images' 99th percentile as for the other keys.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from molrmog.applications.attacks import frozen, key_seed
from molrmog.applications.signature import Extractor, train_attack
from molrmog.core.errors import MolrmogError

__all__ = ["key_field", "apply_field", "strength_for", "train_detector", "detector_dir", "prepare_field",
           "field_scores", "reconstructions", "SIGMA", "PSNR", "STEPS", "WIDTH"]

SIGMA = 1.0  # pixels: the field's blur (README: 0.6 costs +1.45 FID on Fashion-MNIST, 1.5 and 3 detect worse)
PSNR = 35.0  # dB, mean per-image PSNR of the marked reconstructions (the goal: >= 35; README: 36 detects worse)
STEPS = 6000  # Adam steps of the detector's training, batches of 64 clean + 64 marked images (3,000: worse, README)
WIDTH = 48  # the detector's channels (32: AUC 0.93 clean on Fashion-MNIST; README)


def key_field(key, image_shape, sigma: float = SIGMA) -> Tensor:
    """The key's field (1, 1, H, W): white noise drawn from the key, blurred with a Gaussian of std `sigma` pixels
    (0: white), normalised to unit RMS. The noise is drawn on a margin of 3 sigma around the image, so the field
    has no edge effects."""
    if not 0 <= sigma <= 16:
        raise MolrmogError(f"the field's blur sigma must lie in [0, 16] pixels, got {sigma}", param="field_sigma")
    H, W = int(image_shape[-2]), int(image_shape[-1])
    r = int(math.ceil(3 * sigma))
    g = torch.Generator().manual_seed(key_seed(f"field:{key}"))
    f = torch.randn(1, 1, H + 2 * r, W + 2 * r, generator=g)
    if sigma > 0:
        k = torch.exp(-torch.arange(-r, r + 1, dtype=f.dtype) ** 2 / (2 * sigma**2))
        k = k / k.sum()
        f = F.conv2d(f, (k[:, None] * k[None, :])[None, None])
    return f / f.pow(2).mean().sqrt()


def apply_field(x: Tensor, f: Tensor, eps: float) -> Tensor:
    """The marked images clip(x (1 + eps f)) of images x (N, C, H, W) in [0, 1]."""
    return (x * (1 + eps * f.to(x.dtype))).clamp(0, 1)


def _mean_psnr(x: Tensor, y: Tensor) -> float:
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((-10 * torch.log10(mse)).mean())


def strength_for(images: Tensor, f: Tensor, psnr: float = PSNR, iters: int = 50) -> float:
    """eps such that the marked images' mean per-image PSNR (the one `watermark evaluate` reports) is `psnr`
    (bisection; the PSNR falls as eps grows). Images that are black everywhere carry no mark (their PSNR is capped
    at 120 dB, as an MSE of 1e-12)."""
    if not 10 <= psnr <= 80:
        raise MolrmogError(f"the watermark's PSNR target must lie in [10, 80] dB, got {psnr}", param="psnr")
    if float(images.abs().max()) == 0:
        raise MolrmogError("the field cannot mark black images: every pixel is 0")
    lo, hi = 0.0, 1.0
    while _mean_psnr(apply_field(images, f, hi), images) > psnr and hi < 1e3:
        lo, hi = hi, 2 * hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _mean_psnr(apply_field(images, f, mid), images) > psnr else (lo, mid)
    return (lo + hi) / 2


def train_detector(images_of, vaes, weights: Tensor, f: Tensor, eps: float, *, image_shape, steps: int = STEPS,
                   width: int = WIDTH, batch: int = 64, lr: float = 1e-3, seed: int = 0, progress: bool = False,
                   attacks=None, psnr: float = PSNR):
    """The zero-bit detector W: each step draws a cluster k by `weights`, `batch` images of it (`images_of(k)`), marks
    a copy (`apply_field`), puts every image through one attack of `train_attack` (through `vaes[k]`) and takes an
    Adam step on the binary cross-entropy of W's logit (marked 1, clean 0); cosine rate. `psnr` (the one eps was
    set for) is only recorded in W's config. Returns (W, facts)."""
    from tqdm.auto import tqdm

    if steps < 1 or batch < 1:
        raise MolrmogError(f"the detector needs steps >= 1 and batch >= 1, got {steps} and {batch}")
    W = Extractor(tuple(image_shape), 1, width=width, seed=seed, steps=steps, psnr=psnr)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(W.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    y = torch.cat([torch.zeros(batch), torch.ones(batch)])
    acc, loss_log = [], []
    with frozen(*vaes), torch.enable_grad():
        for _ in tqdm(range(steps), desc="field detector", disable=not progress, leave=False):
            k = int(torch.multinomial(weights, 1, generator=g))
            pool = images_of(k)
            x = pool[torch.randint(len(pool), (batch,), generator=g)]
            with torch.no_grad():
                xa = train_attack(torch.cat([x, apply_field(x, f, eps)]), vaes[k], g, attacks)
            logit = W(xa)[:, 0]
            loss = F.binary_cross_entropy_with_logits(logit, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            acc.append(float(((logit > 0).float() == y).float().mean()))
            loss_log.append(float(loss.detach()))
    n = max(1, steps // 10)
    return W.eval(), {"accuracy_last_tenth": sum(acc[-n:]) / n, "loss_last_tenth": sum(loss_log[-n:]) / n}


def detector_dir(out, key, sigma: float, psnr: float, steps: int, width: int, seed: int) -> Path:
    """Where `prepare_field` keeps a detector: OUT/field-<8 hex digits of the key's hash>-sigma<sigma>-<psnr>dB-
    <steps>s-w<width>-seed<seed> (a detector belongs to one key; the folder name does not reveal it)."""
    tag = f"{key_seed(f'field-folder:{key}'):015x}"[:8]
    return Path(out) / f"field-{tag}-sigma{sigma:g}-{psnr:g}dB-{steps}s-w{width}-seed{seed}"


@torch.no_grad()
def reconstructions(run, k: int, n: int = 4096) -> Tensor:
    """The first n training images of cluster k through its VAE (encoder mean, decoder): what the detector learns on."""
    vae = run.vae(k)
    x = run.cluster_images(k)[:n]
    return torch.cat([torch.sigmoid(vae.decode(vae.encode(b)[0])) for b in x.split(512)])


def prepare_field(run, key, out, *, sigma: float = SIGMA, psnr: float = PSNR, steps: int = STEPS,
                  width: int = WIDTH, seed: int = 0, progress: bool = False) -> dict:
    """The key's field, its strength on the run (`strength_for` on up to 1,024 reconstructions per cluster) and the
    detector (`train_detector`, trained once and kept in `detector_dir(out, ...)` with field.json; read back when
    there). Returns {"extractor": W, "mark": images -> marked images, "score": images -> statistic, "facts"}."""
    from molrmog.core.artefacts import read_json, write_json
    from molrmog.pipeline.run import Run

    r = Run.coerce(run)
    f = key_field(key, r.image_shape, sigma)
    d = detector_dir(out, key, sigma, psnr, steps, width, seed)
    if (d / "config.json").is_file() and (d / "field.json").is_file():
        W, facts = Extractor.load(d, "watermark field detector").eval(), read_json(d / "field.json", "field facts")
        eps = facts.get("epsilon") if isinstance(facts, dict) else None
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1e3:
            raise MolrmogError(f"{d / 'field.json'}: no usable epsilon (got {eps!r}); remove the folder {d} and the "
                               "detector is trained again")
    else:
        pools = {k: reconstructions(r, k) for k in range(r.K)}
        eps = strength_for(torch.cat([p[:1024] for p in pools.values()]), f, psnr)
        W, facts = train_detector(pools.__getitem__, r.vaes(), r.weights, f, eps, image_shape=r.image_shape,
                                  steps=steps, width=width, seed=seed, progress=progress, psnr=psnr)
        facts = {"sigma": sigma, "epsilon": eps, "psnr_target": psnr, "steps": steps, "width": width, **facts}
        W.save(d)
        write_json(d / "field.json", facts)
    eps = float(facts["epsilon"])
    return {"extractor": W, "mark": lambda x: apply_field(x, f, eps), "score": lambda x: field_scores(W, x),
            "facts": {"detector": d.name, **facts}}


@torch.no_grad()
def field_scores(detector: Extractor, images: Tensor, batch: int = 512) -> Tensor:
    """The detection statistic per image (N,): the detector's logit (larger: marked)."""
    return torch.cat([detector(b)[:, 0] for b in images.split(batch)])
