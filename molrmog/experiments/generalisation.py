"""From memorisation to generalisation as the number of training samples N grows (issue 15.1).

A fixed-capacity model trained on N samples copies its training set for small N and generalises once N
exceeds a constant times the intrinsic dimension; two models trained on *disjoint* halves then produce
the same sample from the same noise (Kadkhodaie et al., ICLR 2024). For every N (log-spaced), kind and
half (two disjoint training sets S_1, S_2 of N samples each) one model is trained -- one task each -- and:

    memorisation   fraction of samples whose nearest training point is 3x closer than the second nearest
                   (Yoon et al. 2023; 1: copies, 0: new points), and the mean nearest-training-neighbour
                   cosine similarity;
    gl             the generalisation score at the similarity threshold (1 - fraction of near-copies);
    rp             reproducibility: the fraction of shared-noise sample pairs of the S_1 and S_2 models whose
                   (centred) cosine similarity exceeds the threshold, and their mean similarity;
    pf_distance    RMS distance of the S_1 model's probability-flow samples to the teacher's from the same
                   noise (synthetic: the exact score; images: the model trained on the whole cluster);
    score_error    (synthetic) E_t E_x gamma^2 ||s_theta - grad log p_t||^2 against the exact score.

Synthetic data: a MoLRG (K subspaces of dimension d in R^D: intrinsic dimension d), models `mixture` (a MoG
expert in R^D with `modes` modes of rank d: EM start + DSM) and `mlp` (the EDM-preconditioned MLP, the neural
counterpart). Images: one cluster of a trained run (its VAE latents), the headline and baseline latent kinds
(MoG and U-Net; the run's own kind options, smaller step counts), metrics in the featurizer's space. The
transition is the smallest N at which the memorisation fraction falls below 1/2; the theory's prediction is
N ~ d per subspace.
"""

from __future__ import annotations

import time

import torch

from molrmog.core import metrics as M
from molrmog.core.distributions import MoLRG
from molrmog.core.samplers import generate
from molrmog.core.schedules import make_grid
from molrmog.experiments.common import out_dir, pyplot, save_figure, write_csv, write_json
from molrmog.models.experts import MLPScore, MoGExpert
from molrmog.training.executors import Task, run_tasks
from molrmog.training.train import train_score

PRESETS = {
    "quick": dict(D=24, K=2, d=3, Ns=[2, 4, 8, 16, 32, 64, 128, 256], modes=16, steps=300, mlp_steps=400,
                  eval_n=400, threshold=0.95, image_dataset="digits", image_Ns=[8, 32, 64], image_steps=120,
                  image_baseline_steps=80, image_samples=64),
    "default": dict(D=48, K=2, d=4, Ns=[2, 4, 8, 16, 32, 64, 128, 256, 512, 1024], modes=32, steps=800,
                    mlp_steps=1500, eval_n=1000, threshold=0.95, image_dataset="fashion-mnist",
                    image_Ns=[16, 64, 256, 1024, 2900], image_steps=400, image_baseline_steps=300, image_samples=200),
}


def _truth(cfg: dict, seed: int) -> MoLRG:
    return MoLRG.random(cfg["D"], cfg["K"], cfg["d"], seed=seed, dtype=torch.float32)


def _halves(cfg: dict, N: int, seed: int):
    """Two disjoint training sets of N samples each (S_1, S_2)."""
    x, _ = _truth(cfg, seed).sample(2 * N, torch.Generator().manual_seed(seed + 17 * N))
    return x[:N], x[N:]


SYNTHETIC_MODELS = ("mixture", "mlp")  # a MoG score in R^D (EM start + DSM) and its neural counterpart


def _image_kinds() -> tuple[str, ...]:
    """The run's headline latent kind (MoG) and its baseline (U-Net), from the registry."""
    from molrmog.models.kinds import baseline_kinds, headline_kinds

    return headline_kinds()[:1] + baseline_kinds()[:1]


def _model(kind: str, cfg: dict, D: int, data_std: float, seed: int):
    if kind == "mixture":
        return MoGExpert(D, n=cfg["modes"], r=cfg["d"], seed=seed)
    return MLPScore(D, hidden=256, depth=3, data_std=data_std, seed=seed, precondition=True)


