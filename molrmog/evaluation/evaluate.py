"""Evaluation of a trained run: `molrmog evaluate RUN` and `molrmog analyze jacobian RUN`.

Everything is measured in the feature space of the dataset's own `Featurizer` (no downloads):
FID / KID / precision / recall against the training images, class score of class-conditional
samples, generalisation score against the training images, reproducibility score and
probability-flow distance between every pair of expert kinds sampled from shared noise, and
the same numbers for the **memorisation baseline** -- per cluster, the optimal denoiser of the
empirical distribution of that cluster's training latents (`GaussianMixture.empirical`, the
same closed-form mixture code with rank-0 components). The held-out test split is evaluated
alongside as the floor every model is compared with.

Cosine similarities are taken after subtracting the mean training feature: the featurizer's
features follow a ReLU, so raw cosines are all positive and crowd near 1.
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from molrmog.core import metrics as M
from molrmog.core.distributions import GaussianMixture
from molrmog.core.errors import MolrmogError
from molrmog.core.outputs import pyplot, save_figure, save_grid, write_csv, write_json, write_text
from molrmog.evaluation.featurizer import get_featurizer
from molrmog.models.kinds import LatentExpert
from molrmog.pipeline.run import Run

__all__ = ["MemorisationExpert", "memorisation_experts", "evaluate_run", "jacobian_spectra", "denoiser_jacobian",
           "numerical_rank", "few_step_images", "reference_features", "image_scores", "sample_images", "roundtrip",
           "median_of_draws", "draws_note", "fid_cell"]

MEMORISE = "memorise"
log = logging.getLogger(__name__)


class MemorisationExpert(nn.Module):
    """The memorisation baseline of one cluster: the exact score of the empirical distribution of the
    cluster's standardised training latents, with the trained expert's standardisation and schedule."""

    def __init__(self, expert: LatentExpert, z: Tensor):
        super().__init__()
        self.register_buffer("shift", expert.shift.detach().clone())
        self.register_buffer("scale", expert.scale.detach().clone())
        self.schedule = expert.schedule
        u = ((z.flatten(1).to(self.shift.device) - self.shift) / self.scale).float()
        self.dist = GaussianMixture.empirical(u.cpu(), schedule=expert.schedule, dtype=torch.float32)

    def standardise(self, z: Tensor) -> Tensor:
        return (z.flatten(1) - self.shift) / self.scale

    def unstandardise(self, u: Tensor) -> Tensor:
        return u * self.scale + self.shift

    def forward(self, u: Tensor, t) -> Tensor:
        return self.dist.score(u, t)

    def denoise(self, u: Tensor, t) -> Tensor:
        return self.dist.denoise(u, t)

    def num_parameters(self) -> int:
        return 0


def _denoise(model, u: Tensor, t: float) -> Tensor:
    if isinstance(model, MemorisationExpert):
        return model.denoise(u, t)
    return model.denoise(u, torch.full((u.shape[0],), t, dtype=u.dtype, device=u.device))


def memorisation_experts(run: Run, kind: str) -> list[MemorisationExpert]:
    """The memorisation baseline of every cluster, with the standardisation and schedule of `kind`'s experts."""
    return [MemorisationExpert(run.expert(kind, k), run.latents(k)).to(run.device) for k in range(run.K)]


@torch.no_grad()
def sample_images(run: Run, kind: str, per_cluster: int, sampler: str, steps: int, seed: int,
                  progress: bool = False, experts: list | None = None) -> tuple[Tensor, Tensor, float]:
    """per_cluster images of every cluster (`Run.sample`; `experts` replaces the run's experts of `kind`); cluster
    k's noise comes from cluster_seed(seed, k) for every model, so two models see the same noise (the PF-ODE
    samplers are deterministic given it). Returns (images, clusters, seconds)."""
    t0 = time.perf_counter()
    out = [run.sample(per_cluster, kind, cluster=k, sampler=sampler, steps=steps, seed=seed, experts=experts,
                      progress=progress) for k in range(run.K)]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out]), time.perf_counter() - t0


