"""`molrmog compare`: every latent expert kind on the same dedicated VAEs, plus the dedicated-vs-unified
VAE ablation for the registry's headline kinds (the MoG expert), in one table.

    OUT/dedicated/   a run with every kind of --experts (default: the registry's default kinds) on one VAE per cluster
    OUT/unified/     a run with the headline kinds on one VAE shared by all clusters (the ablation)
    OUT/comparison.md, comparison.json, comparison_samples.png, comparison_losses.png

Existing runs under OUT are resumed (finished stages are skipped), so a stopped comparison
continues where it stopped and a finished one is only re-evaluated.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from molrmog.core.artefacts import read_json
from molrmog.core.errors import MolrmogError
from molrmog.core.outputs import pyplot, save_figure, save_grid, write_csv, write_json, write_text
from molrmog.evaluation.evaluate import (
    MEMORISE,
    draws_note,
    evaluate_run,
    few_step_images,
    fid_cell,
    image_scores,
    reference_features,
    sample_images,
)
from molrmog.evaluation.featurizer import check_featurizer, get_featurizer
from molrmog.models.kinds import LatentExpert, default_kinds, get_kind, headline_kinds
from molrmog.pipeline.config import BUDGET_POINTS, VAE_FIELDS, RunConfig
from molrmog.pipeline.report import finish_run, read_logs, train_seconds
from molrmog.pipeline.run import Run
from molrmog.pipeline.stages import load_config, load_run_data, prepare_run, run_lock, snapshot_done, train_run

__all__ = ["compare", "comparison_md"]


def _train_or_resume(path: Path, cfg: RunConfig, progress: bool, executor, prepared=None) -> None:
    if (path / "config.json").is_file():
        train_run(path, resume=True, progress=progress, executor=executor, after=finish_run, prepared=prepared)
    else:
        train_run(path, cfg, progress=progress, executor=executor, after=finish_run, prepared=prepared)


def _unified_label(kind: str) -> str:
    return f"{get_kind(kind).label}, unified VAE"


def compare(out: str | Path, cfg: RunConfig, *, unified: bool = True, samples: int = 1000,
            reference: int = 10000, cache=None, progress: bool = True, executor=None, draws: int = 1) -> dict:
    """Train (or resume) both runs (their VAEs and experts as tasks on `executor`; a comparison already in `out`
    continues with its saved settings, `cfg` giving only the device), evaluate them (`draws` sets of
    `samples` per model, the table giving medians; see `evaluate_run`) and write the comparison files into
    `out`. The quality-vs-time curve of a budgeted run is one set per point."""
    out = Path(out)
    dedicated = out / "dedicated"
    resume = (dedicated / "config.json").is_file()
    if resume:  # a comparison to continue is evaluated with its own kinds, budget and seed (not cfg's defaults)
        cfg = dataclasses.replace(load_config(dedicated), device=cfg.device)
    kinds = tuple(cfg.experts or default_kinds())
    cfg = dataclasses.replace(cfg, experts=kinds, vae="dedicated")
    # every check before `out` is made: the run's config, data and --vae-from run, and the featurizer FID needs
    prepared = prepare_run(dedicated, cfg, resume=resume, device=cfg.device)
    load_run_data(prepared.cfg, "test")  # the evaluation's reference images: a damaged test split is refused now
    check_featurizer(prepared.cfg.dataset, cache, labelled=prepared.data.labels is not None)
    made = not out.exists()
    try:
        with run_lock(out):  # one compare at a time in `out`, evaluation included (each run also locks itself)
            return _compare(out, cfg, kinds, unified, samples, reference, cache, progress, executor, prepared,
                            draws)
    except MolrmogError:
        if made:
            _remove_if_empty(out)  # a refused compare leaves no empty --out behind
        raise


def _remove_if_empty(out: Path) -> None:
    """Remove `out` when it holds nothing but lock files and empty folders."""
    files = [p for p in out.rglob("*") if not p.is_dir() and p.name != ".lock"]
    if not files:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


def _compare(out: Path, cfg: RunConfig, kinds, unified, samples, reference, cache, progress, executor,
             prepared, draws=1) -> dict:
    runs = {"dedicated": out / "dedicated"}
    _train_or_resume(runs["dedicated"], cfg, progress, executor, prepared)
    ablation = [k for k in kinds if k in headline_kinds()] if unified else []
    if ablation:
        runs["unified"] = out / "unified"
        opts = {k: v for k, v in cfg.expert_options.items() if k in ablation}
        ucfg = dataclasses.replace(cfg, experts=tuple(ablation), vae="unified", expert_options=opts)
        if cfg.vae_from is not None:  # the same data and VAE options as the reused dedicated VAEs, trained unified
            src = load_config(runs["dedicated"])
            ucfg = dataclasses.replace(ucfg, vae_from=None, **{f: getattr(src, f) for f in VAE_FIELDS if f != "vae"})
        _train_or_resume(runs["unified"], ucfg, progress, executor)

    ev = {"dedicated": evaluate_run(runs["dedicated"], samples=samples, reference=reference, cache=cache,
                                    device=cfg.device, seed=cfg.seed, progress=progress, draws=draws)}
    if ablation:
        ev["unified"] = evaluate_run(runs["unified"], samples=samples, reference=reference, cache=cache,
                                     device=cfg.device, seed=cfg.seed, memorisation=False, progress=progress,
                                     draws=draws)
    rows = {get_kind(k).label: _summary(ev["dedicated"]["models"][k], train_seconds(runs["dedicated"], k))
            for k in kinds}
    exact = _exact_rows(runs["dedicated"], kinds, rows, samples, reference, cache, cfg, progress, draws)
    rows = {name: row for k in kinds for name, row in [(get_kind(k).label, rows[get_kind(k).label]),
                                                       *exact.get(k, {}).items()]}
    for k in ablation:
        rows[_unified_label(k)] = _summary(ev["unified"]["models"][k], train_seconds(runs["unified"], k))
    rows["memorisation baseline"] = _summary(ev["dedicated"]["models"][MEMORISE], 0.0)
    rows["real test images"] = _summary(ev["dedicated"]["models"]["test split"], None)
    result = {"dataset": load_config(runs["dedicated"]).dataset,  # with --vae-from: the reused run's data
              "featurizer_test_accuracy": ev["dedicated"]["featurizer_test_accuracy"],
              "samples_per_model": ev["dedicated"]["samples_per_model"], "draws": draws, "seed": cfg.seed,
              "reference_images": ev["dedicated"]["reference_images"], "rows": rows,
              "pairs": ev["dedicated"]["pairs"], "runs": {k: str(v) for k, v in runs.items()}}
    if cfg.budget is not None:
        floor = {"memorisation baseline": rows["memorisation baseline"]["fid"],
                 "real test images": rows["real test images"]["fid"]}
        result["quality_vs_time"] = quality_vs_time(out, runs["dedicated"], kinds, floor, samples=samples,
                                                    reference=reference, cache=cache, progress=progress)
    write_json(out / "comparison.json", result)
    write_text(out / "comparison.md", comparison_md(result))
    series = [(runs["dedicated"], k, get_kind(k).label) for k in kinds] + \
        [(runs["unified"], k, _unified_label(k)) for k in ablation]
    _sample_panel(out / "comparison_samples.png", series, cfg)
    _loss_panel(out / "comparison_losses.png", series)
    return result


def _exact_rows(run: Path, kinds, rows: dict, samples: int, reference: int, cache, cfg: RunConfig,
                progress: bool, draws: int = 1) -> dict:
    """The kinds whose learned law is a mixture (MoG, Gaussian) sampled in one exact step (`samplers.sample_exact`):
    the cheapest sampler, beside the run's own; same noise seeds, same reference. Writes RUN/few_step/.
    Returns {kind: {row name: row}}."""
    exact = [k for k in kinds if hasattr(get_kind(k).net_class, "mixture_for")]
    if not exact:
        return {}
    res = few_step_images(run, kinds=exact, sampler="exact", steps=(1,), samples=samples, reference=reference,
                          cache=cache, seed=cfg.seed, device=cfg.device, progress=progress, draws=draws,
                          with_run_sampler=False)  # the run's own sampler is evaluate_run's row
    out: dict = {}
    for r in res["rows"]:
        if r["sampler"] == "exact":
            base = rows[get_kind(r["kind"]).label]
            out.setdefault(r["kind"], {})[f"{get_kind(r['kind']).label}, exact sampler (1 step)"] = {
                **base, **{k: r.get(k) for k in ("fid", "kid", "class_score", "precision", "recall", "draws",
                                                 "fid_sets", "fid_min", "fid_max") if k in r or k in base},
                "sample_images_per_second": r["images_per_second"],
                **{k: None for k in ("generalisation_features", "generalisation_pixels", "nn_similarity_pixels")}}
    return out


def _summary(row: dict, train_s: float | None) -> dict:
    keep = ("fid", "kid", "class_score", "precision", "recall", "parameters", "sample_images_per_second",
            "generalisation_features", "generalisation_pixels", "nn_similarity_pixels")
    keep += tuple(k for k in ("draws", "fid_sets", "fid_min", "fid_max") if k in row)
    res = {k: row.get(k) for k in keep}
    res["train_seconds"] = None if train_s is None else round(train_s, 1)
    return res


def comparison_md(res: dict) -> str:
    cols = [("fid", "FID", 2), ("kid", "KID", 3), ("class_score", "class score", 3), ("precision", "precision", 3),
            ("recall", "recall", 3), ("parameters", "parameters", 0), ("train_seconds", "train time (s)", 1),
            ("sample_images_per_second", "sampling (images/s)", 1)]
    lines = [f"# Expert comparison on {res['dataset']}", "",
             f"{res['samples_per_model']} samples per model{draws_note(res)}; FID / KID / precision / recall against "
             f"{res['reference_images']} training images in the features of the dataset's own classifier "
             f"(test accuracy {res['featurizer_test_accuracy']:.4f}). Parameters: all latent experts "
             "together (VAEs not counted).", "",
             "| model | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in res["rows"].items():
        cells = []
        for key, _, digits in cols:
            v = row.get(key)
            cells.append(fid_cell(row, digits) if key == "fid" else "-" if v is None else f"{v:,}"
                         if isinstance(v, int) else f"{v:,.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Reproducibility (shared noise, cosine > 0.6 in centred pixel space) and probability-flow "
              "distance (RMS feature distance):", "", "| pair | reproducibility | PF distance |", "|---|---:|---:|"]
    for name, p in res["pairs"].items():
        lines.append(f"| {name} | {p['reproducibility_pixels']:.3f} | {p['pf_distance']:.2f} |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def _sample_panel(path: Path, series: list, cfg: RunConfig, per_class: int = 2) -> None:
    """One row per (run, kind); columns: per_class samples per cluster."""
    imgs = []
    for run, kind, _ in series:
        r = Run.load(run, device=cfg.device)
        K = r.K
        imgs += [r.sample(per_class, kind, cluster=k, seed=cfg.seed + k)[0] for k in range(K)]
    save_grid(path, torch.cat(imgs), per_class * K)


def _loss_panel(path: Path, series: list) -> None:
    """Mean (over clusters) smoothed DSM loss per step of each expert kind."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for run, kind, label in series:
        losses = [lg["loss"] for name, lg in read_logs(run).items() if name.startswith(f"{kind}-") and lg["loss"]]
        if not losses:
            continue
        n = min(len(v) for v in losses)
        y = np.mean([v[:n] for v in losses], 0)
        w = max(1, n // 30)
        ax.plot(np.convolve(y, np.ones(w) / w, mode="valid"), label=label, lw=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("DSM loss (mean over clusters)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def quality_vs_time(out: Path, run: Path, kinds, floor: dict, *, samples: int = 1000, reference: int = 10000,
                    cache=None, progress: bool = True) -> dict:
    """FID / KID / precision / recall of each kind at every snapshot of a budgeted run (all clusters' experts at
    the same fraction of the budget; fixed sample count and noise), with the elapsed training seconds summed over
    the clusters. Written incrementally to quality_vs_time.{json,csv}; points already there are not measured
    again. quality_vs_time.png: FID against seconds (log x), one curve per kind, `floor` as horizontal lines."""
    out, run = Path(out), Path(run)
    path = out / "quality_vs_time.json"
    done = read_json(path, "quality-vs-time table") if path.is_file() else {"rows": []}
    rows = [r for r in done.get("rows", []) if isinstance(r, dict)]
    have = {(r["kind"], r["point"]) for r in rows}
    r = Run.load(run)
    cfg = r.cfg
    feat = get_featurizer(cfg.dataset, cache, cfg.device, progress=progress, size=cfg.size, channels=cfg.channels,
                          data_dir=cfg.data_dir)
    ref = reference_features(r, feat, reference, cfg.seed)
    per_cluster = -(-samples // r.K)
    budget_used = {}
    for kind in kinds:
        r.check_kinds([kind])
        budget_used[kind] = sum(read_logs(run)[f"{kind}-{k}"]["info"]["elapsed"] for k in range(r.K))
        for i, frac in enumerate(BUDGET_POINTS):
            if (kind, i) in have:
                continue
            missing = [k for k in range(r.K) if not snapshot_done(run, kind, i, k)]
            if missing:
                raise MolrmogError(f"{run}: snapshot {i} of {kind} is missing for clusters {missing}; resume the run")
            experts = [LatentExpert.load(run / "snapshots" / kind / str(i) / str(k), "snapshot").to(cfg.device).eval()
                       for k in range(r.K)]
            meta = [read_json(run / "snapshots" / kind / str(i) / str(k) / "snapshot.json", "snapshot")
                    for k in range(r.K)]
            imgs, _, _ = sample_images(r, kind, per_cluster, cfg.sampler, cfg.sample_steps, cfg.seed, progress,
                                       experts)
            row = {"kind": kind, "point": i, "fraction": frac, "seconds": sum(m["elapsed"] for m in meta),
                   "step": round(sum(m["step"] for m in meta) / r.K, 1), **image_scores(feat.embed(imgs)[0], ref),
                   "parameters": sum(e.net.num_parameters() for e in experts)}
            rows.append(row)
            write_json(path, {"rows": rows, "floor": floor, "budget_per_kind": cfg.budget})  # after every point
    rows.sort(key=lambda r: (list(kinds).index(r["kind"]) if r["kind"] in kinds else 99, r["point"]))
    result = {"rows": rows, "floor": floor, "budget_per_kind": cfg.budget, "budget_used": budget_used,
              "samples": per_cluster * r.K}
    write_json(path, result)
    write_csv(out / "quality_vs_time.csv", [{k: r[k] for k in ("kind", "seconds", "step", "fid", "kid", "precision",
                                                               "recall", "parameters")} for r in rows])
    _time_plot(out / "quality_vs_time.png", rows, floor, kinds)
    return result


def _time_plot(path: Path, rows: list, floor: dict, kinds) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    for kind in kinds:
        pts = sorted((r["seconds"], r["fid"]) for r in rows if r["kind"] == kind)
        if pts:
            ax.loglog(*zip(*pts, strict=True), "-o", ms=3, label=get_kind(kind).label)
    for (name, value), style in zip(floor.items(), (":", "--"), strict=False):
        if value is not None:
            ax.axhline(value, color="gray", ls=style, lw=1, label=name)
    ax.set_xlabel("training seconds per kind (all clusters' experts, EM start included)")
    ax.set_ylabel("FID (dataset featurizer)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
