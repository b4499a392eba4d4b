"""The report of a trained run: loss table and curves, sample grids per expert kind, report.md/json."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from molrmog.core.artefacts import read_json
from molrmog.core.outputs import pyplot, save_figure, save_grid, write_csv, write_json, write_text
from molrmog.models.kinds import get_kind
from molrmog.pipeline.run import Run

__all__ = ["finish_run", "read_logs", "train_seconds"]

log = logging.getLogger(__name__)


def read_logs(out: Path) -> dict[str, dict]:
    """{task: {"loss": [...], "seconds": s}} of every finished stage of a run."""
    return {p.stem: read_json(p, "training log") for p in sorted((Path(out) / "logs").glob("*.json"))}


def train_seconds(out: Path, kind: str) -> float:
    return sum(lg["seconds"] for name, lg in read_logs(out).items() if name.startswith(f"{kind}-"))


def finish_run(out: str | Path | Run) -> dict:
    """Loss table and curves, sample grids per expert kind, and report.md / report.json of a trained run."""
    run = Run.coerce(out)
    out, cfg = run.path, run.cfg
    t0 = time.perf_counter()
    logs = read_logs(out)
    rows = [{"task": name, "step": i, "loss": v} for name, lg in logs.items() for i, v in enumerate(lg["loss"])]
    write_csv(out / "losses.csv", rows or [{"task": "", "step": 0, "loss": 0.0}])
    _loss_plot(out / "loss_curves.png", logs, cfg.experts)
    labels, K = run.labels, run.K
    m = cfg.samples_per_class
    if all((labels == k).sum() >= m for k in range(K)):
        real = torch.cat([run.images[(labels == k).nonzero().flatten()[:m]] for k in range(K)])
        save_grid(out / "samples_data.png", real, m)
    run.check_kinds(cfg.experts)
    vaes = run.vaes()
    report = {"dataset": cfg.dataset, "vae": cfg.vae, "clusters": K, "latent": list(cfg.latent), "experts": {},
              "vae_parameters_total": _vae_parameters(vaes)}
    for kind in cfg.experts:
        experts = run.experts(kind)
        t1 = time.perf_counter()
        imgs = torch.cat([run.sample(m, kind, cluster=k, seed=cfg.seed + k)[0] for k in range(K)])
        sample_s = time.perf_counter() - t1
        save_grid(out / f"samples_{kind}.png", imgs, m)
        mine = {n: lg for n, lg in logs.items() if n.startswith(f"{kind}-")}
        train_s = sum(lg["seconds"] for lg in mine.values())
        steps = sum(len(lg["loss"]) for lg in mine.values())
        per_cluster = []
        for k, e in enumerate(experts):
            info = logs.get(f"{kind}-{k}", {}).get("info", {})
            row = {"cluster": k, "parameters": e.net.num_parameters(),
                   **{key: e.net.config[key] for key in ("n", "r") if key in e.net.config}}
            if "init" in info:
                row["em_floor_s2_median"] = info["init"].get("floor_s2_median")
                row["em_loglik"] = info["init"].get("loglik")
            if "auto" in info:
                row["auto_heldout_loglik"] = info["auto"]["heldout_loglik"]
            per_cluster.append(row)
        report["experts"][kind] = {
            "label": get_kind(kind).label,
            "parameters_per_expert": experts[0].net.num_parameters(),
            "parameters_total": sum(e.net.num_parameters() for e in experts),
            "per_cluster": per_cluster,
            "train_seconds": round(train_s, 2),
            "train_steps_per_second": round(steps / train_s, 2) if train_s else None,
            "sample_images_per_second": round(imgs.shape[0] / sample_s, 2),
        }
    write_json(out / "report.json", report)
    write_text(out / "report.md", _report_md(report, cfg))
    log.info("report of %s written in %.1f s", out, time.perf_counter() - t0)
    return report


def _vae_parameters(vaes) -> int:
    seen, total = set(), 0
    for v in vaes:
        v = getattr(v, "vae", v)  # a cluster view of a shared VAE
        if id(v) not in seen:
            seen.add(id(v))
            total += sum(p.numel() for p in v.parameters())
    return total


def _report_md(report: dict, cfg) -> str:
    lines = [f"# molrmog run: {cfg.dataset}, {cfg.vae} VAEs, latent {'x'.join(map(str, cfg.latent))}, "
             f"{report['clusters']} clusters", "",
             f"VAE parameters (all clusters): {report['vae_parameters_total']:,}", "",
             "| expert | parameters / expert | parameters (all) | train time (s) | train steps/s "
             "| sampling (images/s) |", "|---|---:|---:|---:|---:|---:|"]
    for kind, r in report["experts"].items():
        lines.append(f"| {kind} | {r['parameters_per_expert']:,} | {r['parameters_total']:,} | "
                     f"{r['train_seconds']} | {r['train_steps_per_second']} | "
                     f"{r['sample_images_per_second']} |")
    for kind, r in report["experts"].items():
        rows = r.get("per_cluster", [])
        if rows and "n" in rows[0]:
            lines += ["", f"{kind} experts per cluster (modes n, rank r, parameters, EM floor s^2):", "",
                      "| cluster | n | r | parameters | EM floor s^2 (median) |", "|---:|---:|---:|---:|---:|"]
            lines += [f"| {c['cluster']} | {c.get('n', '-')} | {c.get('r') or 'full'} | {c['parameters']:,} | "
                      f"{_num(c.get('em_floor_s2_median'))} |" for c in rows]
    lines += ["", "Samples: " + ", ".join(f"`samples_{k}.png`" for k in report["experts"]) +
              " (one row per cluster); real images: `samples_data.png`; losses: `loss_curves.png`.", ""]
    return "\n".join(lines)


def _num(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _loss_plot(path: Path, logs: dict, kinds) -> None:
    plt = pyplot()
    groups = [("vae", "VAE")] + [(k, get_kind(k).label) for k in kinds]
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.4), squeeze=False)
    for ax, (prefix, title) in zip(axes[0], groups, strict=True):
        for name, lg in logs.items():
            if name.startswith(prefix + "-") and lg["loss"]:
                y = np.asarray(lg["loss"])
                w = max(1, len(y) // 30)
                ax.plot(np.convolve(y, np.ones(w) / w, mode="valid"), lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
