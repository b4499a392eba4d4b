"""A mark off the expert's subspaces, read by fitting the decoder's manifold (issue 18, point 3; `--method subspace`).

A MoG expert's law is a mixture of low-rank Gaussians N(mu_j, U_j U_j^T) in standardised latent coordinates u, so
every image it makes decodes from a latent near one of r-dimensional affine subspaces mu_j + span(U_j); in the
d - r directions off mode j's subspace the images it makes hardly vary. The mark uses exactly those directions:

- the key's vector per cluster (`key_vector`, stored in key.json) is a random combination, drawn from the key, of
  the latent directions in which a marking can move the encoding most against what the attacks move it, kept off
  the modes' subspaces; chosen on the calibration's clean images; its part off mode j's subspace (projected onto
  the orthogonal complement of span(U_j), unit length) is the mode's direction w_j;
- marking an image x (after decoding, as the field does): its mode j is the one whose manifold fits it best (below),
  and a pixel change m with ||m|| set by `psnr` (every marked image `psnr` dB from its clean image before clipping)
  is found by projected gradient ascent (`MARK_STEPS`) on the sum over the attacks (`signature.train_attack`, one
  each) of <u(a(clip(x + m))), +-w_j'>, u the cluster VAE's standardised encoder mean, w_j' = w_j less its part
  along the tangent of the manifold fitted to x (which the detector's fit would absorb), the sign the side of w_j
  the clean image's residual already lies on: a change the encoder reads as a step along +-w_j, also after noise,
  blur, JPEG, brightness and the VAE re-encoding; two sides, so that a cluster's marks share no mean step; each
  step weighted per pixel by min(1, x / DARK), so that the black background stays black (a featurizer reads specks
  on it as noise: Fashion-MNIST's FID change fell from +2.03 to +0.52; the AUC under noise it cost with a random
  key direction, 0.98 -> 0.82, the chosen direction more than won back: 0.996);
- detection is a generalised likelihood-ratio test with the decoder's manifold as the null: per mode j, the image's
  encoding u is fitted (`FIT_STEPS` Adam steps) by E(g(D(mu_j + Q_j c))) over the r coordinates c in the mode's
  subspace and three nuisances g of the attack list (a blur mix y + a (blur(y) - y), a gain beta clipped to
  [0, 1], and the mean of clipped pixel noise of a fitted sd, `attacks.noisy_mean`); the residual
  rho = u - E(g(D(...))) of the best-fitting mode, projected on w_j, is the raw statistic; the score is its
  distance from the clean mean in clean standard deviations, |s - m0| / sd, both measured per cluster on
  `CALIBRATION` clean images the expert makes.

Clean images leave a residual near zero (they lie on the fitted manifold), whatever their content; the mark is a
residual the manifold cannot explain. This is the host-interference problem of the field and decoder keys solved
by the expert's own law: on 8 x 8 digits (64 pixels at 35 dB: a mark of norm 0.14 against images of norm ~3) a
detector that must tell the mark from the image's content falls short under the attacks (README), one that fits
the content away does not.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from molrmog.applications.attacks import ATTACKS, blur, frozen, key_seed, noisy_mean, psnr_mse
from molrmog.core.errors import MolrmogError

__all__ = ["has_modes", "key_vector", "key_directions", "fit_residuals", "mark_images", "statistic",
           "prepare_subspace", "subspace_scores", "check_calibration", "noise_sd", "PSNR", "MARK_STEPS", "FIT_STEPS",
           "CALIBRATION"]

PSNR = 35.0  # dB, every marked image against its clean image before clipping (the goal: >= 35)
MARK_STEPS = 20  # projected gradient steps of the marking
FIT_STEPS = 40  # Adam steps of the detector's fit of the manifold
CALIBRATION = 100  # clean images per cluster that standardise the statistic
DARK = 0.05  # the marking's steps are weighted by min(1, x / DARK): the black background is left (nearly) alone
# (Fashion-MNIST: FID change +2.03 -> +0.52, AUC under noise 0.98 -> 0.82 with a random key direction, 0.996
# with `key_vector`'s; README)
BLURS = (0.6,)  # the nuisance's blurs (pixels), mixed into the image by the fit: y + sum a_i (blur_i(y) - y)
# (README: adding 1.2 moved a blur of 0.9 from AUC 0.56 to 0.68 and cost the evaluated blur 0.005: not kept)
NOISE = 0.06  # the largest pixel-noise sd the fit explains (twice the attack's 0.03), `noise_sd`; without the noise
# nuisance, noise moved the clean statistic of Fashion-MNIST's cluster 0 by 13 clean sds (README)
KEY_RANK = 16  # the key's direction is a random combination of this many best directions (`key_vector`)
ATTACK_DRAWS = 8  # draws of each attack per calibration image, for the covariance of the attacks' moves
PENALTY = 10.0  # how hard the key's direction keeps off the modes' subspaces and the spread of their means
NUISANCES = len(BLURS) + 2  # blur mixes, the noise's nu, the gain beta: the fit's parameters beyond c


def noise_sd(nu: Tensor) -> Tensor:
    """The fitted pixel-noise sd from its parameter nu: NOISE * sigmoid(4 nu - 1), positive and bounded. It starts
    (nu = 0) at 0.016, where pixels within a few hundredths of 0 or 1 already pull on it: from a start near 0 the
    fit could not move it (the lift is flat in sigma for pixels many sigmas from the clip)."""
    return NOISE * torch.sigmoid(4 * nu - 1)


def _modes(expert) -> tuple[Tensor, Tensor]:
    """The expert's mode means mu (n, d) and orthonormal bases Q (n, d, r) of their subspaces, standardised
    coordinates; refused for a law that has no low-rank modes."""
    net = expert.net
    if not hasattr(net, "U") or not hasattr(net, "mu"):
        raise MolrmogError(f"the subspace watermark needs a MoG expert's low-rank modes; a {expert.kind} expert has "
                           "none (use --kind mog, or --method field)")
    mu, U = net.mu.detach().float(), net.U.detach().float()
    if U.shape[-1] >= U.shape[-2]:
        raise MolrmogError(f"the subspace watermark needs modes of rank below the latent size, got rank "
                           f"{U.shape[-1]} in {U.shape[-2]} dimensions (train the MoG expert with --mog-rank < d)")
    return mu, torch.linalg.qr(U)[0]


def has_modes(expert) -> bool:
    """Whether the expert's law has low-rank modes the subspace mark can use (a MoG expert of rank below d)."""
    try:
        _modes(expert)
    except MolrmogError:
        return False
    return True


