"""A keyed multiplicative field as the watermark (issue 18, point 3): the cheapest mark measured.

The decoder key (`signature`) is read through every attack but costs Fashion-MNIST's FID about what white noise of
its MSE costs (+6 at 36 dB), because it writes fine detail on the black background. Which changes this project's
featurizer does not charge was measured (README: what the FID change measures): a smooth multiplicative change of
the garment is nearly free. So the mark here is exactly that, fixed by the key:

    x -> clip(x (1 + eps f)),  f = the key's field: white noise blurred at `sigma` pixels, unit RMS,

one field for every channel (a change of brightness, not of colour), eps_i set per image so that every marked image
is `psnr` dB from its clean image (`strengths`; one eps per run, the eleventh session's, left the faint images --
sandals, thin trousers -- with a mark too weak to find: README). It is applied to the decoded image, as diffusers'
Stable Diffusion XL pipelines apply their invisible watermark after decoding; it is not in the latent or in the
decoder's weights. Detection is zero-bit, with the field known: a detector (`FieldDetector`) maps an image to a
per-pixel map, a learnt filter, and its statistic is the map's correlation with the field, a matched filter whose
filtering is learnt. It is trained once per run and key, on the VAE reconstructions of the run's training images
(what the experts' images look like), clean against marked, each step under one attack drawn by
`signature.train_attack` (the attacks evaluated, at random strengths, the VAE re-encoding through the image's
cluster VAE); the statistic is thresholded at the clean images' 99th percentile as for the other keys.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from molrmog.applications.attacks import frozen, key_seed, psnr_mse
from molrmog.applications.signature import train_attack
from molrmog.core.artefacts import Model, register_to_config
from molrmog.core.errors import MolrmogError
from molrmog.training.train import CHECKPOINT, fit

__all__ = ["key_field", "apply_field", "strengths", "mark_images", "FieldDetector", "train_detector", "detector_dir",
           "prepare_field", "field_scores", "reconstructions", "SIGMA", "PSNR", "STEPS", "WIDTH", "CAP"]

SIGMA = 1.0  # pixels: the field's blur (README: 0.6 costs +1.45 FID on Fashion-MNIST, 1.5 and 3 detect worse)
PSNR = 35.0  # dB, every marked image against its clean image (the goal: >= 35; README: 36 detects worse)
STEPS = 8000  # Adam steps of the detector's training, batches of 64 clean + 64 marked (4,000: digits worse; README)
WIDTH = 32  # the detector's channels
CHECKPOINT_EVERY = 250  # detector steps between checkpoints (a stopped training resumes from the last one)
CAP = 1.0  # the largest eps_i: images too faint to reach the PSNR with it (nearly black) carry a weaker mark


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


def apply_field(x: Tensor, f: Tensor, eps: float | Tensor) -> Tensor:
    """The marked images clip(x (1 + eps f)) of images x (N, C, H, W) in [0, 1]; eps one number or one per image
    (N,)."""
    e = torch.as_tensor(eps, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return (x * (1 + e * f.to(x.dtype))).clamp(0, 1)


def strengths(images: Tensor, f: Tensor, psnr: float = PSNR, cap: float = CAP, iters: int = 40) -> Tensor:
    """eps_i (N,) per image such that clip(x_i (1 + eps_i f)) lies `psnr` dB from x_i (bisection on [0, cap], the
    PSNR falling as eps grows, to the side of at least `psnr` dB). Images that do not reach it at eps = cap
    (nearly black; black ones carry no mark at all) get cap, and lie further than `psnr` dB."""
    target = psnr_mse(psnr)
    lo, hi = torch.zeros(len(images)), torch.full((len(images),), float(cap))
    for _ in range(iters):
        mid = (lo + hi) / 2
        low = (apply_field(images, f, mid) - images).pow(2).flatten(1).mean(1) < target
        lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
    reach = (apply_field(images, f, hi) - images).pow(2).flatten(1).mean(1) >= target
    return torch.where(reach, lo, torch.full_like(hi, float(cap)))  # lo: never below `psnr` dB


def mark_images(images: Tensor, f: Tensor, psnr: float = PSNR) -> Tensor:
    """The images marked by the field at `psnr` dB each (`strengths`, `apply_field`)."""
    return apply_field(images, f, strengths(images, f, psnr))


class FieldDetector(Model):
    """The field's detector: a fully convolutional network maps an image x (B, C, H, W) in [0, 1] to a map m(x)
    (B, 1, H, W) -- no pooling, no stride: a pixel of the map stays where it is -- and the statistic is
    a <m(x), f> / sqrt(HW) + b, the map's correlation with the key's field f (a buffer), a matched filter whose
    filtering is learnt. The eleventh session's detector (`signature.Extractor`, pooled to 4 x 4, not given f)
    had to find the mark's texture without knowing where it lies: 0.963 clean against 0.974 for this one after
    1,000 steps on Fashion-MNIST, at a tenth of the parameters (README). `steps` and `psnr` record its
    training."""

    @register_to_config
    def __init__(self, image_shape=(1, 8, 8), width: int = WIDTH, seed: int = 0, steps: int = STEPS,
                 psnr: float = PSNR, sigma: float = SIGMA):
        super().__init__()
        if not 1 <= int(width) <= 512:
            raise MolrmogError(f"the field detector needs a width in 1..512, got {width}")
        C, H, W = (int(v) for v in image_shape)
        w = int(width)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Conv2d(C, w, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(w, w, 3, padding=2, dilation=2), nn.SiLU(),
                                     nn.Conv2d(w, 1, 3, padding=1))
        self.a, self.b = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor(0.0))
        self.register_buffer("field", torch.zeros(1, 1, H, W))

    def forward(self, x: Tensor) -> Tensor:
        """The statistic per image (B,): larger for marked images (a logit: > 0 called marked in training)."""
        m = self.net(2 * x - 1)
        return self.a * (m * self.field).flatten(1).sum(1) / math.sqrt(self.field.numel()) + self.b


def train_detector(images_of, vaes, weights: Tensor, f: Tensor, *, image_shape, psnr: float = PSNR,
                   steps: int = STEPS, width: int = WIDTH, sigma: float = SIGMA, batch: int = 64, lr: float = 1e-3,
                   seed: int = 0, progress: bool = False, attacks=None, checkpoint_dir=None,
                   checkpoint_every: int = CHECKPOINT_EVERY):
    """The detector D of field f: each step draws a cluster k by `weights`, `batch` images of it (`images_of(k)`),
    marks a copy (`mark_images` at `psnr`), puts every image through one attack of `train_attack` (through
    `vaes[k]`) and takes an Adam step on the binary cross-entropy of D's statistic (marked 1, clean 0); cosine
    rate. The loop is the project's one training loop (`training.train.fit`): with `checkpoint_dir` a checkpoint
    is written there every `checkpoint_every` steps and a stopped training resumes from it bit for bit. Returns
    (D, facts): the loss over the last tenth of the steps, and D's accuracy on 8 fresh batches drawn the same
    way (new draws and attacks) after training."""
    if steps < 1 or batch < 1:
        raise MolrmogError(f"the detector needs steps >= 1 and batch >= 1, got {steps} and {batch}")
    D = FieldDetector(tuple(image_shape), width, seed=seed, steps=steps, psnr=psnr, sigma=sigma)
    D.field.copy_(f.reshape(D.field.shape))
    y = torch.cat([torch.zeros(batch), torch.ones(batch)])

    def attacked_batch(g: torch.Generator) -> Tensor:
        k = int(torch.multinomial(weights, 1, generator=g))
        pool = images_of(k)
        x = pool[torch.randint(len(pool), (batch,), generator=g)]
        with torch.no_grad():
            return train_attack(torch.cat([x, mark_images(x, f, psnr)]), vaes[k], g, attacks)

    with frozen(*vaes), torch.enable_grad():
        out = fit(D, lambda model, g: F.binary_cross_entropy_with_logits(model(attacked_batch(g)), y), steps=steps,
                  lr=lr, seed=seed, lr_schedule="cosine", progress=progress, desc="field detector",
                  checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
    D.eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        acc = [float(((D(attacked_batch(g)) > 0).float() == y).float().mean()) for _ in range(8)]
    n = max(1, len(out["loss"]) // 10)
    return D, {"accuracy_after": sum(acc) / len(acc), "loss_last_tenth": sum(out["loss"][-n:]) / n}


def detector_dir(out, key, sigma: float, psnr: float, steps: int, width: int, seed: int) -> Path:
    """Where `prepare_field` keeps a detector: OUT/fieldmap-<8 hex digits of the key's hash>-sigma<sigma>-<psnr>dB-
    <steps>s-w<width>-seed<seed> (a detector belongs to one key; the folder name does not reveal it; the eleventh
    session's pooled detectors, in field-... folders, are not read)."""
    tag = f"{key_seed(f'field-folder:{key}'):015x}"[:8]
    return Path(out) / f"fieldmap-{tag}-sigma{sigma:g}-{psnr:g}dB-{steps}s-w{width}-seed{seed}"


@torch.no_grad()
def reconstructions(run, k: int, n: int = 4096) -> Tensor:
    """The first n training images of cluster k through its VAE (encoder mean, decoder): what the detector learns on."""
    vae = run.vae(k)
    x = run.cluster_images(k)[:n]
    return torch.cat([torch.sigmoid(vae.decode(vae.encode(b)[0])) for b in x.split(512)])


def _read_detector(d: Path, f: Tensor, psnr: float) -> tuple[FieldDetector, dict]:
    """A kept detector and its field.json, checked: the field it holds is the key's, its PSNR the one asked."""
    from molrmog.core.artefacts import read_json

    D, facts = FieldDetector.load(d, "watermark field detector").eval(), read_json(d / "field.json", "field facts")
    target = facts.get("psnr_target") if isinstance(facts, dict) else None
    if isinstance(target, bool) or not isinstance(target, int | float) or target != psnr:
        raise MolrmogError(f"{d / 'field.json'}: no PSNR target {psnr:g} (got {target!r}); remove the folder {d} and "
                           "the detector is trained again")
    if not torch.allclose(D.field, f.reshape(D.field.shape)):
        raise MolrmogError(f"{d}: the detector holds another field than this key's; remove the folder and the "
                           "detector is trained again")
    return D, facts


def prepare_field(run, key, out, *, sigma: float = SIGMA, psnr: float = PSNR, steps: int = STEPS,
                  width: int = WIDTH, seed: int = 0, progress: bool = False) -> dict:
    """The key's field and its detector (`train_detector`, trained once and kept in `detector_dir(out, ...)` with
    field.json; read back when there). While it trains, its checkpoint is kept in that folder: a training stopped
    (Ctrl-C, SIGKILL) resumes where it stopped when asked again. Returns {"extractor": D, "mark": images -> marked
    images (`mark_images`), "score": images -> statistic, "facts"}."""
    from molrmog.core.artefacts import write_json
    from molrmog.pipeline.run import Run

    r = Run.coerce(run)
    f = key_field(key, r.image_shape, sigma)
    d = detector_dir(out, key, sigma, psnr, steps, width, seed)
    if (d / "config.json").is_file() and (d / "field.json").is_file():
        D, facts = _read_detector(d, f, psnr)
    else:
        pools = {k: reconstructions(r, k) for k in range(r.K)}
        eps = strengths(torch.cat([p[:1024] for p in pools.values()]), f, psnr)
        D, facts = train_detector(pools.__getitem__, r.vaes(), r.weights, f, image_shape=r.image_shape, psnr=psnr,
                                  steps=steps, width=width, sigma=sigma, seed=seed, progress=progress,
                                  checkpoint_dir=d)
        facts = {"sigma": sigma, "psnr_target": psnr, "steps": steps, "width": width,
                 "epsilon_median": float(eps.median()), "epsilon_at_cap": float((eps >= CAP).float().mean()), **facts}
        D.save(d)
        write_json(d / "field.json", facts)
        (d / CHECKPOINT).unlink(missing_ok=True)  # the finished detector replaces its training's checkpoint
    return {"extractor": D, "mark": lambda x: mark_images(x, f, psnr), "score": lambda x: field_scores(D, x),
            "facts": {"detector": d.name, **facts}}


@torch.no_grad()
def field_scores(detector: FieldDetector, images: Tensor, batch: int = 512) -> Tensor:
    """The detection statistic per image (N,): the detector's correlation statistic (larger: marked)."""
    return torch.cat([detector(b) for b in images.split(batch)])