def median_of_draws(rows: list[dict]) -> dict:
    """One row from the rows of several sets of samples (seeds seed, seed + 1, ...): the median of every float
    (FID, KID, precision, ..., images/s), the first set's value of anything else, and each set's FID in
    `fid_sets` with its range in `fid_min` / `fid_max`; one row is returned as it is. One set of 1,000 samples
    moves a FID by 1-2 on Fashion-MNIST; the median of five is what the README's ratios are read from."""
    if not rows:
        raise ValueError("median_of_draws needs at least one row")
    if len(rows) == 1:
        return rows[0]
    out = {}
    for key, v in rows[0].items():
        vals = [r.get(key) for r in rows]
        floats = isinstance(v, float) and all(isinstance(x, float) for x in vals)
        out[key] = float(statistics.median(vals)) if floats else v
    fids = [float(r["fid"]) for r in rows]
    out.update({"draws": len(rows), "fid_sets": fids, "fid_min": min(fids), "fid_max": max(fids)})
    return out


def check_draws(draws: int) -> None:
    if not isinstance(draws, int) or isinstance(draws, bool) or not 1 <= draws <= 100:
        raise MolrmogError(f"draws must be an integer in [1, 100], got {draws!r}", param="draws")


def reference_features(run: Run, feat, reference: int, seed: int, pr_points: int = 3000) -> dict:
    """Features of `reference` training images (a seeded subset) for FID / KID and of the first `pr_points`
    of them for precision / recall -- the same for every model of a run."""
    g = torch.Generator().manual_seed(seed)
    f_all, _ = feat.embed(run.images)
    idx = torch.randperm(f_all.shape[0], generator=g)[:reference]
    return {"f": f_all[idx], "f_pr": f_all[idx[:pr_points]], "generator": g, "f_all": f_all}


def image_scores(f: Tensor, ref: dict, k: int = 3, pr_points: int = 3000) -> dict:
    """FID, KID, precision and recall of sample features f against the reference features."""
    g = torch.Generator().manual_seed(0)
    pr_idx = torch.randperm(f.shape[0], generator=g)[:pr_points]
    return {"fid": M.fid(ref["f"], f), "kid": M.kid(ref["f"], f, seed=0)["mean"],
            **M.precision_recall(ref["f_pr"], f[pr_idx], k=k)}


def _row(f: Tensor, probs: Tensor, imgs: Tensor, intended: Tensor | None, ref: dict, opts: dict) -> dict:
    row = image_scores(f, ref, opts["k"], opts["pr_points"])
    if intended is not None:
        row["class_score"] = M.class_score(probs, intended)
        row["class_accuracy"] = float((probs.argmax(1) == intended).double().mean())
    for space, x, train in (("features", f, ref["f_recon"]), ("pixels", imgs.flatten(1), ref["x_recon"])):
        gen = M.generalisation_score(x, train, opts["threshold"], train.mean(0))
        row[f"generalisation_{space}"] = gen["score"]
        row[f"nn_similarity_{space}"] = gen["mean_nn_similarity"]
    return row