def synthetic_task(kind: str, N: int, half: int, cfg: dict, seed: int) -> dict:
    """Train one model on one half (a task); returns its weights."""
    x = _halves(cfg, N, seed)[half]
    std = float(x.std()) if N > 1 else 1.0
    model = _model(kind, cfg, cfg["D"], std, seed + half)
    if kind == "mixture":
        model.init_from_data(x, seed=seed)
        steps, lr = cfg["steps"], 1e-2
    else:
        steps, lr = cfg["mlp_steps"], 1e-3
    t0 = time.perf_counter()
    train_score(model, x, steps=steps, batch_size=min(256, 8 * N), lr=lr, seed=seed + half, ema_decay=0.99,
                progress=False)
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "data_std": std,
            "seconds": time.perf_counter() - t0}


def memorisation(samples: torch.Tensor, train: torch.Tensor) -> dict:
    """Fraction of samples whose nearest training point is at least 3x closer than the second nearest (Yoon et
    al. 2023), and the mean nearest-neighbour cosine similarity (centred at the training mean)."""
    d = torch.cdist(samples.double(), train.double())
    if train.shape[0] >= 2:
        two = d.topk(2, largest=False).values
        frac = float((two[:, 0] < two[:, 1] / 3).double().mean())
    else:
        frac = 1.0
    center = train.mean(0) if train.shape[0] > 1 else torch.zeros_like(train[0])
    sim = M.cosine_similarity(samples, train, center).max(1).values
    return {"memorisation": frac, "nn_similarity": float(sim.mean())}


def _sample(model, n: int, D: int, schedule, seed: int, steps: int = 40) -> torch.Tensor:
    ts = make_grid(schedule, steps, "karras")
    with torch.no_grad():
        return generate(model, n, D, schedule, ts, "heun", generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float32)


def transition(rows: list, kind: str) -> float | None:
    """The smallest N whose memorisation fraction is below 1/2 (with every larger N below it too); None when no
    N of the sweep memorises (the transition lies below it) or the largest still does (above it)."""
    pts = sorted((r["N"], r["memorisation"]) for r in rows if r["kind"] == kind)
    if not pts or pts[0][1] < 0.5:
        return None
    for i, (n, _) in enumerate(pts):
        if all(m < 0.5 for _, m in pts[i:]):
            return n
    return None


