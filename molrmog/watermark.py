"""Invisible, robust watermarks in the null space of the denoiser's Jacobian (issue 15.3).

Following Shallow Diffuse (Li, Zhang, Qu, NeurIPS 2025; official code liwd190019/Shallow-Diffuse,
run_shallow_diffuse_t2i.py): during generation, at a small time t_w, a keyed pattern is added to the noised
latent -- here projected onto the (approximate) null space of the denoiser's Jacobian J_t(u_t), the directions
the posterior mean does not depend on -- and sampling finishes; detection inverts an image back to t_w with the
probability-flow ODE and tests the pattern's correlation against a threshold.

In latent space: u_T ~ prior -> ODE to t_w -> u_t + eps * gamma_w * sqrt(d) * P_null(key) -> ODE to t_min ->
decode. The Jacobian of a MoG / Gaussian expert is available in closed form (`mixture.denoiser_jacobian`); for
other kinds by autograd (`editing.latent_jacobian`; the latent has a few hundred dimensions at most).
Null space: the complement of the right singular vectors whose singular value exceeds `rank_tol` x the largest.
Because a mixture's Tweedie step at the end would project the pattern away with the null space, watermarked
images end at t_min without it (the clean reference images are generated the same way). Detection: encode
(posterior mean), standardise, ODE t_min -> t_w, project onto the null space there and take the cosine with
the projected key: about N(0, 1/(d - rank)) for clean images, clearly positive for marked ones.

What this measures on a small VAE (see README): from the final latents the mark is found (AUC 0.98 on digits),
from the decoded images barely (AUC ~0.6). The denoiser's null space in a cluster's latent is the set of
directions the latent distribution hardly varies in, which are the directions the VAE decoder ignores: the
encoder's posterior mean of a decoded watermarked image moves ~7x further than the pattern moved the latent
(`vae_roundtrip_over_pattern` in watermark.json). Shallow Diffuse relies on a near-invertible autoencoder;
with a posterior-collapsed small VAE the null space is invisible *and* unreadable. Decoder inversion (L-BFGS
on ||decode(u) - x||^2 from the encoder's guess) only halves that ratio, so it is not used.
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .editing import edit_time, latent_jacobian, ode
from .errors import MolrmogError

__all__ = ["key_pattern", "null_projector", "embed", "detection_scores", "latent_scores", "ATTACKS", "attack", "roc"]


def key_pattern(key: int | str, d: int) -> Tensor:
    """A unit vector in R^d drawn from the key (any integer or string)."""
    seed = int(hashlib.sha256(str(key).encode()).hexdigest()[:15], 16)
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm()


def null_projector(expert, u: Tensor, t: float, rank_tol: float = 0.01) -> tuple[Tensor, Tensor]:
    """Projectors (B, d, d) onto the null space of J_t at each row of u, and the numerical ranks (B,)."""
    J = latent_jacobian(expert, u, t).detach().double()
    _, S, Vh = torch.linalg.svd(J)
    keep = S > rank_tol * S[:, :1]
    V = Vh.transpose(1, 2) * keep[:, None, :]
    eye = torch.eye(u.shape[1], dtype=torch.float64, device=u.device)
    return eye - V @ V.transpose(1, 2), keep.sum(1)


def embed(expert, vae, n: int, key, *, strength: float = 0.3, fraction: float = 0.3, seed: int = 0,
          steps: int = 40, latents: bool = False):
    """n watermarked images and the n clean images from the same noise (both in [0, 1], (n, C, H, W)), and facts
    about the embedding (t_w, the mean numerical rank, the pattern's norm). `strength`: the pattern's norm as a
    fraction of the noise's at t_w (gamma_w sqrt(d)). With `latents`, also the two final standardised latents."""
    if n < 1 or strength <= 0:
        raise MolrmogError(f"watermarking needs n >= 1 images and a strength > 0, got n = {n}, strength = {strength}")
    sched = expert.schedule
    t_w = edit_time(sched, fraction)
    d = expert.shift.numel()
    g = torch.Generator().manual_seed(seed)
    u_T = float(sched.gamma(torch.tensor(sched.t_max))) * torch.randn(n, d, generator=g)
    u_t = ode(expert, u_T, sched.t_max, t_w, sched, steps)
    P, rank = null_projector(expert, u_t, t_w)
    k = key_pattern(key, d)
    delta = (P @ k).float()
    delta = delta / delta.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gamma_w = float(sched.gamma(torch.tensor(t_w)))
    marked_t = u_t + strength * gamma_w * math.sqrt(d) * delta
    outs, u0s = [], []
    for start in (u_t, marked_t):
        u0 = ode(expert, start, t_w, sched.t_min, sched, steps)
        u0s.append(u0)
        with torch.no_grad():
            outs.append(torch.sigmoid(vae.decode(expert.unstandardise(u0))))
    info = {"t_w": t_w, "mean_rank": float(rank.double().mean()), "pattern_norm": strength * gamma_w * math.sqrt(d)}
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
    return key


def read_images(path, shape: tuple[int, int, int]) -> Tensor:
    """Images (N, C, H, W) from an .npy file: real floats in [0, 1], finite, of the run's image shape."""
    if not path or not Path(path).is_file():
        raise MolrmogError(f"--images {path}: no such file (an .npy array of images)")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise MolrmogError(f"--images {path}: cannot read it as a .npy array ({e})") from None
    if not np.issubdtype(arr.dtype, np.floating):
        hint = "; uint8 images: divide by 255 first" if arr.dtype == np.uint8 else ""
        raise MolrmogError(f"--images {path}: expected floating-point images in [0, 1], got dtype {arr.dtype}{hint}")
    if arr.ndim != 4 or tuple(arr.shape[1:]) != tuple(shape) or arr.shape[0] < 1:
        raise MolrmogError(f"--images {path}: expected (N, {', '.join(map(str, shape))}) images, got shape "
                           f"{tuple(arr.shape)}")
    if not np.isfinite(arr).all() or arr.min() < -1e-3 or arr.max() > 1 + 1e-3:
        raise MolrmogError(f"--images {path}: values must be finite and lie in [0, 1]")
    return torch.from_numpy(arr.astype(np.float32)).clamp(0, 1)


def detection_scores(expert, vae, images: Tensor, key, *, fraction: float = 0.3, steps: int = 40,
                     batch: int = 256) -> Tensor:
    """The detection statistic of each image (N,): the cosine between the null-space part of its latent inverted
    to t_w and the null-space part of the key."""
    with torch.no_grad():
        u0 = torch.cat([expert.standardise(vae.encode(b)[0].flatten(1)) for b in images.split(batch)])
    return latent_scores(expert, u0, key, fraction=fraction, steps=steps, batch=batch)


def latent_scores(expert, u0: Tensor, key, *, fraction: float = 0.3, steps: int = 40, batch: int = 256) -> Tensor:
    """The detection statistic computed from standardised latents at t_min directly (no decode / encode): what
    the detector could do if the VAE were a perfect inverse. Comparing it with `detection_scores` isolates the
    loss of the pattern in the VAE round trip."""
    sched = expert.schedule
    t_w = edit_time(sched, fraction)
    k = key_pattern(key, expert.shift.numel())
    out = []
    for b in u0.split(batch):
        u_t = ode(expert, b, sched.t_min, t_w, sched, steps)
        P, _ = null_projector(expert, u_t, t_w)
        a = torch.einsum("bij,bj->bi", P, u_t.double())
        kk = torch.einsum("bij,j->bi", P, k)
        out.append(F.cosine_similarity(a, kk, dim=1).detach())
    return torch.cat(out)


# --- attacks on images (N, C, H, W) in [0, 1] -----------------------------------------------------------------


def _jpeg(x: Tensor, quality: int = 75) -> Tensor:
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


def _blur(x: Tensor, sigma: float = 0.6) -> Tensor:
    r = 2
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma**2))
    k = (k / k.sum())
    k2 = (k[:, None] * k[None, :])[None, None].expand(x.shape[1], 1, -1, -1)
    return F.conv2d(F.pad(x, (r,) * 4, mode="reflect"), k2, groups=x.shape[1])