def evaluate_run(run: Run | str | Path, *, samples: int = 1000, reference: int = 10000, kinds=None,
                 memorisation: bool = True, seed: int = 0, threshold: float = 0.6, k: int = 3,
                 pr_points: int = 3000, cache=None, device: str = "cpu", progress: bool = True,
                 write: bool = True, draws: int = 1) -> dict:
    """All metrics of a run's expert kinds (and the memorisation baseline and the test split);
    writes evaluation.json, evaluation.md and evaluation_samples.png into the run when `write`.
    With `draws` > 1 every model is sampled `draws` times (seeds seed .. seed + draws - 1; the test split: as
    many random subsets) and each row is `median_of_draws` of the sets; the pairs and the image panel use the
    first set, which is the one draws=1 measures."""
    for name, v in (("samples", samples), ("reference", reference)):
        if v < 2:
            raise MolrmogError(f"{name} must be >= 2, got {v}", param=name)
    check_draws(draws)
    run = Run.coerce(run, device)
    cfg = run.cfg
    kinds = run.check_kinds(kinds)  # every artefact is read (and checked) before any work
    feat = get_featurizer(cfg.dataset, cache, device, progress=progress, size=cfg.size,
                          channels=cfg.channels, data_dir=cfg.data_dir)
    per_cluster = math.ceil(samples / run.K)
    ref = reference_features(run, feat, reference, seed, pr_points)
    g = ref["generator"]
    recon = run.reconstructions()
    ref.update({"x_recon": recon.flatten(1), "f_recon": feat.embed(recon)[0]})
    opts = {"pr_points": pr_points, "k": k, "threshold": threshold}

    result = {"run": str(run.path), "dataset": cfg.dataset, "featurizer_test_accuracy": float(feat.test_accuracy),
              "samples_per_model": per_cluster * run.K, "reference_images": int(ref["f"].shape[0]),
              "draws": draws, "seed": seed, "threshold": threshold, "models": {}, "pairs": {}}
    result["vae_reconstruction_fid"] = M.fid(ref["f"], ref["f_recon"])
    labels_sorted = torch.cat([torch.full((int((run.labels == k).sum()),), k) for k in range(run.K)])
    result["vae_reconstruction_fid_per_cluster"] = {  # (where a cluster has more images than features)
        str(k): M.fid(ref["f_all"][run.labels == k], ref["f_recon"][labels_sorted == k])
        for k in range(run.K) if int((run.labels == k).sum()) > ref["f"].shape[1]}
    test_rows = []
    for _ in range(draws):  # the first subset is the one draws=1 measures
        test_idx = torch.randperm(run.test.images.shape[0], generator=g)[: per_cluster * run.K]
        f_test, p_test = feat.embed(run.test.images[test_idx])
        test_labels = run.test.labels[test_idx] if run.test.labels is not None and run.class_conditional else None
        test_rows.append(_row(f_test, p_test, run.test.images[test_idx], test_labels, ref, opts))
    result["models"]["test split"] = median_of_draws(test_rows)

    feats, grids = {}, {}
    models = [(kd, None) for kd in kinds] + ([(MEMORISE, kinds[0])] if memorisation else [])
    for name, base in models:
        experts = memorisation_experts(run, base) if name == MEMORISE else None
        n_params = 0 if name == MEMORISE else sum(e.net.num_parameters() for e in run.experts(name))
        sets = []
        for d in range(draws):
            imgs, ks, secs = sample_images(run, base or name, per_cluster, cfg.sampler, cfg.sample_steps, seed + d,
                                           progress, experts)
            f, probs = feat.embed(imgs)
            row = _row(f, probs, imgs, ks if run.class_conditional else None, ref, opts)
            row.update({"parameters": n_params, "sample_images_per_second": imgs.shape[0] / secs})
            sets.append(row)
            log.info("evaluate %s (seed %d): %d samples in %.1f s, FID %.2f", name, seed + d, imgs.shape[0], secs,
                     row["fid"])
            if d == 0:
                feats[name] = (f, imgs.flatten(1))
                grids[name] = imgs.view(run.K, per_cluster, *imgs.shape[1:])[:, :min(per_cluster, 8)]
        result["models"][name] = median_of_draws(sets)
    for a, b in itertools.combinations(feats, 2):
        pair = {"pf_distance": M.pf_distance(feats[a][0], feats[b][0])}
        for i, space in enumerate(("features", "pixels")):
            center = (ref["f_recon"] if i == 0 else ref["x_recon"]).mean(0)
            rep = M.reproducibility_score(feats[a][i], feats[b][i], threshold, center)
            pair[f"reproducibility_{space}"] = rep["score"]
            pair[f"mean_similarity_{space}"] = rep["mean_similarity"]
        result["pairs"][f"{a} vs {b}"] = pair
    if write:
        out = run.path
        write_json(out / "evaluation.json", result)
        write_text(out / "evaluation.md", evaluation_md(result))
        panel = torch.cat([grids[n][:, :2].flatten(0, 1) for n in grids])
        save_grid(out / "evaluation_samples.png", panel, 2 * run.K)
    return result


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def draws_note(res: dict) -> str:
    """The tables' words for `draws` sets of samples ("" for one set)."""
    n = res.get("draws", 1)
    if n <= 1:
        return ""
    seed = res.get("seed", 0)
    return (f", {n} sets of them (seeds {seed}-{seed + n - 1}): each number is the median over the sets, the FID's "
            "range over the sets in brackets")


def fid_cell(row: dict, digits: int = 2) -> str:
    """A row's FID, with its range over the sets of samples when there were several."""
    if row.get("fid") is None:
        return "-"
    cell = f"{row['fid']:,.{digits}f}"
    if row.get("draws", 1) > 1:
        cell += f" ({row['fid_min']:.1f}-{row['fid_max']:.1f})"
    return cell