def run_generalisation(out, preset: str = "quick", seed: int = 0, progress: bool = True, executor=None,
                       run: str | None = None, **overrides) -> dict:
    """The synthetic sweep (always) and, with `run` (a trained run: its VAEs and a cluster's latents), the image
    sweep; writes generalisation.{csv,json,png}."""
    cfg = {**PRESETS[preset], **overrides}
    latents = _cluster_latents(run, 0) if run is not None else None  # the run is checked before any work
    out = out_dir(out)
    truth = _truth(cfg, seed)
    kinds = SYNTHETIC_MODELS
    tasks = [Task(f"{kind}/N={N}/half={h}", synthetic_task, (kind, N, h, cfg, seed))
             for kind in kinds for N in cfg["Ns"] for h in (0, 1)]
    trained = run_tasks(tasks, executor, progress=progress, desc="generalisation")
    n_eval, thr = cfg["eval_n"], cfg["threshold"]
    noise_seed = seed + 999
    teacher = _sample(truth.score, n_eval, cfg["D"], truth.schedule, noise_seed)  # the exact score's samples
    rows = []
    for kind in kinds:
        for N in cfg["Ns"]:
            S = _halves(cfg, N, seed)
            models, outs = [], []
            for h in (0, 1):
                res = trained[f"{kind}/N={N}/half={h}"]
                m = _model(kind, cfg, cfg["D"], res["data_std"], seed + h)
                m.load_state_dict(res["state"])
                models.append(m.eval())
                outs.append(_sample(m, n_eval, cfg["D"], m.schedule, noise_seed))
            mem = memorisation(outs[0], S[0])
            rp = M.reproducibility_score(outs[0], outs[1], thr, truth.sample(4000, torch.Generator().manual_seed(
                1))[0].mean(0))
            g = torch.Generator().manual_seed(seed + 5)
            x0, _ = truth.sample(n_eval, g)
            t = torch.rand(n_eval, generator=g, dtype=torch.float64) * 2.999 + 1e-3
            xt = truth.noise(x0, t, g)
            with torch.no_grad():
                err = M.score_error(models[0], truth.score, xt, t, truth.schedule.gamma(t))
            gl = M.generalisation_score(outs[0], S[0], thr, S[0].mean(0) if N > 1 else None)
            rows.append({"kind": kind, "N": N, "N_over_d": N / cfg["d"], **mem, "gl": gl["score"],
                         "rp": rp["score"], "rp_similarity": rp["mean_similarity"],
                         "pf_distance": M.pf_distance(outs[0], teacher), "score_error": err,
                         "train_seconds": trained[f"{kind}/N={N}/half=0"]["seconds"]})
    result = {"preset": preset, "config": cfg, "intrinsic_dimension": cfg["d"], "rows": rows,
              "transition": {k: transition(rows, k) for k in kinds}}
    result["c"] = {k: (v / cfg["d"] if v else None) for k, v in result["transition"].items()}
    if run is not None:
        result["images"] = image_sweep(run, cfg, seed, progress, executor, latents=latents)
        result["transition_images"] = {k: transition(result["images"]["rows"], k) for k in _image_kinds()}
    write_csv(out / "generalisation.csv", rows + (result.get("images", {}).get("rows", [])))
    write_json(out / "generalisation.json", result)
    _plot(out / "generalisation.png", result)
    return result


def _plot(path, result) -> None:
    plt = pyplot()
    sets = [("synthetic MoLRG (x = N / d)", result["rows"], "N_over_d")]
    if "images" in result:
        sets.append((f"{result['images']['dataset']} cluster {result['images']['cluster']} (x = N)",
                     result["images"]["rows"], "N"))
    fig, axes = plt.subplots(len(sets), 3, figsize=(13, 3.8 * len(sets)), squeeze=False)
    for row_axes, (title, rows, xkey) in zip(axes, sets, strict=True):
        kinds = sorted({r["kind"] for r in rows})
        for ax, key, label in zip(row_axes, ("memorisation", "rp", "pf_distance"),
                                  ("memorised fraction", "reproducibility (disjoint halves)", "PF distance to teacher"),
                                  strict=True):
            for kind in kinds:
                pts = sorted((r[xkey], r[key]) for r in rows if r["kind"] == kind)
                ax.semilogx(*zip(*pts, strict=True), "-o", ms=3, label=kind)
            ax.set_title(f"{title}: {label}", fontsize=8)
            ax.set_xlabel(xkey.replace("_", " "))
            if key in ("memorisation", "rp"):
                ax.set_ylim(-0.05, 1.05)
        for kind in kinds:
            n = transition(rows, kind)
            if n is not None:
                x = n / result["intrinsic_dimension"] if xkey == "N_over_d" else n
                row_axes[0].axvline(x, ls=":", lw=1, color="gray")
        row_axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)



# --- images: one cluster of a trained run -----------------------------------------------------------------


def _cluster_latents(run: str, cluster: int):
    """(run, VAE, images, latents) of one cluster; also checks that a featurizer can grade the run's images."""
    from molrmog.evaluation.featurizer import check_featurizer
    from molrmog.pipeline.run import Run

    r = Run.load(run, device="cpu")  # the process's Run of this path: its data and VAE are read once
    check_featurizer(r.cfg.dataset, None, labelled=r.data.labels is not None)
    return r, r.vae(cluster), r.cluster_images(cluster), r.latents(cluster)


