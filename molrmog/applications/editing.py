"""LOCO-style editing along the singular vectors of the denoiser's Jacobian (issue 15.2).

Chen, Zhang et al., "Exploring Low-Dimensional Subspaces in Diffusion Models for Controllable Image Editing",
NeurIPS 2024 (official code: ChicyChen/LOCO-Edit, src/modules/edit.py). At an edit time t the posterior-mean
predictor x0_hat(x_t) is locally linear and low-rank; its top right singular vectors are semantic edit
directions. Here the diffusion runs in a cluster's standardised VAE latent u, so the map that matters is

    f(u_t) = decode(unstandardise(x0_hat(u_t)))              (pixels x d),

whose Jacobian is J = J_decoder . diag(scale) . J_denoiser. For MoG and Gaussian experts J_denoiser is the
closed form of `mixture.denoiser_jacobian`; for other kinds it comes from forward-mode autodiff
(`torch.func.jvp`). The latent is small, so J (pixels x d) is formed exactly. With a mask (a rectangle of
pixels), the directions maximise the change inside it among the latent directions in the (numerical) null space
of the rows outside -- the paper's nullspace projection, solved exactly -- so the edit stays local.

An edit: invert the image's latent with the probability-flow ODE to t, add lambda gamma_t sqrt(d) v (lambda in
units of the noise's norm at t), run the ODE back, decode.
Times are fractions of the editing horizon, the time at which the noise std equals the standardised data std
(sigma_t = 1: beyond it the noise dominates); the default 0.6 of it is t ~ 0.21 on the VP schedule.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from molrmog.core import mixture as mx
from molrmog.core.errors import MolrmogError
from molrmog.core.schedules import Schedule

__all__ = ["edit_time", "ode", "denoiser_jacobian_fn", "latent_jacobian", "top_directions", "apply_edit",
           "edit_metrics", "edit_run"]


def edit_time(schedule: Schedule, fraction: float) -> float:
    """fraction x the time at which sigma_t = 1 (clipped to the schedule's range)."""
    if not 0 < fraction <= 1:
        raise MolrmogError(f"the edit time is a fraction of the horizon in (0, 1], got {fraction}")
    horizon = float(schedule.t_of_sigma(torch.tensor(1.0, dtype=torch.float64)))
    return min(max(fraction * horizon, schedule.t_min * 1.001), schedule.t_max)


def ode(score, x: Tensor, t_from: float, t_to: float, schedule: Schedule, steps: int = 30, *,
        differentiable: bool = False) -> Tensor:
    """The probability-flow ODE from t_from to t_to (either direction; Heun, uniform in log t): deterministic, so
    inverting and re-running it returns the start up to the discretisation. `differentiable`: keep the graph, so
    that a loss on the end point has a gradient in the start (and the score's parameters, where they need one)."""
    ts = torch.exp(torch.linspace(math.log(t_from), math.log(t_to), steps + 1, dtype=torch.float64))
    a, b = schedule.drift_coefficients(ts)
    a, b, t = a.tolist(), b.tolist(), ts.tolist()

    def drift(y, i):
        return a[i] * y + b[i] * score(y, ts[i])

    with torch.enable_grad() if differentiable else torch.no_grad():
        for i in range(steps):
            h = t[i + 1] - t[i]
            d = drift(x, i)
            x = x + 0.5 * h * (d + drift(x + h * d, i + 1))
    return x


def denoiser_jacobian_fn(expert, t: float):
    """(x0_hat(u), J(u) or None) of a latent expert at time t: J in closed form for mixture experts."""
    s, g = float(expert.schedule.s(torch.tensor(t, dtype=torch.float64))), \
        float(expert.schedule.gamma(torch.tensor(t, dtype=torch.float64)))

    def x0(u):
        return expert.denoise(u, torch.full((u.shape[0],), t, dtype=torch.float64))

    closed = None
    if hasattr(expert.net, "mixture_for"):
        def closed(u):  # (B, d, d)
            return mx.denoiser_jacobian(expert.net.mixture_for(u), u, s, g)
    return x0, closed


def latent_jacobian(expert, u: Tensor, t: float) -> Tensor:
    """d x0_hat / d u at each row of u (B, d): (B, d, d), in closed form for mixture experts, else by autograd
    (`evaluation.denoiser_jacobian`)."""
    _, closed = denoiser_jacobian_fn(expert, t)
    if closed is not None:
        return closed(u)
    from molrmog.evaluation.evaluate import denoiser_jacobian

    return denoiser_jacobian(expert, u, t)


def _pixel_map(expert, vae, t: float):
    """f(u) = decode(unstandardise(x0_hat(u))) for one latent u (d,) -> pixels (P,)."""
    x0, _ = denoiser_jacobian_fn(expert, t)

    def f(u):
        return torch.sigmoid(vae.decode(expert.unstandardise(x0(u[None])))).flatten()
    return f


def pixel_jacobian(expert, vae, u: Tensor, t: float) -> Tensor:
    """The Jacobian (P, d) of the pixel map f at one latent u (d,): J_dec diag(scale) J_den, with the closed-form
    J_den for mixture experts and forward-mode autodiff (one `jvp` per latent coordinate) otherwise. The latent is
    small (d = 32 for digits, 196 for Fashion-MNIST), so J is formed exactly and its SVD needs no iteration."""
    from torch.func import jvp

    x0, closed = denoiser_jacobian_fn(expert, t)
    u = u.detach()
    eye = torch.eye(u.shape[0], dtype=u.dtype)
    if closed is not None:
        Jden = closed(u[None])[0].detach()  # (d, d)
        z0 = expert.unstandardise(x0(u[None]))[0].detach()

        def dec(z):
            return torch.sigmoid(vae.decode(z[None])).flatten()
        Jdec = torch.stack([jvp(dec, (z0,), (e.to(z0.dtype),))[1] for e in eye], 1)  # (P, d)
        return (Jdec * expert.scale.flatten()[None].to(Jdec.dtype)) @ Jden.to(Jdec.dtype)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    f = _pixel_map(expert, vae, t)
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no forward-mode derivative
        return torch.stack([jvp(f, (u,), (e,))[1] for e in eye], 1).detach()


def top_directions(expert, vae, u: Tensor, t: float, k: int = 3, mask: Tensor | None = None,
                   null_tol: float = 0.3, rank_tol: float = 0.1) -> tuple[Tensor, Tensor]:
    """The top-k edit directions (d, k) at u (d,) and their gains (k,).

    Without a mask: the top right singular vectors of the pixel Jacobian J and its singular values. With `mask`
    (P,) bool: LOCO's nullspace projection, done exactly inside J's low-rank subspace. V_r spans the right singular
    vectors of J with singular values at least `rank_tol` x the largest (the directions x0_hat responds to; the
    rest it projects away, and moving along them only shifts mixture weights); N spans the directions of V_r whose
    gain outside the mask is at most `null_tol` x the largest there; the edit directions are the top right singular
    vectors of J_inside N, mapped back by N: the largest change inside the mask among the directions that leave the
    outside (nearly) unchanged. Fewer than k come back when the subspace holds fewer; at least one always does
    (when no direction passes `null_tol`, the one that changes the outside least -- its locality says how well)."""
    J = pixel_jacobian(expert, vae, u, t)
    _, S, Vh = torch.linalg.svd(J, full_matrices=False)
    if mask is None:
        return Vh[:k].T.contiguous(), S[:k]
    for name, tol in (("null_tol", null_tol), ("rank_tol", rank_tol)):
        if not 0 <= tol < 1:
            raise MolrmogError(f"{name} is a fraction of the largest singular value in [0, 1), got {tol}")
    Vr = Vh[S >= rank_tol * S[0]].T  # (d, r)
    _, S_out, Vh_out = torch.linalg.svd(J[~mask] @ Vr, full_matrices=True)
    S_out = torch.cat([S_out, S_out.new_zeros(Vr.shape[1] - S_out.numel())])
    keep = S_out <= null_tol * S_out[0]
    keep[-1] = True  # at least the direction of V_r that changes the outside least
    N = Vr @ Vh_out[keep].T  # (d, n)
    _, S_in, Vh_in = torch.linalg.svd(J[mask] @ N, full_matrices=False)
    k = min(k, N.shape[1])
    return (N @ Vh_in[:k].T).contiguous(), S_in[:k]


def noise_norm(expert, t: float) -> float:
    """gamma_t sqrt(d): the norm of the noise in u_t, the unit of the edit step lambda."""
    return float(expert.schedule.gamma(torch.tensor(t, dtype=torch.float64))) * math.sqrt(expert.shift.numel())


def apply_edit(expert, vae, u_t: Tensor, t: float, v: Tensor, lam: float, steps: int = 30) -> Tensor:
    """Decode the image reached from u_t + lam gamma_t sqrt(d) v (a unit v) by the ODE down to t_min: (C, H, W)."""
    u0 = ode(expert, (u_t + lam * noise_norm(expert, t) * v)[None], t, expert.schedule.t_min, expert.schedule, steps)
    with torch.no_grad():
        x0 = expert.denoise(u0, torch.tensor(expert.schedule.t_min, dtype=torch.float64))
        return torch.sigmoid(vae.decode(expert.unstandardise(x0)))[0]


def edit_metrics(expert, vae, u_t: Tensor, t: float, V: Tensor, lambdas, mask: Tensor | None, steps: int = 30,
                 others: list[Tensor] | None = None) -> dict:
    """What LOCO claims, measured: locality (mean |change| outside / inside the mask), linearity (R^2 of the change
    in x0_hat against lambda, a line through 0), composability (the edit along v1 + v2 against the sum of the two
    edits) and transferability (cosine of the |change| maps of the same direction on other images u_t)."""
    base = apply_edit(expert, vae, u_t, t, V[:, 0], 0.0, steps)
    f = _pixel_map(expert, vae, t)
    res = {"locality": [], "linearity_r2": [], "transfer_cosine": []}
    lam_max = max(abs(x) for x in lambdas)
    for j in range(V.shape[1]):
        v = V[:, j]
        change = (apply_edit(expert, vae, u_t, t, v, lam_max, steps) - base).abs().flatten()
        if mask is not None:
            m = mask.to(change.dtype)
            res["locality"].append(float((change * (1 - m)).sum() / (1 - m).sum() / ((change * m).sum() / m.sum())))
        with torch.no_grad():  # linearity of x0_hat in lambda: Delta(lambda) ~ lambda a, least squares over lambda
            f0, unit = f(u_t), noise_norm(expert, t)
            deltas = torch.stack([f(u_t + lam * unit * v) - f0 for lam in lambdas])
            lam = torch.tensor(lambdas, dtype=deltas.dtype)[:, None]
            a = (lam * deltas).sum(0) / (lam**2).sum().clamp_min(1e-12)
            res["linearity_r2"].append(float(1 - ((deltas - lam * a) ** 2).sum() / (deltas**2).sum().clamp_min(1e-12)))
        for other in others or []:
            base_o = apply_edit(expert, vae, other, t, v, 0.0, steps)
            change_o = (apply_edit(expert, vae, other, t, v, lam_max, steps) - base_o).abs().flatten()
            res["transfer_cosine"].append(float(torch.nn.functional.cosine_similarity(change, change_o, dim=0)))
    if V.shape[1] >= 2:
        v1, v2 = V[:, 0], V[:, 1]
        lam = lam_max / 2
        both = apply_edit(expert, vae, u_t, t, v1 + v2, lam, steps) - base
        sum_ = (apply_edit(expert, vae, u_t, t, v1, lam, steps) - base) + (apply_edit(expert, vae, u_t, t, v2, lam,
                                                                                            steps) - base)
        res["composability_relative_error"] = float((both - sum_).norm() / sum_.norm().clamp_min(1e-12))
    return res


def edit_run(run, *, kind: str | None = None, cluster: int = 0, image: int | None = None,
             seed: int = 0, fraction: float = 0.6, directions: int = 3, lambdas=(-0.2, -0.1, 0.0, 0.1, 0.2),
             mask: tuple[int, int, int, int] | None = None, null_tol: float = 0.3, held_out: int = 4, steps: int = 30,
             out: str | Path | None = None, device: str = "cpu") -> dict:
    """`molrmog edit`: directions and edits of one image (a training image of the cluster when `image` is given,
    else a generated one), the grid (rows: directions, columns: lambdas) and edit.json with the metrics, which are
    also measured on `held_out` test-split images of the same cluster (transferability: the first image's
    directions applied to them)."""
    from molrmog.core.outputs import save_grid, write_json
    from molrmog.pipeline.run import Run, encode_images

    r = Run.coerce(run, device)
    kind = kind or r.mixture_kind()
    r.check_kinds([kind])
    if not 0 <= cluster < r.K:
        raise MolrmogError(f"cluster must lie in 0..{r.K - 1}, got {cluster}", param="cluster")
    expert, vae, cfg = r.expert(kind, cluster), r.vae(cluster), r.cfg
    C, H, W = r.image_shape
    m = None
    if mask is not None:
        x0_, y0_, x1_, y1_ = mask
        if not (0 <= x0_ < x1_ <= W and 0 <= y0_ < y1_ <= H) or (x1_ - x0_) * (y1_ - y0_) == W * H:
            raise MolrmogError(f"mask x0,y0,x1,y1 must lie inside the {W}x{H} image with x0 < x1 and y0 < y1 "
                               f"and leave pixels outside it, got {mask}", param="mask")
        m2 = torch.zeros(C, H, W, dtype=torch.bool)
        m2[:, y0_:y1_, x0_:x1_] = True
        m = m2.flatten()
    t = edit_time(expert.schedule, fraction)
    sched = expert.schedule
    test = r.test
    if image is not None:
        imgs = r.cluster_images(cluster)
        if not 0 <= image < imgs.shape[0]:
            raise MolrmogError(f"image must lie in 0..{imgs.shape[0] - 1} (cluster {cluster}), got {image}",
                               param="image")
        u0 = expert.standardise(encode_images(vae, imgs[image:image + 1], device))
        u_t = ode(expert, u0, sched.t_min, t, sched, steps)[0]
    else:
        g = torch.Generator().manual_seed(seed)
        u_T = float(sched.gamma(torch.tensor(sched.t_max))) * torch.randn(1, expert.shift.numel(), generator=g)
        u_t = ode(expert, u_T, sched.t_max, t, sched, 60)[0]
    V, S = top_directions(expert, vae, u_t, t, directions, m, null_tol)
    rows = [apply_edit(expert, vae, u_t, t, V[:, j], lam, steps) for j in range(V.shape[1]) for lam in lambdas]
    out = Path(out or r.path / "edit")
    save_grid(out / "edit.png", torch.stack(rows), len(lambdas))
    others = []
    if test.labels is not None and cfg.clusters is None:
        pool = test.images[test.labels == cluster][:held_out]
        others = [ode(expert, expert.standardise(encode_images(vae, pool[i:i + 1], device)), sched.t_min, t, sched,
                      steps)[0] for i in range(pool.shape[0])]
    metrics = edit_metrics(expert, vae, u_t, t, V, list(lambdas), m, steps, others)
    held = [edit_metrics(expert, vae, o, t, top_directions(expert, vae, o, t, directions, m, null_tol)[0],
                         list(lambdas), m, steps) for o in others]
    summary = {k: (sum(v) / len(v) if v else None) for k, v in metrics.items() if isinstance(v, list)}
    res = {"run": str(r.path), "kind": kind, "cluster": cluster, "t": t, "fraction": fraction, "lambdas": list(lambdas),
           "mask": list(mask) if mask else None, "null_tol": null_tol, "singular_values": S.tolist(),
           "image": metrics, "summary": summary, "held_out": held,
           "held_out_summary": {k: _mean([h[k] for h in held if isinstance(h.get(k), list)]) for k in
                                ("locality", "linearity_r2")}}
    if m is not None:  # the reference: the same image's top directions without the nullspace projection
        V0 = top_directions(expert, vae, u_t, t, V.shape[1])[0]
        res["locality_without_projection"] = edit_metrics(expert, vae, u_t, t, V0, [max(map(abs, lambdas))], m,
                                                          steps)["locality"]
    write_json(out / "edit.json", res)
    return res


def _mean(lists) -> float | None:
    vals = [x for lst in lists for x in lst]
    return sum(vals) / len(vals) if vals else None