def evaluation_md(res: dict) -> str:
    cols = [("fid", "FID"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall"),
            ("class_score", "class score"), ("generalisation_features", "generalisation (features)"),
            ("nn_similarity_features", "NN sim. (features)"), ("generalisation_pixels", "generalisation (pixels)"),
            ("nn_similarity_pixels", "NN sim. (pixels)"), ("parameters", "parameters"),
            ("sample_images_per_second", "images/s")]
    lines = [f"# Evaluation of {res['run']} ({res['dataset']})", "",
             f"Featurizer test accuracy {res['featurizer_test_accuracy']:.4f}; {res['samples_per_model']} "
             f"samples per model{draws_note(res)}; FID / KID / precision / recall against "
             f"{res['reference_images']} training "
             f"images; similarities (cosine after centring) against the VAE reconstructions of all training "
             f"images, threshold {res['threshold']}.", "",
             "| model | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in res["models"].items():
        lines.append(f"| {name} | " + " | ".join(fid_cell(row, 3) if c[0] == "fid" else _fmt(row.get(c[0]))
                                                   for c in cols) + " |")
    if "vae_reconstruction_fid" in res:
        per = res.get("vae_reconstruction_fid_per_cluster", {})
        lines += ["", f"VAE reconstructions of the training images (decoded latent means): FID "
                  f"{res['vae_reconstruction_fid']:.2f}" + (" ; per cluster (against that cluster's images): " +
                                                             ", ".join(f"{k}: {v:.1f}" for k, v in per.items())
                                                             if per else "") + "."]
    lines += ["", "Pairs sampled from shared noise:", "",
              "| pair | reproducibility (features) | mean sim. (features) | reproducibility (pixels) "
              "| mean sim. (pixels) | PF distance (features) |", "|---|---:|---:|---:|---:|---:|"]
    for name, p in res["pairs"].items():
        lines.append(f"| {name} | {p['reproducibility_features']:.3f} | {p['mean_similarity_features']:.3f} | "
                     f"{p['reproducibility_pixels']:.3f} | {p['mean_similarity_pixels']:.3f} | "
                     f"{p['pf_distance']:.3f} |")
    return "\n".join(lines) + "\n"


# --- Jacobian of the denoiser -------------------------------------------------------------


def denoiser_jacobian(model, u: Tensor, t: float) -> Tensor:
    """d x0_hat / d u_t at each row of u (B, d): (B, d, d), by one batched backward pass per point."""
    B, d = u.shape
    eye = torch.eye(d, dtype=u.dtype, device=u.device)
    out = []
    for i in range(B):
        x = u[i].expand(d, d).clone().requires_grad_(True)
        y = _denoise(model, x, t)
        (grad,) = torch.autograd.grad((y * eye).sum(), x)  # row j: grad of y_j at the (same) point
        out.append(grad.detach())
    return torch.stack(out)


def numerical_rank(sv: Tensor, tol: float = 1e-2) -> int:
    """Number of singular values above tol * the largest."""
    return int((sv > tol * sv.max().clamp_min(1e-30)).sum())


def jacobian_spectra(run: Run | str | Path, *, kinds=None, ts=(0.02, 0.1, 0.3, 0.6, 1.0), cluster: int = 0,
                     points: int = 8, tol: float = 1e-2, memorisation: bool = True, seed: int = 0,
                     device: str = "cpu", out: str | Path | None = None) -> dict:
    """Singular values of the latent denoiser's Jacobian at u_t = s u_0 + gamma eps (u_0: training
    latents of `cluster`) for each expert kind and t; writes jacobian.csv/.json/.png into `out`."""
    run = Run.coerce(run, device)
    kinds = run.check_kinds(kinds)
    if not 0 <= cluster < run.K:
        raise MolrmogError(f"cluster must lie in 0..{run.K - 1}, got {cluster}", param="cluster")
    if points < 1:
        raise MolrmogError(f"points must be >= 1, got {points}", param="points")
    if not ts or any(not 0 < t <= 1 for t in ts):
        raise MolrmogError(f"t must be times in (0, 1], got {list(ts)}", param="t")
    out = Path(out or run.path / "jacobian")
    out.mkdir(parents=True, exist_ok=True)
    rows, summary, spectra = [], {}, {}
    models = [(kd, None) for kd in kinds] + ([(MEMORISE, kinds[0])] if memorisation else [])
    for name, base in models:
        expert = run.expert(base or name, cluster)
        z = run.latents(cluster)
        model = MemorisationExpert(expert, z).to(run.device) if name == MEMORISE else expert.eval()
        g = torch.Generator().manual_seed(seed)
        u0 = expert.standardise(z.to(run.device))[torch.randperm(z.shape[0], generator=g)[:points]].float()
        summary[name], spectra[name] = {}, {}
        for t in ts:
            tt = torch.tensor(t, dtype=torch.float64)
            s, gam = float(expert.schedule.s(tt)), float(expert.schedule.gamma(tt))
            eps = torch.randn(u0.shape, generator=g).to(u0)
            J = denoiser_jacobian(model, s * u0 + gam * eps, t)
            sv = torch.linalg.svdvals(J.double()).cpu()  # (points, d)
            ranks = [numerical_rank(v, tol) for v in sv]
            summary[name][str(t)] = {"rank_median": float(np.median(ranks)), "rank_min": min(ranks),
                                     "rank_max": max(ranks), "sv_max_median": float(sv[:, 0].median()),
                                     "dimension": int(sv.shape[1])}
            spectra[name][t] = sv.median(0).values
            rows += [{"model": name, "t": t, "point": p, "index": i, "singular_value": float(v)}
                     for p in range(sv.shape[0]) for i, v in enumerate(sv[p].tolist())]
    res = {"run": str(run.path), "cluster": cluster, "tol": tol, "points": points, "ts": list(ts),
           "models": summary}
    write_csv(out / "jacobian.csv", rows)
    write_json(out / "jacobian.json", res)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(spectra), figsize=(3.6 * len(spectra), 3.3), squeeze=False, sharey=True)
    for ax, (name, per_t) in zip(axes[0], spectra.items(), strict=True):
        for t, sv in per_t.items():
            ax.semilogy(np.arange(1, sv.numel() + 1), sv.clamp_min(1e-8).numpy(),
                        label=f"t={t} (rank {summary[name][str(t)]['rank_median']:g})")
        ax.set_title(name)
        ax.set_xlabel("index")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("singular value of d x0_hat / d x_t")
    fig.tight_layout()
    save_figure(fig, out / "jacobian.png", dpi=110)
    return res


# --- few-step sampling of image experts ------------------------------------------------------------


def few_step_images(run: Run | str | Path, *, kinds=None, sampler: str = "ddpm", steps=(5, 10, 20, 50),
                    samples: int = 1000, reference: int = 10000, cache=None, seed: int = 0, device: str = "cpu",
                    out=None, progress: bool = True, draws: int = 1, with_run_sampler: bool = True) -> dict:
    """FID / KID / precision / recall / class score of each expert kind sampled with `sampler` at each step
    count, beside the same kind with the run's own sampler (e.g. heun, 30 steps; not when `with_run_sampler` is
    False) and the wall time per image; with `draws` > 1 each row is `median_of_draws` of that many sets of
    samples (seeds seed ..). Writes few_step_<sampler>.csv/.json/.png into `out` (default RUN/few_step)."""
    from molrmog.core.samplers import SAMPLERS

    SAMPLERS.get(sampler)  # an unknown name is refused here, naming the choices
    steps = [int(n) for n in steps]
    if not steps or min(steps) < 1 or max(steps) > 10_000:
        raise MolrmogError(f"steps must be integers in [1, 10000], got {steps}", param="steps")
    if samples < 2:
        raise MolrmogError(f"samples must be >= 2, got {samples}", param="samples")
    check_draws(draws)
    run = Run.coerce(run, device)
    cfg = run.cfg
    kinds = run.check_kinds(kinds)
    feat = get_featurizer(cfg.dataset, cache, device, progress=progress, size=cfg.size, channels=cfg.channels,
                          data_dir=cfg.data_dir)
    per_cluster = math.ceil(samples / run.K)
    ref = reference_features(run, feat, reference, seed)
    rows = []
    own = [(cfg.sampler, cfg.sample_steps)] if with_run_sampler else []
    for kind in kinds:
        for smp, n in [(sampler, n) for n in steps] + own:
            sets = []
            for d in range(draws):
                imgs, ks, secs = sample_images(run, kind, per_cluster, smp, n, seed + d, progress)
                f, probs = feat.embed(imgs)
                row = {"kind": kind, "sampler": smp, "steps": n,
                       "reference_sampler": (smp, n) == (cfg.sampler, cfg.sample_steps), **image_scores(f, ref),
                       "seconds": round(secs, 3), "images_per_second": imgs.shape[0] / secs}
                if run.class_conditional:
                    row["class_score"] = M.class_score(probs, ks)
                sets.append(row)
            row = median_of_draws(sets)
            rows.append(row)
            log.info("few-step %s %s %d steps: FID %.2f (%.1f images/s)", kind, smp, n, row["fid"],
                     row["images_per_second"])
    out = Path(out or run.path / "few_step")
    res = {"run": str(run.path), "sampler": sampler, "steps": steps, "reference": [cfg.sampler, cfg.sample_steps],
           "samples_per_model": per_cluster * run.K, "draws": draws, "seed": seed,
           "reference_images": int(ref["f"].shape[0]), "rows": rows}
    write_csv(out / f"few_step_{sampler}.csv", [{k: v for k, v in r.items() if k != "fid_sets"} for r in rows])
    write_json(out / f"few_step_{sampler}.json", res)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for kind in kinds:
        pts = [(r["steps"], r["fid"]) for r in rows if r["kind"] == kind and r["sampler"] == sampler
               and not (r["reference_sampler"] and r["steps"] not in steps)]
        line = ax.semilogx(*zip(*pts, strict=True), "-o", ms=3, label=f"{kind} ({sampler})")[0]
        refrow = [r for r in rows if r["kind"] == kind and r["reference_sampler"]]
        if refrow:
            ax.axhline(refrow[-1]["fid"], color=line.get_color(), ls=":", lw=1,
                       label=f"{kind} ({cfg.sampler}, {cfg.sample_steps} steps)")
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FID (dataset featurizer)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / f"few_step_{sampler}.png", dpi=110)
    return res