def key_vector(key, expert, vae, images: Tensor, cluster: int, seed: int = 0) -> Tensor:
    """The key's direction (d,) for cluster `cluster`, chosen on its clean `images` (the calibration's): a random
    combination, drawn from the key, of the min(`KEY_RANK`, d / 4) directions v that maximise v'Gv / v'Av, where
    - G is what a marking can move: the second moment of the encodings' moves under small random pixel changes
      weighted like the marking's (min(1, x / DARK)), and
    - A is what the detector must not read: the second moment of the encodings' moves under the attacks
      (`signature.train_attack`, `ATTACK_DRAWS` draws of each), plus `PENALTY` times (in units of its mean
      eigenvalue) the projectors on the modes' subspaces and on the spread of their means, plus a small ridge.
    A random direction reads what the encoder does to the black background: on Fashion-MNIST some latent
    coordinates carry little of the data (standardised, they are scaled up 100x more than the median one), and
    pixel noise moves them by tens of data sds, so that noise and JPEG drowned the mark (README)."""
    from molrmog.applications.signature import train_attack

    mu, Q = _modes(expert)
    d = mu.shape[1]
    g = torch.Generator().manual_seed(seed)
    names = [a for a in ATTACKS if a != "none"]
    with frozen(vae, expert), torch.no_grad():
        u = _encode(expert, vae, images)
        moves = torch.cat([_encode(expert, vae, train_attack(images, vae, g, [a])) - u
                           for a in names for _ in range(ATTACK_DRAWS)])
        weight = _weight(images)
        small = 0.1 * (images[0].numel() * psnr_mse(PSNR)) ** 0.5
        pushes = []
        for _ in range(ATTACK_DRAWS):
            e = torch.randn(images.shape, generator=g) * weight
            pushes.append(_encode(expert, vae, images + small * _unit(e)) - u)
    A, G = moves.T @ moves / len(moves), torch.cat(pushes).T @ torch.cat(pushes) / (len(pushes) * len(images))
    spread = torch.linalg.svd((mu - mu.mean(0)).T, full_matrices=False)[0][:, :max(len(mu) - 1, 0)]
    unit = (A.trace() / d).clamp_min(1e-12)  # images no attack moves still get a well-posed choice
    A = A + PENALTY * unit * (torch.einsum("ndr,ner->de", Q, Q) / len(Q) + spread @ spread.T)
    Li = torch.linalg.inv(torch.linalg.cholesky(A + 1e-3 * unit * torch.eye(d)))
    q = min(KEY_RANK, max(1, d // 4))
    V = Li.T @ torch.linalg.eigh(Li @ G @ Li.T)[1][:, -q:]
    V = V / V.norm(dim=0, keepdim=True)
    v = V @ torch.randn(q, generator=torch.Generator().manual_seed(key_seed(f"subspace:{key}:{cluster}")))
    return v / v.norm().clamp_min(1e-12)


def key_directions(v: Tensor, expert) -> Tensor:
    """The key's direction per mode of the expert (n, d): the key's vector v (d,) (`key_vector`) projected off
    each mode's subspace, unit length (one vector, so that where two modes overlap and the detector's fit picks
    the other, it still reads nearly the same direction)."""
    mu, Q = _modes(expert)
    v = torch.as_tensor(v, dtype=mu.dtype)
    if v.shape != mu.shape[1:]:
        raise MolrmogError(f"the subspace key's direction has {tuple(v.shape)} numbers, the expert's latent "
                           f"{mu.shape[1]} (a key of another run: embed again with this run)")
    w = v.expand(mu.shape)
    w = w - torch.einsum("ndr,nr->nd", Q, torch.einsum("ndr,nd->nr", Q, w))
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _weight(images: Tensor) -> Tensor:
    """The marking's per-pixel weight min(1, x / DARK): a black pixel of the clean image is not moved."""
    return (images / DARK).clamp(max=1)


def _unit(v: Tensor) -> Tensor:
    """Each image (row of v, (N, C, H, W)) scaled to unit norm."""
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def _encode(expert, vae, images: Tensor) -> Tensor:
    return expert.standardise(vae.encode(images)[0].flatten(1))


def _on_manifold(expert, vae, mu: Tensor, Q: Tensor, p: Tensor) -> Tensor:
    """E(g(D(mu + Q c))) per row: p (R, r + NUISANCES) holds c, the blur mixes a, the noise's nu and the gain
    beta (r + 3 numbers with one blur); mu (R, d), Q (R, d, r). g: blur mix, then gain and clip, then the mean of
    clipped noise of sd `noise_sd(nu)`."""
    r = Q.shape[-1]
    y = torch.sigmoid(vae.decode(expert.unstandardise(mu + torch.einsum("ndr,nr->nd", Q, p[:, :r]))))
    z = y + sum(p[:, r + i].view(-1, 1, 1, 1) * (blur(y, sigma) - y) for i, sigma in enumerate(BLURS))
    z = (z * p[:, -1].view(-1, 1, 1, 1)).clamp(0, 1)
    return _encode(expert, vae, noisy_mean(z, noise_sd(p[:, -2])))


def _fit(expert, vae, u: Tensor, mu: Tensor, Q: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """The residuals (B, n, d) of encodings u (B, d) against every mode's manifold, and the fitted parameters
    (B, n, r + NUISANCES), by Adam from the projection on the subspace, no blur, nu = 0, unit gain."""
    B, (n, d) = len(u), mu.shape
    uu, m, QQ = u[:, None].expand(B, n, d).reshape(-1, d), mu.repeat(B, 1), Q.repeat(B, 1, 1)
    c = torch.einsum("ndr,nd->nr", QQ, uu - m)
    p = torch.cat([c, torch.zeros(len(c), NUISANCES - 1), torch.ones(len(c), 1)], 1).requires_grad_(True)
    opt = torch.optim.Adam([p], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            loss = (uu - _on_manifold(expert, vae, m, QQ, p)).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (uu - _on_manifold(expert, vae, m, QQ, p)).reshape(B, n, d), p.detach().reshape(B, n, -1)


def _best_fit(expert, vae, images: Tensor, steps: int, batch: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """Per image: the residual (N, d) of the best-fitting mode, that mode (N,) and its parameters (N, r + NUISANCES)."""
    mu, Q = _modes(expert)
    out = []
    with frozen(vae, expert):
        for x in images.split(batch):
            with torch.no_grad():
                u = _encode(expert, vae, x)
            res, p = _fit(expert, vae, u, mu, Q, steps)
            j = res.norm(dim=2).argmin(1)
            i = torch.arange(len(u))
            out.append((res[i, j], j, p[i, j]))
    return tuple(torch.cat(t) for t in zip(*out, strict=True))


def fit_residuals(expert, vae, images: Tensor, steps: int = FIT_STEPS) -> tuple[Tensor, Tensor]:
    """Per image: the residual rho (N, d) of its encoding against the best-fitting mode's manifold
    {E(g(D(mu_j + Q_j c)))} (c and the nuisances fitted by Adam), and that mode j (N,)."""
    rho, j, _ = _best_fit(expert, vae, images, steps)
    return rho, j


def _off_tangent(expert, vae, j: Tensor, p: Tensor, w: Tensor, h: float = 1e-2) -> Tensor:
    """w (N, d) with its part along the fitted manifold's tangent at p removed (central differences in the r + NUISANCES
    parameters), unit length: the direction in which a step of the encoding stays in the fit's residual."""
    mu, Q = _modes(expert)
    with torch.no_grad():
        T = torch.stack([(_on_manifold(expert, vae, mu[j], Q[j], p + h * e) -
                          _on_manifold(expert, vae, mu[j], Q[j], p - h * e)) / (2 * h)
                         for e in torch.eye(p.shape[1])], 2)
    B = torch.linalg.qr(T)[0]
    w = w - torch.einsum("ndk,nk->nd", B, torch.einsum("ndk,nd->nk", B, w))
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def statistic(expert, vae, images: Tensor, w: Tensor, steps: int = FIT_STEPS) -> Tensor:
    """The raw statistic per image (N,): the fitted residual projected on its mode's key direction."""
    rho, j = fit_residuals(expert, vae, images, steps)
    return (rho * w[j]).sum(1)


def mark_images(expert, vae, images: Tensor, w: Tensor, psnr: float = PSNR, steps: int = MARK_STEPS,
                seed: int = 0, fit_steps: int = FIT_STEPS) -> Tensor:
    """The images marked: x + m clipped to [0, 1], ||m|| = sqrt(C H W 10^(-psnr / 10)) (so `psnr` dB before the
    clip, at least that after), m by projected gradient ascent on the attacked encodings' step along +-w_j (the
    side the clean image's residual already lies on), less its part along the tangent of the manifold fitted to
    the clean image (which the detector's fit would absorb). Two sides, so that the marks of a cluster share no
    mean step, which a distance between feature means (FID) would see. Each step is weighted per pixel by
    min(1, x / DARK): a black pixel of the clean image stays black."""
    from molrmog.applications.signature import train_attack

    mse = psnr_mse(psnr)
    if steps < 1:
        raise MolrmogError(f"the subspace mark needs steps >= 1, got {steps}")
    rho, j, p = _best_fit(expert, vae, images, fit_steps)
    side = torch.where((rho * w[j]).sum(1) >= 0, 1.0, -1.0)[:, None]  # the side of w_j the image already lies on
    target = side * _off_tangent(expert, vae, j, p, w[j])
    radius = (images[0].numel() * mse) ** 0.5
    weight = _weight(images)  # the background stays black
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros_like(images)

    with frozen(vae, expert), torch.enable_grad():
        for it in range(steps):
            m.requires_grad_(True)
            x = (images + m).clamp(0, 1)
            gain = sum((_encode(expert, vae, train_attack(x, vae, g, [a])) * target).sum() for a in ATTACKS)
            grad, = torch.autograd.grad(gain, m)
            with torch.no_grad():
                m = m.detach() + radius * (1.0 if it == 0 else 0.5) * _unit(grad * weight)
                m = m * (radius / m.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(-1, 1, 1, 1)
    return (images + m.detach()).clamp(0, 1)


def prepare_subspace(run, kind: str, key, draw, *, psnr: float = PSNR, seed: int = 0,
                     calibration: int = CALIBRATION, clusters=None, progress: bool = False) -> dict:
    """Per cluster (`clusters`, default all): the key's directions, the calibration of the statistic (mean and std
    on `calibration` clean images the expert makes, `draw(expert, vae, n, seed)`, noise seeded apart from the
    evaluation's) and the mark. Returns {"marks": {k: images -> marked}, "scores": {k: images -> |s - m0| / sd},
    "facts"}."""
    from molrmog.pipeline.run import Run, cluster_seed

    r = Run.coerce(run)
    if calibration < 2:
        raise MolrmogError(f"the subspace watermark needs >= 2 calibration images, got {calibration}")
    marks, scores, calib, vectors = {}, {}, {}, {}
    clusters = range(r.K) if clusters is None else clusters
    if progress:
        from tqdm.auto import tqdm

        clusters = tqdm(clusters, desc="subspace key: calibration", leave=False)
    for k in clusters:
        e, v = r.expert(kind, k), r.vae(k)
        clean = draw(e, v, calibration, cluster_seed(seed + 7919, k))
        vectors[k] = key_vector(key, e, v, clean, k, cluster_seed(seed + 104729, k))
        w = key_directions(vectors[k], e)
        s = statistic(e, v, clean, w)
        m0, sd = float(s.mean()), float(s.std().clamp_min(1e-12))
        calib[k] = [m0, sd]
        marks[k] = partial(_mark, e, v, w, psnr, cluster_seed(seed, k))
        scores[k] = partial(_score, e, v, w, m0, sd)
    facts = {"psnr_target": psnr, "mark_steps": MARK_STEPS, "fit_steps": FIT_STEPS, "calibration_images": calibration,
             "dark": DARK, "fit_blurs": list(BLURS), "fit_noise_max": NOISE,
             "key_rank": KEY_RANK, "attack_draws": ATTACK_DRAWS, "penalty": PENALTY,
             "calibration": {str(k): c for k, c in calib.items()},
             "directions": {str(k): [round(float(x), 8) for x in vec] for k, vec in vectors.items()}}
    return {"marks": marks, "scores": scores, "facts": facts}


def _mark(expert, vae, w: Tensor, psnr: float, seed: int, images: Tensor) -> Tensor:
    return mark_images(expert, vae, images, w, psnr, seed=seed)


def _score(expert, vae, w: Tensor, m0: float, sd: float, images: Tensor) -> Tensor:
    return (statistic(expert, vae, images, w) - m0).abs() / sd


def check_calibration(key: dict, cluster: int, bad) -> None:
    """A subspace key.json's calibration of its cluster: [mean, std], finite numbers, std > 0, and its cluster's
    direction, a list of finite numbers (`bad(why)` the error to raise)."""
    import math

    def numbers(c) -> bool:
        return isinstance(c, list) and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                                           for v in c)

    c = key.get("calibration", {}).get(str(cluster)) if isinstance(key.get("calibration"), dict) else None
    if not (numbers(c) and len(c) == 2) or c[1] <= 0:
        raise bad(f"a subspace key holds its cluster's calibration (\"calibration\": {{\"{cluster}\": "
                  f"[mean, std > 0]}}), got {c!r}")
    v = key.get("directions", {}).get(str(cluster)) if isinstance(key.get("directions"), dict) else None
    if not (numbers(v) and v):
        raise bad(f"a subspace key holds its cluster's direction (\"directions\": {{\"{cluster}\": [numbers]}}); "
                  "keys written before molrmog chose it on the calibration images lack it: embed again")


def subspace_scores(expert, vae, images: Tensor, key: dict, cluster: int) -> Tensor:
    """`watermark detect`: the score |s - m0| / sd of images of `cluster` under a checked subspace key.json."""
    m0, sd = key["calibration"][str(cluster)]
    w = key_directions(torch.tensor(key["directions"][str(cluster)]), expert)
    return (statistic(expert, vae, images, w) - m0).abs() / sd