ATTACKS = {
    "none": lambda x, vae, g: x,
    "gaussian_noise": lambda x, vae, g: (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1),
    "blur": lambda x, vae, g: _blur(x),
    "jpeg": lambda x, vae, g: _jpeg(x, 75),
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


def evaluate_watermark(run, *, kind: str | None = None, n: int = 500, key=12345, strength: float = 0.3,
                       fraction: float = 0.3, seed: int = 0, cache=None, out=None, device: str = "cpu",
                       progress: bool = True) -> dict:
    """n watermarked and n clean images (clusters drawn by weight, clean ones from other noise), detection AUC and
    TPR at 1% FPR without and under every attack, PSNR of watermarked vs clean from the same noise, and the FID
    of both sets against the training images; writes watermark.json / watermark.md / watermark.png."""
    from pathlib import Path

    from . import metrics as M
    from .editing import _first_mixture_kind
    from .evaluation import _Context, image_scores, reference_features
    from .featurizer import get_featurizer
    from .outputs import save_grid, write_json, write_text
    from .pipeline import cluster_seed

    run = Path(run)
    kind = kind or _first_mixture_kind(run)
    ctx = _Context(run, device)
    weights, _, vaes, experts = ctx.load(kind)
    counts = torch.bincount(torch.multinomial(weights, n, True, generator=torch.Generator().manual_seed(seed)),
                            minlength=weights.numel())
    marked, same, clean, scores_m, scores_c, info, ratio = [], [], [], {}, {}, [], []
    for k in range(ctx.K):
        if not counts[k]:
            continue
        m_k, c_k, inf, um_k, uc_k = embed(experts[k], vaes[k], int(counts[k]), key, strength=strength,
                                          fraction=fraction, seed=cluster_seed(seed, k), latents=True)
        _, c2_k, _, _, u2_k = embed(experts[k], vaes[k], int(counts[k]), key, strength=strength, fraction=fraction,
                                    seed=cluster_seed(seed + 1, k), latents=True)  # other noise: the negatives
        scores_m.setdefault("latent_no_vae", []).append(latent_scores(experts[k], um_k, key, fraction=fraction))
        scores_c.setdefault("latent_no_vae", []).append(latent_scores(experts[k], u2_k, key, fraction=fraction))
        with torch.no_grad():  # how far the VAE round trip moves a latent, against how far the pattern moved it
            rt = experts[k].standardise(vaes[k].encode(m_k)[0].flatten(1))
        ratio.append(((rt - um_k).norm(dim=1) / (um_k - uc_k).norm(dim=1).clamp_min(1e-12)).cpu())
        marked.append(m_k)
        same.append(c_k)
        clean.append(c2_k)
        info.append(inf)
        for name in ATTACKS:
            for store, imgs in ((scores_m, m_k), (scores_c, c2_k)):
                x = attack(name, imgs, vaes[k], seed)
                store.setdefault(name, []).append(detection_scores(experts[k], vaes[k], x, key, fraction=fraction))
    marked, same, clean = torch.cat(marked), torch.cat(same), torch.cat(clean)
    results = {name: roc(torch.cat(scores_c[name]), torch.cat(scores_m[name])) for name in ("latent_no_vae", *ATTACKS)}
    mse = ((marked - same) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    feat = get_featurizer(ctx.cfg.dataset, cache, device, progress=progress, size=ctx.cfg.size,
                          channels=ctx.cfg.channels, data_dir=ctx.cfg.data_dir)
    ref = reference_features(ctx, feat, 10000, seed)
    fid_m, fid_c = image_scores(feat.embed(marked)[0], ref)["fid"], image_scores(feat.embed(same)[0], ref)["fid"]
    res = {"run": str(run), "kind": kind, "n": n, "key": str(key), "strength": strength, "fraction": fraction,
           "t_w": info[0]["t_w"], "mean_null_rank_complement": float(np.mean([i["mean_rank"] for i in info])),
           "attacks": results, "vae_roundtrip_over_pattern": float(torch.cat(ratio).median()),
           "psnr_db": float((10 * torch.log10(1 / mse)).mean()),
           "fid_watermarked": fid_m, "fid_clean_same_noise": fid_c, "fid_change": fid_m - fid_c,
           "fid_watermarked_vs_clean": M.fid(feat.embed(same)[0], feat.embed(marked)[0])}
    out = Path(out or run / "watermark")
    write_json(out / "watermark.json", res)
    lines = [f"# Null-space watermark: {run} ({kind}), {n} marked / {n} clean images", "",
             f"t_w = {res['t_w']:.3f}, strength {strength} (pattern norm / noise norm at t_w); PSNR marked vs clean "
             f"(same noise) {res['psnr_db']:.1f} dB; FID marked {fid_m:.2f} vs clean {fid_c:.2f} "
             f"(change {res['fid_change']:+.2f})", "",
             f"`latent_no_vae` detects from the final latents without decoding; the VAE round trip (encode of "
             f"decode) moves a watermarked latent {res['vae_roundtrip_over_pattern']:.1f}x as far as the pattern "
             f"moved it (median), so a ratio above 1 means the images cannot carry the mark to the detector.", "",
             "| attack | AUC | TPR at 1% FPR |", "|---|---:|---:|"]
    lines += [f"| {a} | {r['auc']:.4f} | {r['tpr_at_1pct_fpr']:.3f} |" for a, r in results.items()]
    write_text(out / "watermark.md", "\n".join(lines) + "\n")
    save_grid(out / "watermark.png", torch.cat([same[:8], marked[:8], (marked[:8] - same[:8]).abs() * 5]), 8)
    return res