# --- does the VAE invert what the experts generate? -------------------------------------------------------


@torch.no_grad()
def roundtrip(run: Run | str | Path, *, kinds=None, samples: int = 256, seed: int = 0, device: str = "cpu",
              out: str | Path | None = None) -> dict:
    """Per cluster, the VAE round trip ||E(D(z)) - z|| / ||z - mean|| (`molrmog.models.vae.roundtrip_ratio`, mean = the
    cluster's mean training latent) for `samples` latents drawn from each expert kind (the exact sampler in one
    step where the kind's law is a mixture, else the run's sampler) and for the training latents themselves;
    writes roundtrip.csv/.json/.png into `out` (default RUN/roundtrip)."""
    from molrmog.core.samplers import generate
    from molrmog.core.schedules import make_grid
    from molrmog.models.vae import roundtrip_ratio

    if not 2 <= samples <= 100_000:
        raise MolrmogError(f"samples must lie in [2, 100000], got {samples}", param="samples")
    run = Run.coerce(run, device)
    kinds = run.check_kinds(kinds)
    out = Path(out or run.path / "roundtrip")
    rows = []
    for kind in kinds:
        exact = hasattr(run.expert(kind, 0).net, "mixture_for")
        sampler, steps = ("exact", 1) if exact else (run.cfg.sampler, run.cfg.sample_steps)
        for k in range(run.K):
            vae, expert = run.vae(k).eval(), run.expert(kind, k)
            z_data = run.latents(k)  # the run's VAEs are the same for every kind: encoded once
            center = z_data.mean(0).to(run.device)
            g = torch.Generator().manual_seed(seed + k)
            u = generate(expert, samples, expert.shift.numel(), expert.schedule,
                         make_grid(expert.schedule, steps, "karras"), sampler, generator=g, device=run.device)
            sources = {kind: expert.unstandardise(u.float())}
            if kind == kinds[0]:
                sources["training latents"] = z_data[torch.randperm(z_data.shape[0], generator=g)[:samples]]
            for name, z in sources.items():
                r = roundtrip_ratio(vae, z.to(run.device).view(-1, *run.cfg.latent), center).cpu()
                rows.append({"source": name, "cluster": k, "sampler": f"{sampler}-{steps}" if name == kind else "",
                             "ratio_median": float(r.median()), "ratio_p90": float(r.quantile(0.9)),
                             "points": int(r.numel())})
    summary = {name: float(np.median([r["ratio_median"] for r in rows if r["source"] == name]))
               for name in dict.fromkeys(r["source"] for r in rows)}
    res = {"run": str(run.path), "samples": samples, "vae_cycle": run.cfg.vae_cycle, "median_over_clusters": summary,
           "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "roundtrip.csv", rows)
    write_json(out / "roundtrip.json", res)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    names = list(summary)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [r["ratio_median"] for r in rows if r["source"] == name]
        ax.bar(np.arange(len(vals)) + i * width, vals, width, label=name)
    ax.set_xlabel("cluster")
    ax.set_ylabel("||E(D(z)) - z|| / ||z - mean||")
    ax.set_title(f"VAE round trip (median per cluster; cycle weight {run.cfg.vae_cycle:g})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "roundtrip.png", dpi=110)
    return res
