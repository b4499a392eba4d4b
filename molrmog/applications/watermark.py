"""Invisible watermarks embedded while sampling, detected from images (Shallow Diffuse; issues 15.3 and 18).

Following Shallow Diffuse (Li, Zhang, Qu, NeurIPS 2025; official code liwd190019/Shallow-Diffuse,
run_shallow_diffuse_t2i.py): during generation, at a small time t_w, a key is written into the noised latent
and sampling finishes; detection inverts an image back to t_w with the probability-flow ODE and tests for
the key. Two latent keys (`METHODS`; the third method, "decoder", is Stable Signature's: the key lives in a
fine-tuned decoder, `molrmog.applications.signature`; the fourth, "field", multiplies the decoded image by a smooth
field drawn from the key, `molrmog.applications.fieldmark`; the fifth, "subspace", moves the decoded image off the
expert's mode subspaces along the key's directions and reads it by fitting the decoder's manifold,
`molrmog.applications.subspacemark`; `evaluate_watermark` / `embed_run` / `detect_run` serve them too):
- "null": a keyed pattern projected onto the (approximate) null space of the denoiser's Jacobian J_t(u_t),
  the directions the posterior mean does not depend on (closed form for MoG / Gaussian experts,
  `mixture.denoiser_jacobian`; autograd otherwise); statistic: the cosine of the null-space parts. A
  mixture's Tweedie step at the end would project the pattern away, so marked (and clean reference)
  images end at t_min without it.
- "ring": Tree-Ring's ring key as Shallow Diffuse's code uses it: the centred 2-D spectrum of latent
  channel 0 replaced on a disk by values constant on each ring (`ring_key`); statistic: minus the mean L1
  distance to the key over the disk.
Detection from images: encoder posterior mean, refined by decoder inversion (`invert_decoder`: the MAP latent
under the expert's law, pixel noise `invert_sigma`; `invert_steps`), standardise, ODE t_min -> t_w, statistic.

What it measures (README): from latents both keys are found (AUC 0.98 / 1.0); from clean images, with MAP
inversion, the ring key at AUC 0.999 on digits and 0.92-0.98 on Fashion-MNIST (least squares: 0.96 and
0.61-0.66); no attack (noise, blur, JPEG, brightness, VAE re-encoding) leaves it detectable: they change the pixels
as much as the key does, and the part of the key that no unmarked latent imitates is only 0.0013-0.0022 RMS
per pixel (`key_bound`; README: a bound on any detector under attack). `vae_roundtrip_over_pattern` in
watermark.json: how far the VAE round trip moves a marked latent against how far the key moved it.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from molrmog.applications.attacks import ATTACKS, attack, frozen, key_seed, roc
from molrmog.applications.editing import edit_time, latent_jacobian, ode
from molrmog.core.errors import MolrmogError

__all__ = ["key_pattern", "null_projector", "ring_key", "embed", "detection_scores", "latent_scores", "ATTACKS",
           "attack", "roc", "METHODS", "AUTO", "choose_method", "invert_decoder", "INVERT_STEPS", "INVERT_SIGMA",
           "read_latents", "key_fit", "key_bound", "white_noise_like"]

# "null": a keyed direction in the null space of the denoiser's Jacobian (cosine statistic);
# "ring": Tree-Ring / Shallow Diffuse's key, constant on rings of a Fourier disk of one latent channel (L1 statistic);
# "decoder": Stable Signature's, a decoder fine-tuned to write the key's bits into every image (`signature`);
# "field": the decoded image times (1 + eps f), f a smooth field drawn from the key, a trained detector (`fieldmark`);
# "subspace": a step off the expert's mode subspaces along the key's directions, read by fitting the decoder's
# manifold (`subspacemark`)
METHODS = ("null", "ring", "decoder", "field", "subspace")
AUTO = "auto"  # the commands' default: `choose_method`
MARKED_IMAGES = ("field", "subspace")  # methods that mark the decoded image (`embed`'s `mark`)


def key_pattern(key: int | str, d: int) -> Tensor:
    """A unit vector in R^d drawn from the key (any integer or string)."""
    v = torch.randn(d, generator=torch.Generator().manual_seed(key_seed(key)), dtype=torch.float64)
    return v / v.norm()


def ring_key(key, latent, channel: int = 0, radius: int | None = None) -> tuple[Tensor, Tensor]:
    """The ring key of Tree-Ring / Shallow Diffuse (their code's "ring" pattern) for latents of shape (c, h, w):
    a mask (h, w), the disk of `radius` (default max(1, min(h, w) // 4)) around the centre of the shifted 2-D
    spectrum of one channel, and complex values (h, w) constant on each ring: the disk of radius i holds the
    value at (0, i) of the shifted spectrum of a key-seeded Gaussian field, written from the outer ring inwards.
    Their code keeps the complex value and takes the real part of the inverse transform, which embeds only the
    value's real part; here the key is that real part, so a latent that carries it is at distance 0."""
    c, h, w = (int(v) for v in latent)
    if not 0 <= channel < c:
        raise MolrmogError(f"the ring key's channel must lie in 0..{c - 1}, got {channel}")
    radius = int(radius or max(1, min(h, w) // 4))
    g = torch.Generator().manual_seed(key_seed(key))
    field = torch.fft.fftshift(torch.fft.fft2(torch.randn(h, w, generator=g, dtype=torch.float64)))
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    dist2 = (yy**2 + xx**2).double()
    values = torch.zeros(h, w, dtype=torch.complex128)
    for i in range(radius, 0, -1):  # real values: a ring is symmetric, so only a real key survives ifft(...).real
        values[dist2 <= i * i] = field[0, min(i, w - 1)].real
    return dist2 <= radius * radius, values


def _spectrum(u: Tensor, latent, channel: int) -> Tensor:
    c, h, w = latent
    return torch.fft.fftshift(torch.fft.fft2(u.double().view(-1, c, h, w)[:, channel]), dim=(-2, -1))


def _inject_ring(u: Tensor, latent, channel: int, mask: Tensor, values: Tensor, mix: float = 1.0) -> Tensor:
    """u (B, d) with the channel's spectrum moved the fraction `mix` of the way to the key inside the mask (1:
    replaced by it, as Tree-Ring; the rest of u unchanged). The key is real and symmetric on the centred disk,
    so the mixed spectrum stays Hermitian and the distance to the key shrinks by exactly 1 - mix."""
    c, h, w = latent
    F_ = _spectrum(u, latent, channel)
    F_[:, mask] = (1 - mix) * F_[:, mask] + mix * values[mask]
    x = u.double().reshape(-1, c, h, w).clone()
    x[:, channel] = torch.fft.ifft2(torch.fft.ifftshift(F_, dim=(-2, -1))).real
    return x.reshape(u.shape).to(u.dtype)


def ring_distance(u: Tensor, latent, key, channel: int = 0) -> Tensor:
    """Mean |spectrum - key| over the key's disk per row of u (B,): small for latents that carry the key."""
    mask, values = ring_key(key, latent, channel)
    return (_spectrum(u, latent, channel)[:, mask] - values[mask]).abs().mean(1)


def null_projector(expert, u: Tensor, t: float, rank_tol: float = 0.01) -> tuple[Tensor, Tensor]:
    """Projectors (B, d, d) onto the null space of J_t at each row of u, and the numerical ranks (B,)."""
    J = latent_jacobian(expert, u, t).detach().double()
    _, S, Vh = torch.linalg.svd(J)
    keep = S > rank_tol * S[:, :1]
    V = Vh.transpose(1, 2) * keep[:, None, :]
    eye = torch.eye(u.shape[1], dtype=torch.float64, device=u.device)
    return eye - V @ V.transpose(1, 2), keep.sum(1)


def embed(expert, vae, n: int, key, *, strength: float = 0.3, fraction: float = 0.3, seed: int = 0,
          steps: int = 40, latents: bool = False, method: str = "ring", ring_mix: float = 1.0, marked_vae=None,
          mark=None):
    """n watermarked images and the n clean images from the same noise (both in [0, 1], (n, C, H, W)), and facts
    about the embedding. `method` "null": a keyed pattern in the Jacobian's null space, its norm `strength` x the
    noise's at t_w (gamma_w sqrt(d)); "ring": the spectrum of latent channel 0 on its disk at t_w moved the
    fraction `ring_mix` of the way to the ring key (`ring_key`; 1: replaced by it; `strength` unused); "decoder":
    the same latents, decoded by `marked_vae` (`signature.mark_decoder`: the key is in its decoder); "field" and
    "subspace": the same latents, the decoded image marked by `mark` (`fieldmark.prepare_field`,
    `subspacemark.prepare_subspace`). With `latents`, also the two final standardised latents."""
    if n < 1 or strength <= 0:
        raise MolrmogError(f"watermarking needs n >= 1 images and a strength > 0, got n = {n}, strength = {strength}")
    if not 0 < ring_mix <= 1:
        raise MolrmogError(f"ring_mix must lie in (0, 1], got {ring_mix}", param="ring_mix")
    if method not in METHODS:
        raise MolrmogError(f"unknown watermark method {method!r}; choose from {', '.join(METHODS)}")
    if (method == "decoder") != (marked_vae is not None):
        raise MolrmogError("the decoder method, and only it, decodes with a marked VAE (signature.mark_decoder)")
    if (method in MARKED_IMAGES) != (mark is not None):
        raise MolrmogError("the field method and the subspace method, and only they, mark the decoded images "
                           "(fieldmark.prepare_field, subspacemark.prepare_subspace)")
    sched = expert.schedule
    t_w = edit_time(sched, fraction)
    d = expert.shift.numel()
    g = torch.Generator().manual_seed(seed)
    u_T = float(sched.gamma(torch.tensor(sched.t_max))) * torch.randn(n, d, generator=g)
    u_t = ode(expert, u_T, sched.t_max, t_w, sched, steps)
    gamma_w = float(sched.gamma(torch.tensor(t_w)))
    if method == "ring":
        marked_t = _inject_ring(u_t, expert.latent, 0, *ring_key(key, expert.latent), mix=ring_mix)
        rank = torch.zeros(1)
    elif method in ("decoder", *MARKED_IMAGES):
        marked_t, rank = u_t, torch.zeros(1)
    else:
        P, rank = null_projector(expert, u_t, t_w)
        k = key_pattern(key, d)
        delta = (P @ k).float()
        delta = delta / delta.norm(dim=1, keepdim=True).clamp_min(1e-12)
        marked_t = u_t + strength * gamma_w * math.sqrt(d) * delta
    u0_clean = ode(expert, u_t, t_w, sched.t_min, sched, steps)
    same = method in ("decoder", *MARKED_IMAGES)
    u0s = [u0_clean, u0_clean if same else ode(expert, marked_t, t_w, sched.t_min, sched, steps)]
    with torch.no_grad():
        outs = [torch.sigmoid(dec.decode(expert.unstandardise(u0)))
                for dec, u0 in zip((vae, marked_vae or vae), u0s, strict=True)]
        if mark is not None:
            outs[1] = mark(outs[1])
    info = {"t_w": t_w, "method": method, "mean_rank": float(rank.double().mean()),
            "pattern_norm": float((marked_t - u_t).norm(dim=1).mean())}
    return (outs[1], outs[0], info, u0s[1], u0s[0]) if latents else (outs[1], outs[0], info)


def check_key(key: object, source, kind: str, clusters: int) -> dict:
    """A key.json written by `embed`, checked: a JSON object with the key (text), the expert kind it was embedded
    with, the cluster, the time fraction t in (0, 1] and a finite threshold."""
    def bad(why: str) -> MolrmogError:
        return MolrmogError(f"{source}: {why}; use the key.json that watermark embed wrote")

    if not isinstance(key, dict):
        raise bad(f"expected a JSON object, got {type(key).__name__}")
    missing = [k for k in ("key", "kind", "cluster", "t", "threshold") if k not in key]
    if missing:
        raise bad(f"missing {missing}")
    c, t, thr = key["cluster"], key["t"], key["threshold"]
    if not isinstance(key["key"], str) or not isinstance(key["kind"], str):
        raise bad("key and kind must be text")
    if key["kind"] != kind:
        raise bad(f"it was embedded with the {key['kind']!r} expert, not {kind!r} (pass --kind {key['kind']})")
    if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < clusters:
        raise bad(f"cluster must be an integer in 0..{clusters - 1}, got {c!r}")
    for name, v in (("t", t), ("threshold", thr)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise bad(f"{name} must be a finite number, got {v!r}")
    if not 0 < t <= 1:
        raise bad(f"t must lie in (0, 1], got {t}")
    if key.setdefault("method", "null") not in METHODS:  # keys written before "ring" existed are "null" keys
        raise bad(f"method must be one of {', '.join(METHODS)}, got {key['method']!r}")
    steps = key.setdefault("invert_steps", 0)  # keys written before decoder inversion were calibrated without it
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= 100_000:
        raise bad(f"invert_steps must be an integer in [0, 100000], got {steps!r}")
    sigma = key.setdefault("invert_sigma", 0.0)  # keys written before MAP inversion: least squares, no prior
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not 0 <= sigma <= 1:
        raise bad(f"invert_sigma must be a number in [0, 1], got {sigma!r}")
    if key["method"] == "decoder" and not (isinstance(key.get("extractor"), str) and key["extractor"]):
        raise bad("a decoder key names its extractor's folder (\"extractor\", beside key.json)")
    if key["method"] == "field" and not (isinstance(key.get("detector"), str) and key["detector"]):
        raise bad("a field key names its detector's folder (\"detector\", beside key.json)")
    if key["method"] == "subspace":
        from molrmog.applications.subspacemark import check_calibration

        check_calibration(key, key["cluster"], bad)
    return key


def _bad_images(path, why: str) -> MolrmogError:
    return MolrmogError(f"images {path}: {why}", param="images")


def read_images(path, shape: tuple[int, int, int]) -> Tensor:
    """Images (N, C, H, W) from an .npy file: real floats in [0, 1], finite, of the run's image shape."""
    if not path or not Path(path).is_file():
        raise _bad_images(path, "no such file (an .npy array of images)")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise _bad_images(path, f"cannot read it as a .npy array ({e})") from None
    if not np.issubdtype(arr.dtype, np.floating):
        hint = "; uint8 images: divide by 255 first" if arr.dtype == np.uint8 else ""
        raise _bad_images(path, f"expected floating-point images in [0, 1], got dtype {arr.dtype}{hint}")
    if arr.ndim != 4 or tuple(arr.shape[1:]) != tuple(shape) or arr.shape[0] < 1:
        raise _bad_images(path, f"expected (N, {', '.join(map(str, shape))}) images, got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all() or arr.min() < -1e-3 or arr.max() > 1 + 1e-3:
        raise _bad_images(path, "values must be finite and lie in [0, 1]")
    return torch.from_numpy(arr.astype(np.float32)).clamp(0, 1)


INVERT_STEPS = 500  # Adam steps of decoder inversion in detection (README: watermarks that survive decoding)
INVERT_SIGMA = 3e-4  # pixel noise std of the MAP inversion's likelihood (README: MAP decoder inversion)


def invert_decoder(vae, images: Tensor, z0: Tensor, steps: int = INVERT_STEPS, lr: float = 0.05, *,
                   expert=None, sigma: float = 0.0) -> Tensor:
    """Latents (N, d) that the decoder maps to `images`, from the encoder's guess z0 (N, d); each image's latent
    is fitted on its own (the loss is a sum over images).

    sigma = 0 (the previous release): Adam on ||sigmoid(D(z)) - x||^2 in the VAE's latent z. A decoder that is
    blind to some latent directions (saturated background pixels: singular values of its Jacobian below 1e-3
    in about 20 of the 196 Fashion-MNIST dimensions of some clusters) leaves them wherever Adam's sign steps
    drift, and the probability-flow ODE of the detector amplifies that error.
    sigma > 0 with an `expert`: the MAP latent under the expert's own law, in its standardised coordinates u:
    Adam on ||sigmoid(D(z(u))) - x||^2 / (2 sigma^2) - log p(u), the gradient of log p being the expert's score
    at t_min (any kind). The pixels decide every direction the decoder sees; the law decides the blind ones."""
    if sigma < 0 or (sigma > 0 and expert is None):
        raise MolrmogError(f"MAP decoder inversion needs sigma > 0 and the expert whose law is the prior "
                           f"(sigma = 0: least squares without a prior), got sigma = {sigma}")
    images = images.detach()
    with frozen(vae), torch.enable_grad():
        if not sigma:
            return _fit(lambda z: torch.sigmoid(vae.decode(z)), z0, images, steps, lr, None, 1.0)
        t = torch.tensor(float(expert.schedule.t_min), dtype=torch.float64)
        u = _fit(lambda u: torch.sigmoid(vae.decode(expert.unstandardise(u))), expert.standardise(z0), images,
                 steps, lr, lambda u: expert(u, t), sigma)
        return expert.unstandardise(u)


def _fit(decode, v0: Tensor, images: Tensor, steps: int, lr: float, score, sigma: float) -> Tensor:
    """Adam from v0 on ||decode(v) - x||^2 / (2 sigma^2), minus log p(v) when `score` (grad log p) is given."""
    v = v0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    for _ in range(steps):
        loss = (decode(v) - images).pow(2).sum() / (2 * sigma**2)
        if score is not None:  # d/dv of -(s . v) is -s = -grad log p: the prior's gradient
            with torch.no_grad():
                s = score(v.detach())
            loss = loss - (s * v).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return v.detach()


def detection_scores(expert, vae, images: Tensor, key, *, fraction: float = 0.3, steps: int = 40,
                     batch: int = 256, method: str = "ring", invert_steps: int = INVERT_STEPS,
                     invert_sigma: float = INVERT_SIGMA) -> Tensor:
    """The detection statistic of each image (N,), larger for marked images: the encoder's posterior mean,
    refined by `invert_steps` of decoder inversion (`invert_decoder`, MAP under the expert's law with pixel noise
    `invert_sigma`, least squares when 0; 0 steps: the mean as it is), inverted with the
    probability-flow ODE to t_w, then ("null") the cosine between its null-space part and the null-space part
    of the key, or ("ring") minus the L1 distance of its channel-0 spectrum to the key on the disk."""
    u0 = read_latents(expert, vae, images, batch=batch, invert_steps=invert_steps, invert_sigma=invert_sigma)
    return latent_scores(expert, u0, key, fraction=fraction, steps=steps, batch=batch, method=method)


def read_latents(expert, vae, images: Tensor, *, batch: int = 256, invert_steps: int = INVERT_STEPS,
                 invert_sigma: float = INVERT_SIGMA) -> Tensor:
    """The detector's reading of images (N, C, H, W) as standardised latents at t_min (N, d): the encoder's
    posterior mean, refined by `invert_steps` of decoder inversion (`invert_decoder`)."""
    zs = []
    for b in images.split(batch):
        with torch.no_grad():
            z = vae.encode(b)[0].flatten(1)
        zs.append(invert_decoder(vae, b, z, invert_steps, expert=expert, sigma=invert_sigma) if invert_steps else z)
    return expert.standardise(torch.cat(zs))


def latent_scores(expert, u0: Tensor, key, *, fraction: float = 0.3, steps: int = 40, batch: int = 256,
                  method: str = "ring") -> Tensor:
    """The detection statistic computed from standardised latents at t_min directly (no decode / encode): what
    the detector could do if the VAE were a perfect inverse. Comparing it with `detection_scores` isolates the
    loss of the pattern in the VAE round trip."""
    sched = expert.schedule
    t_w = edit_time(sched, fraction)
    k = key_pattern(key, expert.shift.numel())
    out = []
    for b in u0.split(batch):
        u_t = ode(expert, b, sched.t_min, t_w, sched, steps)
        if method == "ring":
            out.append(-ring_distance(u_t, expert.latent, key))
            continue
        P, _ = null_projector(expert, u_t, t_w)
        a = torch.einsum("bij,bj->bi", P, u_t.double())
        kk = torch.einsum("bij,j->bi", P, k)
        out.append(F.cosine_similarity(a, kk, dim=1).detach())
    return torch.cat(out)


# --- how much of the ring key no unmarked latent imitates (README: a bound on any detector under attack) -------


def key_fit(expert, vae, images: Tensor, u_w: Tensor, key=None, *, fraction: float = 0.3, sigma: float = 0.01,
            steps: int = 300, ode_steps: int = 10, lr: float = 0.02) -> Tensor:
    """The RMS pixel error (N,) of the best fit of each image by the expert's own sampler from t_w: the latent at
    t_w (from u_w, (N, d)) fitted with Adam through the probability-flow ODE to t_min (`ode_steps`, differentiated)
    and the decoder, on ||sigmoid(D(u_0)) - x||^2 / (2 sigma^2) + ||u_w||^2 / 2 (a unit Gaussian prior at t_w).
    With a `key`, the disk of latent channel 0's spectrum is held at the ring key: the fit ranges only over the
    images the expert makes with the key, and its excess over the free fit is how far an image lies from them."""
    sched = expert.schedule
    t_w = edit_time(sched, fraction)
    if key is None:
        def hold(v):
            return v
    else:
        mask, values = ring_key(key, expert.latent)

        def hold(v):
            return _inject_ring(v, expert.latent, 0, mask, values)
    def error(v):  # per image: squared pixel error, prior at t_w
        w = hold(v)
        u0 = ode(expert, w, t_w, sched.t_min, sched, ode_steps, differentiable=True)
        x_hat = torch.sigmoid(vae.decode(expert.unstandardise(u0).to(images.dtype)))
        return (x_hat - images).pow(2).flatten(1).sum(1), w.pow(2).sum(1) / 2

    with frozen(vae, expert):
        v = hold(u_w.detach()).clone().requires_grad_(True)
        opt = torch.optim.Adam([v], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                sq, prior = error(v)
                opt.zero_grad()
                (sq / (2 * sigma**2) + prior).sum().backward()
                opt.step()
        with torch.no_grad():
            return (error(v)[0] / images[0].numel()).sqrt()


def key_bound(run, *, kind: str | None = None, cluster: int = 0, n: int = 16, key="12345", fraction: float = 0.3,
              seed: int = 0, sigma: float = 0.01, steps: int = 300, ode_steps: int = 10, attacks=None,
              out=None, device: str = "cpu") -> dict:
    """How far each image lies from the images the expert makes with the ring key, for n marked and n clean
    images of one cluster (as `evaluate_watermark` draws them) without and under each of `attacks` (default:
    every one of `ATTACKS`): `key_fit` with the key held beyond the free fit, as an RMS per pixel (`excess` =
    sqrt(held^2 - free^2)). A detector can only tell a marked image from a clean one by that distance, so where
    an attack leaves marked images as far from the keyed images as clean ones are, no statistic detects the key;
    the AUC of -excess itself (a generalised likelihood ratio) is reported too. Writes key_bound.json / .csv /
    .md / .png into `out`."""
    from molrmog.pipeline.run import Run, cluster_seed

    if n < 2 or steps < 1 or ode_steps < 1 or not sigma > 0:
        raise MolrmogError(f"the key bound needs n >= 2 images, steps and ode_steps >= 1 and sigma > 0, got n = {n}, "
                           f"steps = {steps}, ode_steps = {ode_steps}, sigma = {sigma}")
    unknown = [a for a in attacks or () if a not in ATTACKS]
    if unknown:
        raise MolrmogError(f"unknown attack {unknown[0]!r}; choose from {', '.join(ATTACKS)}", param="attacks")
    r = Run.coerce(run, device)
    kind = kind or r.mixture_kind()
    r.check_kinds([kind])
    e, v = r.expert(kind, cluster), r.vae(cluster)  # refuses a cluster outside 0..K-1
    t_w = edit_time(e.schedule, fraction)
    marked, same, _ = embed(e, v, n, key, seed=cluster_seed(seed, cluster), fraction=fraction)
    clean = embed(e, v, n, key, seed=cluster_seed(seed + 1, cluster), fraction=fraction)[1]
    fit = {"fraction": fraction, "sigma": sigma, "steps": steps, "ode_steps": ode_steps}
    rows = []
    for name in attacks or ATTACKS:
        row = {"attack": name}
        for label, imgs in (("marked", marked), ("clean", clean)):
            x = attack(name, imgs, v, seed)
            u_w = ode(e, read_latents(e, v, x, invert_sigma=sigma), e.schedule.t_min, t_w, e.schedule, 40)
            free, held = key_fit(e, v, x, u_w, **fit), key_fit(e, v, x, u_w, key, **fit)
            row[f"excess_{label}"] = (held.pow(2) - free.pow(2)).clamp_min(0).sqrt()
            row[f"free_rms_{label}"] = float(free.median())
            row[f"attack_rms_{label}"] = float((x - imgs).pow(2).flatten(1).mean(1).sqrt().median())
        row["auc"] = roc(-row["excess_clean"], -row["excess_marked"])["auc"]
        row.update({k: float(row[k].median()) for k in ("excess_marked", "excess_clean")})
        rows.append(row)
    res = {"run": str(r.path), "kind": kind, "cluster": cluster, "n": n, "key": str(key), "t_w": t_w, **fit,
           "key_rms": float((marked - same).pow(2).flatten(1).mean(1).sqrt().median()), "attacks": rows}
    _write_bound(Path(out or r.path / "watermark"), res)
    return res


def _write_bound(out: Path, res: dict) -> None:
    from molrmog.core.outputs import pyplot, save_figure, write_csv, write_json, write_text

    write_json(out / "key_bound.json", res)
    write_csv(out / "key_bound.csv", res["attacks"])
    lines = [f"# How far images lie from the images the expert makes with the ring key: {res['run']} ({res['kind']}), "
             f"cluster {res['cluster']}, {res['n']} marked / {res['n']} clean images", "",
             f"The key changes the images by RMS {res['key_rms']:.4f} per pixel (median). Excess: the RMS per pixel "
             f"by which the best fit with the key held at t_w = {res['t_w']:.3f} misses the image, beyond the free "
             f"fit (sampler ODE in {res['ode_steps']} steps, {res['steps']} Adam steps, pixel noise {res['sigma']}). "
             "Where marked images lie as far as clean ones, no detector finds the key.", "",
             "| attack | pixel change (RMS) | excess, marked | excess, clean | AUC of -excess |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {a['attack']} | {a['attack_rms_marked']:.4f} | {a['excess_marked']:.4f} | {a['excess_clean']:.4f} | "
              f"{a['auc']:.3f} |" for a in res["attacks"]]
    write_text(out / "key_bound.md", "\n".join(lines) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names, x = [a["attack"] for a in res["attacks"]], np.arange(len(res["attacks"]))
    ax.bar(x - 0.2, [a["excess_marked"] for a in res["attacks"]], 0.4, label="marked images")
    ax.bar(x + 0.2, [a["excess_clean"] for a in res["attacks"]], 0.4, label="clean images")
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("distance to the keyed images\n(RMS per pixel, median)")
    ax.set_title(f"Ring key, cluster {res['cluster']}: what a detector can see")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "key_bound.png", dpi=110)


def evaluate_watermark(run, *, kind: str | None = None, n: int = 500, key=12345, strength: float = 0.3,
                       fraction: float = 0.3, seed: int = 0, cache=None, out=None, device: str = "cpu",
                       progress: bool = True, method: str = AUTO, invert_steps: int = INVERT_STEPS,
                       invert_sigma: float = INVERT_SIGMA, ring_mix: float = 1.0, fid_samples: int = 1000,
                       draws: int = 3, signature: dict | None = None) -> dict:
    """n watermarked and n clean images (clusters drawn by weight, clean ones from other noise), detection AUC and
    TPR at 1% FPR without and under every attack, PSNR of watermarked vs clean from the same noise; and the FID
    change the key makes: FID(marked) - FID(clean from the same noise) against the training images on `draws`
    sets of `fid_samples` pairs (seeds seed, seed + 1, ...; `fid_change_sets`), the median in `fid_change`.
    Embedding is cheap and detection is not, so the FID sets are larger than the n detection images: on 64
    images the change moved between -7.9 and +1.0 over three seeds of one run (README). Method "decoder": the
    run's extractor and the marked decoders first (`signature.prepare`, options `signature`: bits, extractor_steps,
    mark_steps, psnr, weber, smooth); method "field": the key's field and its detector (`fieldmark.prepare_field`,
    options: field_sigma, extractor_steps, psnr). Writes watermark.json / watermark.md / watermark.png."""
    from molrmog.core import metrics as M
    from molrmog.core.outputs import save_grid, write_json, write_text
    from molrmog.evaluation.evaluate import check_draws, image_scores, reference_features
    from molrmog.evaluation.featurizer import get_featurizer
    from molrmog.pipeline.run import Run

    check_draws(draws)
    if isinstance(fid_samples, bool) or not isinstance(fid_samples, int) or fid_samples < 2:
        raise MolrmogError(f"the FID change needs fid_samples >= 2 image pairs per set, got {fid_samples!r}",
                           param="fid_samples")
    r = Run.coerce(run, device)
    kind = kind or r.mixture_kind()
    r.check_kinds([kind])
    method = choose_method(r, kind, method)
    out = Path(out or r.path / "watermark")
    marking = {"strength": strength, "fraction": fraction, "method": method, "ring_mix": ring_mix}
    detect = {"fraction": fraction, "method": method, "invert_steps": invert_steps, "invert_sigma": invert_sigma}
    sig = _signature(r, kind, key, method, out, signature, seed, progress)
    marked, same, clean, scores, info = _score_clusters(r, kind, key, n, seed, marking, detect, sig)
    results = {name: roc(torch.cat(c), torch.cat(m)) for name, (c, m) in scores.items()}
    mse = ((marked - same) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    feat = get_featurizer(r.cfg.dataset, cache, device, progress=progress, size=r.cfg.size,
                          channels=r.cfg.channels, data_dir=r.cfg.data_dir)
    ref = reference_features(r, feat, 10000, seed)
    sets = [_fid_of_marked_and_clean(r, r.experts(kind), key, marking, fid_samples, seed + i,
                                    lambda x: image_scores(feat.embed(x)[0], ref)["fid"], sig)
            for i in range(draws)]
    fid_m, fid_c = (statistics.median(f[j] for f in sets) for j in (0, 1))
    noise_sets = [v - c for _, c, v in sets]
    res = {"run": str(r.path), "kind": kind, "method": method, "invert_steps": invert_steps,
           "invert_sigma": invert_sigma, "vae_cycle": r.cfg.vae_cycle, "n": n, "key": str(key),
           "strength": strength, "ring_mix": ring_mix, "fraction": fraction, **info,
           "attacks": results, "psnr_db": float((10 * torch.log10(1 / mse)).mean()),
           "fid_samples": fid_samples, "fid_watermarked": fid_m, "fid_clean_same_noise": fid_c,
           "fid_change": statistics.median(m - c for m, c, _ in sets),
           "fid_change_sets": [m - c for m, c, _ in sets],
           "fid_change_white_noise": statistics.median(noise_sets), "fid_change_white_noise_sets": noise_sets,
           "fid_watermarked_vs_clean": M.fid(feat.embed(same)[0], feat.embed(marked)[0]),
           **({"signature": sig["facts"]} if sig else {})}
    write_json(out / "watermark.json", res)
    write_text(out / "watermark.md", _report(res))
    save_grid(out / "watermark.png", torch.cat([same[:8], marked[:8], (marked[:8] - same[:8]).abs() * 5]), 8)
    return res


def _signature(r, kind: str, key, method: str, out: Path, options: dict | None, seed: int, progress: bool):
    """For method "decoder": the run's extractor and every cluster's marked VAE (`signature.prepare`); for "field":
    the key's field and its detector (`fieldmark.prepare_field`); else None. Either way with "score": images ->
    the detection statistic. `options`: the decoder's (bits, extractor_steps, mark_steps, psnr, weber, smooth,
    clusters) and field_sigma; each method takes what is its own (the field: extractor_steps, psnr)."""
    o = dict(options or {})
    field_sigma = o.pop("field_sigma", None)
    if method == "subspace":
        from molrmog.applications.subspacemark import prepare_subspace

        def clean(e, v, n: int, s: int) -> Tensor:  # embed's clean images only: one ODE, no latent key drawn
            return embed(e, v, n, key, seed=s, method="subspace", mark=lambda x: x)[1]

        return prepare_subspace(r, kind, key, clean, seed=seed, progress=progress, clusters=o.get("clusters"),
                                **({"psnr": o["psnr"]} if "psnr" in o else {}))
    if method == "field":
        from molrmog.applications.fieldmark import SIGMA, STEPS, prepare_field

        how = {"sigma": SIGMA if field_sigma is None else field_sigma, "steps": o.get("extractor_steps", STEPS)}
        return prepare_field(r, key, out, seed=seed, progress=progress, **how,
                             **({"psnr": o["psnr"]} if "psnr" in o else {}))
    if method != "decoder":
        return None
    from molrmog.applications.signature import prepare, scores

    sig = prepare(r, kind, key, out, seed=seed, progress=progress, **o)
    return {**sig, "score": lambda x: scores(sig["extractor"], key, x)}


def _marking(sig, k: int) -> dict:
    """What `embed` needs to mark cluster k's images with a decoder, field or subspace key: marked_vae, mark."""
    mark = sig["marks"][k] if sig and "marks" in sig else sig["mark"] if sig and "mark" in sig else None
    return {"marked_vae": sig["vaes"][k] if sig and "vaes" in sig else None, "mark": mark}


def _score_clusters(r, kind: str, key, n: int, seed: int, marking: dict, detect: dict, sig):
    """Per cluster (n images drawn by the run's weights): marked, clean-from-the-same-noise and clean-from-other-
    noise images, and the detection scores {attack: (clean scores, marked scores)}, with `latent_no_vae` (the
    latent keys read from the final latents) and the facts of the embedding."""
    from molrmog.pipeline.run import cluster_seed

    counts = torch.bincount(torch.multinomial(r.weights, n, True, generator=torch.Generator().manual_seed(seed)),
                            minlength=r.K)
    vaes, experts, method = r.vaes(), r.experts(kind), marking["method"]
    marked, same, clean, scores, info, ratio = [], [], [], {}, [], []
    for k in counts.nonzero().flatten().tolist():
        e, v, mv = experts[k], vaes[k], _marking(sig, k)
        m_k, c_k, inf, um_k, uc_k = embed(e, v, int(counts[k]), key, seed=cluster_seed(seed, k), latents=True,
                                          **mv, **marking)
        _, c2_k, _, _, u2_k = embed(e, v, int(counts[k]), key, seed=cluster_seed(seed + 1, k), latents=True,
                                    **mv, **marking)  # the negatives
        if method not in ("decoder", *MARKED_IMAGES):  # latent keys: read from the latents; the round trip's move
            how = {"fraction": marking["fraction"], "method": method}
            pair = scores.setdefault("latent_no_vae", ([], []))
            pair[0].append(latent_scores(e, u2_k, key, **how))
            pair[1].append(latent_scores(e, um_k, key, **how))
            with torch.no_grad():
                rt = e.standardise(v.encode(m_k)[0].flatten(1))
            ratio.append(((rt - um_k).norm(dim=1) / (um_k - uc_k).norm(dim=1).clamp_min(1e-12)).cpu())
        marked.append(m_k)
        same.append(c_k)
        clean.append(c2_k)
        info.append(inf)
        for name in ATTACKS:
            pair = scores.setdefault(name, ([], []))
            for store, imgs in zip(pair, (c2_k, m_k), strict=True):
                x = attack(name, imgs, v, seed)
                store.append(_read(sig, e, v, x, key, detect, k))
    facts = {"t_w": info[0]["t_w"], "mean_null_rank_complement": float(np.mean([i["mean_rank"] for i in info])),
             "vae_roundtrip_over_pattern": float(torch.cat(ratio).median()) if ratio else None}
    return torch.cat(marked), torch.cat(same), torch.cat(clean), scores, facts


def _read(sig, expert, vae, x: Tensor, key, detect: dict, k: int) -> Tensor:
    """The detection statistic of cluster k's images x: `sig["score"]` (decoder: the extractor's agreement with the
    key's bits; field: the detector's map correlated with the key's field), `sig["scores"][k]` (subspace: the
    fitted residual along the key's direction, its distance from the clean mean in clean standard deviations), or
    `detection_scores` (the latent keys)."""
    if sig and "scores" in sig:
        return sig["scores"][k](x)
    if sig:
        return sig["score"](x)
    return detection_scores(expert, vae, x, key, **detect)


def _report(res: dict) -> str:
    """watermark.md: the marking, PSNR, the FID change's sets and the AUC / TPR table."""
    method, ring_mix, sets = res["method"], res["ring_mix"], res["fid_change_sets"]
    ring_words = f", mixed {ring_mix} of the way" if ring_mix < 1 else ""
    title = {"null": "Null-space", "ring": "Ring-key (Tree-Ring / Shallow Diffuse)",
             "decoder": "Decoder (Stable Signature)", "field": "Multiplicative field",
             "subspace": "Off-subspace (manifold-fitted)"}[method]
    how = {"null": f"t_w = {res['t_w']:.3f}, strength {res['strength']} (pattern norm / noise norm at t_w)",
           "ring": f"t_w = {res['t_w']:.3f}, ring key on latent channel 0" + ring_words,
           "decoder": "the key's bits written by each cluster's fine-tuned decoder, read by the extractor",
           "field": "each decoded image times (1 + eps f), f the key's smooth field, eps set per image for the "
                    "PSNR, read by a detector that correlates its map with f",
           "subspace": "each decoded image moved (at the PSNR) so that its encoding steps off its mode's subspace "
                       "along the key's direction, read as the residual of a fit of the decoder's manifold"}[method]
    lines = [f"# {title} watermark: {res['run']} ({res['kind']}), {res['n']} marked / {res['n']} clean images", "",
             how + "; PSNR marked vs clean "
             f"(same noise) {res['psnr_db']:.1f} dB; FID change {res['fid_change']:+.2f} (median of "
             f"{len(sets)} sets of {res['fid_samples']} pairs: " + ", ".join(f"{v:+.2f}" for v in sets)
             + f"; FID marked {res['fid_watermarked']:.2f}, clean {res['fid_clean_same_noise']:.2f})", "",
             f"For scale: white Gaussian noise with each mark's own MSE, added to the same clean images "
             f"(`white_noise_like`), changes the FID by {res['fid_change_white_noise']:+.2f} (median of "
             + ", ".join(f"{v:+.2f}" for v in res["fid_change_white_noise_sets"]) + ").", ""]
    if res["vae_roundtrip_over_pattern"] is not None:
        lines += [f"`latent_no_vae` detects from the final latents without decoding; the VAE round trip (encode of "
                  f"decode) moves a watermarked latent {res['vae_roundtrip_over_pattern']:.1f}x as far as the pattern "
                  f"moved it (median), so a ratio above 1 means the images cannot carry the mark to the detector.", ""]
    lines += ["| attack | AUC | TPR at 1% FPR |", "|---|---:|---:|"]
    lines += [f"| {a} | {r['auc']:.4f} | {r['tpr_at_1pct_fpr']:.3f} |" for a, r in res["attacks"].items()]
    return "\n".join(lines) + "\n"


def _fid_of_marked_and_clean(r, experts, key, marking: dict, n: int, seed: int, fid,
                             sig=None) -> tuple[float, float, float]:
    """`fid` (a function of images) of n marked images, of the n clean images from the same noise, and of the
    clean images with white noise of each mark's MSE (`white_noise_like`, generator seeded with `seed`), clusters
    drawn by the run's weights with `seed` (each cluster's noise from `cluster_seed(seed, k)`; the decoder and field
    methods mark with `sig`, `_signature`'s)."""
    from molrmog.pipeline.run import cluster_seed

    counts = torch.bincount(torch.multinomial(r.weights, n, True, generator=torch.Generator().manual_seed(seed)),
                            minlength=r.K)
    vaes, marked, clean = r.vaes(), [], []
    for k in counts.nonzero().flatten().tolist():
        m, c, _ = embed(experts[k], vaes[k], int(counts[k]), key, seed=cluster_seed(seed, k), **_marking(sig, k),
                        **marking)
        marked.append(m)
        clean.append(c)
    marked, clean = torch.cat(marked), torch.cat(clean)
    noisy = white_noise_like(clean, marked, torch.Generator().manual_seed(seed))
    return fid(marked), fid(clean), fid(noisy)


def white_noise_like(clean: Tensor, marked: Tensor, g: torch.Generator | None = None, iters: int = 40) -> Tensor:
    """clean (N, C, H, W) in [0, 1] plus white Gaussian noise, clipped to [0, 1], scaled per image (bisection) so
    that its MSE to the clean image equals that of the marked image: the same pixel change spent on no structure,
    the yardstick for a watermark's FID change (README: a decoder that carries the key)."""
    target = (marked - clean).pow(2).flatten(1).mean(1)
    w = torch.randn(clean.shape, generator=g, dtype=clean.dtype)
    shape = (-1,) + (1,) * (clean.dim() - 1)

    def mse(s: Tensor) -> Tensor:
        return ((clean + s.view(shape) * w).clamp(0, 1) - clean).pow(2).flatten(1).mean(1)

    lo, hi = torch.zeros_like(target), torch.ones_like(target)
    while bool((mse(hi) < target).any()):  # the clipped MSE grows with the scale, to at most that of +-1 pixels
        hi = torch.where(mse(hi) < target, 2 * hi, hi)
        if float(hi.max()) > 1e6:
            break
    for _ in range(iters):
        mid = (lo + hi) / 2
        low = mse(mid) < target
        lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
    return (clean + torch.where(target > 0, hi, 0.0).view(shape) * w).clamp(0, 1)


def choose_method(run, kind: str, method: str) -> str:
    """The method "auto" stands for (the default of `embed_run`, `evaluate_watermark` and the CLI): "subspace"
    where `kind`'s experts have low-rank modes (MoG), else "field" (it needs no modes) -- the two marks that meet
    issue 18's goals from images: the subspace mark on digits and Fashion-MNIST at the defaults, the field on
    Fashion-MNIST too (README). Any other method is returned as given."""
    if method != AUTO:
        return method
    from molrmog.applications.subspacemark import has_modes

    return "subspace" if has_modes(run.expert(kind, 0)) else "field"


def embed_run(run, *, kind: str | None = None, cluster: int = 0, n: int = 64, key="12345", strength: float = 0.3,
              fraction: float = 0.3, method: str = AUTO, invert_steps: int = INVERT_STEPS,
              invert_sigma: float = INVERT_SIGMA, seed: int = 0, ring_mix: float = 1.0,
              out=None, signature: dict | None = None, progress: bool = False) -> dict:
    """`molrmog watermark embed`: n watermarked images of `cluster` into OUT/watermarked.npy and .png, and
    OUT/key.json with the detection threshold, calibrated on n clean images from other noise (1% false
    positives). Method "decoder" also keeps the run's extractor in OUT (`signature.extractor_for`) and the marked
    VAE's weights in OUT/marked-vae-<cluster>.safetensors (a state dict of the run's VAE for that cluster: load it
    into `Run.vae(cluster)` to decode marked images); method "field" keeps its detector in OUT
    (`fieldmark.prepare_field`, with field.json: the field's sigma and PSNR). Returns {"out", "threshold",
    "images"}."""
    from molrmog.core.artefacts import atomic_write, write_json
    from molrmog.core.outputs import save_grid
    from molrmog.pipeline.run import Run

    r = Run.coerce(run)
    kind = kind or r.mixture_kind()
    r.check_kinds([kind])
    method = choose_method(r, kind, method)
    if not 0 <= cluster < r.K:
        raise MolrmogError(f"cluster must lie in 0..{r.K - 1}, got {cluster}", param="cluster")
    out = Path(out or r.path / "watermark")
    expert, vae = r.expert(kind, cluster), r.vae(cluster)
    sig = _signature(r, kind, key, method, out, {**(signature or {}), "clusters": [cluster]}, seed, progress)
    how = {"strength": strength, "fraction": fraction, "method": method, "ring_mix": ring_mix,
           **_marking(sig, cluster)}
    marked, _, info = embed(expert, vae, n, key, seed=seed, **how)
    _, clean, _ = embed(expert, vae, n, key, seed=seed + 1, **how)
    detect = {"fraction": fraction, "method": method, "invert_steps": invert_steps, "invert_sigma": invert_sigma}
    threshold = float(np.quantile(_read(sig, expert, vae, clean, key, detect, cluster).numpy(), 0.99))
    extra = {}
    if sig and method in MARKED_IMAGES:
        extra = sig["facts"]
    elif sig:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in sig["vaes"][cluster].state_dict().items()}
        name = f"marked-vae-{cluster}.safetensors"
        atomic_write(out / name, lambda p: save_file(state, p))
        extra = {**{k: v for k, v in sig["facts"].items() if k != "clusters"}, "marked_vae": name,
                 "mark": sig["facts"]["clusters"][cluster]}
    atomic_write(out / "watermarked.npy", lambda p: np.save(open(p, "wb"), marked.numpy()))
    save_grid(out / "watermarked.png", marked, min(8, n))
    write_json(out / "key.json", {"key": str(key), "kind": kind, "cluster": cluster, "t": fraction,
                                  "strength": strength, "ring_mix": ring_mix, "threshold": threshold,
                                  "invert_steps": invert_steps, "invert_sigma": invert_sigma, **info, **extra})
    return {"out": str(out), "threshold": threshold, "images": marked}


def detect_run(run, images, *, keyfile=None, out=None, kind: str | None = None) -> tuple[Tensor, dict]:
    """`molrmog watermark detect`: a detection score per image of an .npy file, with the key.json embed wrote
    (`keyfile`, default OUT/key.json, OUT default RUN/watermark). Returns (scores, the checked key file); a
    score above its threshold means watermarked."""
    from molrmog.core.artefacts import read_json
    from molrmog.pipeline.run import Run

    r = Run.coerce(run)
    kind = kind or r.mixture_kind()
    r.check_kinds([kind])
    path = Path(keyfile) if keyfile else Path(out or r.path / "watermark") / "key.json"
    kf = check_key(read_json(path, "watermark key"), path, kind, r.K)
    vae0 = r.vae(0)
    x = read_images(images, tuple(getattr(vae0, "vae", vae0).config.image_shape))
    k = kf["cluster"]
    if kf["method"] == "decoder":
        from molrmog.applications.signature import Extractor, scores
        from molrmog.core.artefacts import inside

        folder = inside(path.parent, kf["extractor"], "the key's extractor folder")
        return scores(Extractor.load(folder, "watermark extractor").eval(), kf["key"], x), kf
    if kf["method"] == "field":
        from molrmog.applications.fieldmark import FieldDetector, field_scores
        from molrmog.core.artefacts import inside

        folder = inside(path.parent, kf["detector"], "the key's detector folder")
        return field_scores(FieldDetector.load(folder, "watermark field detector").eval(), x), kf
    if kf["method"] == "subspace":
        from molrmog.applications.subspacemark import subspace_scores

        return subspace_scores(r.expert(kind, k), r.vae(k), x, kf, k), kf
    scores = detection_scores(r.expert(kind, k), r.vae(k), x, kf["key"], fraction=kf["t"], method=kf["method"],
                              invert_steps=kf["invert_steps"], invert_sigma=kf["invert_sigma"])
    return scores, kf