def image_task(run: str, cluster: int, kind: str, N: int, half: int, cfg: dict, seed: int) -> dict:
    """Train one latent expert of `kind` on N latents of the cluster (half 0 or 1; N = -1: all of them)."""
    from molrmog.core.schedules import get_schedule
    from molrmog.models.kinds import LatentExpert, get_kind

    r, _, _, z = _cluster_latents(run, cluster)
    perm = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))
    idx = perm if N < 0 else perm[half * N:(half + 1) * N]
    shift, scale = z.mean(0), z.std(0).clamp_min(1e-3)  # the whole cluster's standardisation, for every model
    u = (z[idx] - shift) / scale
    entry = get_kind(kind)
    opts = r.cfg.options_of(kind)
    if getattr(opts, "modes", None) is not None:  # fewer modes than points (a fixed capacity below N)
        opts = type(opts)(**{**opts.__dict__, "modes": min(int(opts.modes) if opts.modes != "auto" else 10,
                                                            max(1, u.shape[0] // 2))})
    model_seed = seed + 7 * half + (0 if N >= 0 else 3)
    e = LatentExpert.wrap(kind, r.cfg.latent, entry.build(r.cfg.latent, opts, get_schedule(r.cfg.schedule).config(),
                                                          model_seed))
    e.shift.copy_(shift)
    e.scale.copy_(scale)
    if entry.init_from_data is not None and u.shape[0] >= 2:
        entry.init_from_data(e.net, u, opts, model_seed)
    steps = cfg["image_baseline_steps"] if get_kind(kind).baseline else cfg["image_steps"]
    train_score(e, u, steps=steps, batch_size=min(opts.batch, max(8, 4 * u.shape[0])), lr=opts.lr, seed=model_seed,
                ema_decay=opts.ema_decay, lr_schedule=opts.lr_schedule, progress=False)
    return {"config": dict(e.config), "state": {k: v.clone() for k, v in e.state_dict().items()}}


def image_sweep(run: str, cfg: dict, seed: int, progress: bool, executor, cluster: int = 0, latents=None) -> dict:
    from molrmog.evaluation.featurizer import get_featurizer
    from molrmog.models.kinds import LatentExpert

    r, vae, imgs, z = latents or _cluster_latents(run, cluster)
    Ns = [n for n in cfg["image_Ns"] if 2 * n <= z.shape[0]]
    kinds = _image_kinds()
    tasks = [Task(f"{k}/N={n}/half={h}", image_task, (run, cluster, k, n, h, cfg, seed)) for k in kinds for n in Ns
             for h in (0, 1)] + [Task(f"{k}/teacher", image_task, (run, cluster, k, -1, 0, cfg, seed)) for k in kinds]
    trained = run_tasks(tasks, executor, progress=progress, desc="generalisation (images)")
    feat = get_featurizer(r.cfg.dataset, None, "cpu", progress=progress, size=r.cfg.size, channels=r.cfg.channels,
                          data_dir=r.cfg.data_dir)
    perm = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))

    def model(name):
        res = trained[name]
        e = LatentExpert.from_config({k: v for k, v in res["config"].items() if not k.startswith("_")})
        e.load_state_dict(res["state"])
        return e.eval()

    def images(e):
        u = _sample(e, cfg["image_samples"], e.shift.numel(), e.schedule, seed + 999, steps=30)
        with torch.no_grad():
            return torch.sigmoid(vae.decode(e.unstandardise(u)))

    rows = []
    for kind in kinds:
        teacher_f = feat.embed(images(model(f"{kind}/teacher")))[0]
        for n in Ns:
            out = [images(model(f"{kind}/N={n}/half={h}")) for h in (0, 1)]
            f = [feat.embed(o)[0] for o in out]
            train_f = feat.embed(imgs[perm[:n]])[0]
            center = feat.embed(imgs)[0].mean(0)
            mem = memorisation(f[0], train_f)
            rp = M.reproducibility_score(f[0], f[1], 0.6, center)
            rows.append({"kind": kind, "N": n, **mem, "gl": M.generalisation_score(f[0], train_f, 0.6, center)["score"],
                         "rp": rp["score"], "rp_similarity": rp["mean_similarity"],
                         "pf_distance": M.pf_distance(f[0], teacher_f)})
    return {"dataset": r.cfg.dataset, "cluster": cluster, "cluster_size": int(z.shape[0]), "rows": rows,
            "threshold_features": 0.6}
