"""Claim 1: the MoE-MoG score's estimation error decays like n^{-1/2}, (almost) independent of D."""

from __future__ import annotations

import time

import torch

from molrmog.core import metrics
from molrmog.core.losses import sample_times
from molrmog.experiments.common import (
    embedded_molrmog,
    loglog_slope,
    out_dir,
    pyplot,
    save_figure,
    write_csv,
    write_json,
)
from molrmog.models.experts import MLPScore, MoEScore
from molrmog.training.executors import Task, run_tasks
from molrmog.training.train import train_score

PRESETS = {
    "quick": dict(Ds=[32, 128], ns=[64, 256, 1024], K=2, d=4, modes=2, steps=150, mlp_steps=300,
                  mlp_Ds=[32], eval_n=2000, seeds=1),
    "default": dict(Ds=[64, 256, 1024], ns=[100, 300, 1000, 3000], K=2, d=4, modes=2, steps=400,
                    mlp_steps=1000, mlp_Ds=[64, 1024], eval_n=4000, seeds=1),
}
T_EVAL_MAX = 3.0  # beyond this the noised law is almost the prior for every model


def score_error(model, truth, n: int, seed: int) -> float:
    """E_t E_x gamma_t^2 ||s_theta(x_t, t) - grad log p_t(x_t)||^2, t ~ U[t_min, 3], fresh samples."""
    g = torch.Generator().manual_seed(seed)
    x0, _ = truth.sample(n, g)
    t = sample_times(truth.schedule, n, "uniform", g, t_max=T_EVAL_MAX)
    xt = truth.noise(x0, t, g)
    with torch.no_grad():
        return metrics.score_error(model, truth.score, xt, t, truth.schedule.gamma(t))


def estimation_point(kind: str, D: int, n: int, s: int, cfg: dict, seed: int) -> dict:
    """One point of the sweep (a task): train `kind` on n samples in dimension D, measure its error."""
    truth = embedded_molrmog(D, cfg["K"], cfg["d"], cfg["modes"], seed=seed)
    x, _ = truth.sample(n, torch.Generator().manual_seed(seed + 100 * s + n))
    t0 = time.perf_counter()
    if kind == "moe-mog":
        model = MoEScore(D, cfg["K"], cfg["d"], cfg["modes"], seed=seed + s).double()
        model.init_from_data(x, seed=seed + s, restarts=2)
        train_score(model, x, steps=cfg["steps"], batch_size=min(512, n), lr=1e-3, seed=seed + s,
                    t_max=T_EVAL_MAX, progress=False)
    else:
        model = MLPScore(D, hidden=256, depth=3, seed=seed + s, data_std=float(x.std())).double()
        train_score(model, x, steps=cfg["mlp_steps"], batch_size=min(256, n), lr=1e-3, seed=seed + s,
                    t_max=T_EVAL_MAX, progress=False)
    err = score_error(model, truth, cfg["eval_n"], seed=10_000 + seed)
    return {"model": kind, "D": D, "n": n, "seed": s, "score_error": err,
            "train_seconds": round(time.perf_counter() - t0, 3), "parameters": model.num_parameters()}


def run_estimation(out, preset: str = "quick", seed: int = 0, progress: bool = True, executor=None,
                   **overrides) -> dict:
    cfg = {**PRESETS[preset], **overrides}
    out = out_dir(out)
    jobs = [(kind, D, n, s) for kind, Ds in (("moe-mog", cfg["Ds"]), ("mlp", cfg["mlp_Ds"]))
            for D in Ds for n in cfg["ns"] for s in range(cfg["seeds"])]
    res = run_tasks([Task(f"{kind}/D={D}/n={n}/seed={s}", estimation_point, (kind, D, n, s, cfg, seed))
                     for kind, D, n, s in jobs], executor, progress=progress, desc="estimation")
    rows = [res[f"{kind}/D={D}/n={n}/seed={s}"] for kind, D, n, s in jobs]
    write_csv(out / "estimation.csv", rows)
    slopes = {}
    for kind in ("moe-mog", "mlp"):
        for D in sorted({r["D"] for r in rows if r["model"] == kind}):
            pts = [(r["n"], r["score_error"]) for r in rows if r["model"] == kind and r["D"] == D]
            slopes[f"{kind}/D={D}"] = loglog_slope(*zip(*pts, strict=True))
    result = {"preset": preset, "config": cfg, "slopes": slopes,
              "expected": "slope near -1/2 or steeper for moe-mog, curves for different D close together"}
    write_json(out / "estimation.json", result)
    _plot(out / "estimation.png", rows, slopes)
    return result


def _plot(path, rows, slopes) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for kind, style in (("moe-mog", "-o"), ("mlp", "--s")):
        for D in sorted({r["D"] for r in rows if r["model"] == kind}):
            pts = sorted((r["n"], r["score_error"]) for r in rows if r["model"] == kind and r["D"] == D)
            ns = sorted({p[0] for p in pts})
            errs = [sum(e for m, e in pts if m == n) / sum(1 for m, _ in pts if m == n) for n in ns]
            ax.loglog(ns, errs, style, label=f"{kind}, D={D} (slope {slopes[f'{kind}/D={D}']:.2f})")
    ns = sorted({r["n"] for r in rows})
    ref = [r["score_error"] for r in rows if r["model"] == "moe-mog" and r["n"] == ns[0]]
    if ref:
        c = sum(ref) / len(ref)
        ax.loglog(ns, [c * (n / ns[0]) ** -0.5 for n in ns], ":", color="gray", label="n^-1/2")
    ax.set_xlabel("training samples n")
    ax.set_ylabel("score error E gamma^2 ||s - grad log p_t||^2")
    ax.set_title("estimation error vs samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
