"""Claim 2: near the truth the DSM objective is locally strongly convex, so gradient descent
converges linearly. The analysed case: two symmetric modes mu_1 = -mu_2 with the same rank-1
covariance, well separated. theta = (mu_1, u_1, mu_2, u_2)."""

from __future__ import annotations

import math

import torch

from molrmog.core import mixture as mx
from molrmog.core.distributions import GaussianMixture
from molrmog.core.losses import sample_times
from molrmog.experiments.common import out_dir, pyplot, save_figure, write_csv, write_json
from molrmog.training.executors import Task, run_tasks

PRESETS = {
    "quick": dict(d=6, separation=4.0, N=4000, steps=150, distances=[0.05, 0.2, 0.5], t_max=2.0),
    "default": dict(d=10, separation=4.0, N=40000, steps=600, distances=[0.02, 0.1, 0.3, 0.6], t_max=2.0),
}


def symmetric_truth(d: int, separation: float, seed: int) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    mu = separation / 2 * mu / mu.norm()  # ||mu_1 - mu_2|| = separation
    u = torch.randn(d, 1, generator=g, dtype=torch.float64)
    u = u / u.norm()
    return GaussianMixture(torch.stack([mu, -mu]), torch.stack([u, u]))


def make_objective(truth: GaussianMixture, N: int, t_max: float, seed: int):
    """theta (4d,) -> large-sample DSM loss with fixed draws (x0, t, eps): a deterministic function."""
    g = torch.Generator().manual_seed(seed)
    sched = truth.schedule
    x0, _ = truth.sample(N, g)
    t = sample_times(sched, N, "uniform", g, t_max=t_max)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    s, gam = sched.s(t), sched.gamma(t)
    xt = s[:, None] * x0 + gam[:, None] * eps
    d = truth.D

    def loss(theta: torch.Tensor) -> torch.Tensor:
        mu, U = unpack(theta, d)
        mix = mx.Mixture(torch.zeros(1, dtype=theta.dtype), None,
                         torch.full((1, 2), math.log(0.5), dtype=theta.dtype), mu[None], U[None])
        return ((gam[:, None] * mx.score(mix, xt, s, gam) + eps) ** 2).sum(1).mean() / d

    return loss


def pack(mu: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """theta = (mu_1, u_1, mu_2, u_2)."""
    return torch.cat([torch.cat([mu[l], U[l, :, 0]]) for l in range(2)])


def unpack(theta: torch.Tensor, d: int):
    th = theta.view(2, 2 * d)
    return th[:, :d], th[:, d:, None]


def gd_run(cfg: dict, seed: int, theta_hat: torch.Tensor, direction: torch.Tensor, rho: float, lr: float,
           floor: float) -> dict:
    """Gradient descent from theta_hat + rho ||theta*|| direction (a task); distances and the rate."""
    truth = symmetric_truth(cfg["d"], cfg["separation"], seed)
    loss = make_objective(truth, cfg["N"], cfg["t_max"], seed + 1)
    theta_true = pack(truth.mixture.mu[0], truth.mixture.U[0])
    theta = (theta_hat + rho * theta_true.norm() * direction / direction.norm()).requires_grad_(True)
    dists, rows = [], []
    for k in range(cfg["steps"] + 1):
        dist = (theta.detach() - theta_hat).norm().item()
        dists.append(dist)
        rows.append({"init_distance": rho, "step": k, "distance": dist, "loss": None})
        (gr,) = torch.autograd.grad(loss(theta), theta)
        with torch.no_grad():
            theta -= lr * gr
    # rate: geometric mean ratio over the steps before the distance reaches the accuracy of
    # theta_hat itself (about ||grad L(theta_hat)|| / lambda_min) or numerical precision
    good = [i for i, v in enumerate(dists) if v > floor]
    last = max(good[-1], 1)
    return {"rows": rows, "rate": (dists[last] / dists[0]) ** (1 / last)}


def run_convergence(out, preset: str = "quick", seed: int = 0, progress: bool = True, executor=None,
                    **overrides) -> dict:
    cfg = {**PRESETS[preset], **overrides}
    out = out_dir(out)
    truth = symmetric_truth(cfg["d"], cfg["separation"], seed)
    loss = make_objective(truth, cfg["N"], cfg["t_max"], seed + 1)
    theta_true = pack(truth.mixture.mu[0], truth.mixture.U[0])

    # the minimiser of this (fixed-sample) objective, found from the truth with L-BFGS
    theta_hat = theta_true.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta_hat], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        v = loss(theta_hat)
        v.backward()
        return v

    opt.step(closure)
    theta_hat = theta_hat.detach()
    grad_norm = torch.autograd.functional.jacobian(loss, theta_hat).norm().item()

    H = torch.autograd.functional.hessian(loss, theta_hat)
    H = 0.5 * (H + H.T)
    eig = torch.linalg.eigvalsh(H)
    lr = 1.0 / eig.max().item()
    predicted = 1 - eig.min().item() / eig.max().item()

    g = torch.Generator().manual_seed(seed + 2)
    directions = [torch.randn(theta_hat.shape, generator=g, dtype=torch.float64) for _ in cfg["distances"]]
    floor = max(1e-10 * theta_true.norm().item(), 100 * grad_norm / eig.min().item())
    res = run_tasks([Task(f"distance={rho}", gd_run, (cfg, seed, theta_hat, direction, rho, lr, floor))
                     for rho, direction in zip(cfg["distances"], directions, strict=True)],
                    executor, progress=progress, desc="convergence")
    rows, rates = [], {}
    for rho in cfg["distances"]:
        rows += res[f"distance={rho}"]["rows"]
        rates[str(rho)] = res[f"distance={rho}"]["rate"]
    write_csv(out / "convergence.csv", rows)
    result = {
        "preset": preset, "config": cfg,
        "rates": rates, "max_rate": max(rates.values()), "predicted_rate_1_minus_lmin_over_lmax": predicted,
        "learning_rate": lr, "hessian_eigenvalues": eig.tolist(), "min_eigenvalue": eig.min().item(),
        "gradient_norm_at_minimiser": grad_norm,
        "distance_minimiser_to_truth": (theta_hat - theta_true).norm().item(),
        "expected": "straight lines on the log plot (rate < 1), all Hessian eigenvalues > 0",
    }
    write_json(out / "convergence.json", result)
    _plot(out, rows, cfg["distances"], H, cfg["d"], rates)
    return result


def _plot(out, rows, distances, H, d, rates) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for rho in distances:
        pts = [(r["step"], r["distance"]) for r in rows if r["init_distance"] == rho]
        ax.semilogy(*zip(*pts, strict=True), label=f"start {rho} x ||theta*|| (rate {rates[str(rho)]:.3f})")
    ax.set_xlabel("gradient-descent step")
    ax.set_ylabel("||theta_k - theta_hat||")
    ax.set_title("GD on the DSM loss: linear convergence")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "convergence.png", dpi=120)

    fig, ax = plt.subplots(figsize=(5.6, 5))
    im = ax.imshow(H.abs().numpy(), cmap="viridis")
    for b in (d, 2 * d, 3 * d):
        ax.axhline(b - 0.5, color="w", lw=0.8)
        ax.axvline(b - 0.5, color="w", lw=0.8)
    ax.set_title("|Hessian| at the minimiser\n(mu_1, u_1 | mu_2, u_2)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, out / "hessian.png", dpi=120)
