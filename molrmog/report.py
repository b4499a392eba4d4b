"""The report of a finished run: loss table and curves, sample grids per expert kind, report.md/json."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .data import load_dataset
from .io import atomic_write, load_module
from .pipeline import RunConfig, _task_done, load_config, load_run, sample_loaded

__all__ = ["finish_run", "save_grid"]


def finish_run(out: Path) -> dict:
    """Loss table and curves, sample grids per expert kind, and report.md / report.json."""
    cfg = load_config(out)
    logs = {p.stem: json.loads(p.read_text()) for p in sorted((out / "logs").glob("*.json"))}
    rows = [{"task": name, "step": i, "loss": v}
            for name, lg in logs.items() for i, v in enumerate(lg["loss"])]
    with open(out / "losses.csv", "w") as f:
        f.write("task,step,loss\n")
        f.writelines(f"{r['task']},{r['step']},{r['loss']}\n" for r in rows)
    _loss_plot(out / "loss_curves.png", logs, cfg.experts)
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, limit=cfg.limit, size=cfg.size,
                        channels=cfg.channels, skip_bad=cfg.skip_bad)
    labels = load_file(str(out / "clusters.safetensors"))["labels"]
    K = int(labels.max()) + 1
    m = cfg.samples_per_class
    if all((labels == k).sum() >= m for k in range(K)):
        real = torch.cat([data.images[(labels == k).nonzero().flatten()[:m]] for k in range(K)])
        save_grid(out / "samples_data.png", real, m)
    report = {"dataset": cfg.dataset, "vae": cfg.vae, "clusters": K, "latent": cfg.latent, "experts": {}}
    vae_params = sum(load_module(p, "VAE").num_parameters() for p in sorted((out / "vae").iterdir())
                     if _task_done(p))
    report["vae_parameters_total"] = vae_params
    for kind in cfg.experts:
        _, weights, _, vaes, experts = load_run(out, kind, cfg.device)
        t0 = time.perf_counter()
        imgs = torch.cat([sample_loaded(weights, vaes, experts, m, k, cfg.sampler, cfg.sample_steps,
                                        cfg.seed + k, cfg.device)[0] for k in range(K)])
        sample_s = time.perf_counter() - t0
        save_grid(out / f"samples_{kind}.png", imgs, m)
        train_s = sum(lg["seconds"] for name, lg in logs.items() if name.startswith(f"{kind}-"))
        steps = sum(len(lg["loss"]) for name, lg in logs.items() if name.startswith(f"{kind}-"))
        report["experts"][kind] = {
            "parameters_per_expert": experts[0].net.num_parameters(),
            "parameters_total": sum(e.net.num_parameters() for e in experts),
            "train_seconds": round(train_s, 2),
            "train_steps_per_second": round(steps / train_s, 2) if train_s else None,
            "sample_images_per_second": round(imgs.shape[0] / sample_s, 2),
        }
    atomic_write(out / "report.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    atomic_write(out / "report.md", lambda p: Path(p).write_text(_report_md(report, cfg)))
    return report


def _report_md(report: dict, cfg: RunConfig) -> str:
    lines = [f"# molrmog run: {cfg.dataset}, {cfg.vae} VAEs, latent {'x'.join(map(str, cfg.latent))}, "
             f"{report['clusters']} clusters", "",
             f"VAE parameters (all clusters): {report['vae_parameters_total']:,}", "",
             "| expert | parameters / expert | parameters (all) | train time (s) | train steps/s "
             "| sampling (images/s) |", "|---|---:|---:|---:|---:|---:|"]
    for kind, r in report["experts"].items():
        lines.append(f"| {kind} | {r['parameters_per_expert']:,} | {r['parameters_total']:,} | "
                     f"{r['train_seconds']} | {r['train_steps_per_second']} | "
                     f"{r['sample_images_per_second']} |")
    lines += ["", "Samples: " + ", ".join(f"`samples_{k}.png`" for k in report["experts"]) +
              " (one row per cluster); real images: `samples_data.png`; losses: `loss_curves.png`.", ""]
    return "\n".join(lines)


def save_grid(path: Path, images: torch.Tensor, per_row: int, scale: int = 4) -> None:
    """Write images (N, C, H, W) in [0, 1] as one PNG grid."""
    from PIL import Image

    N, C, H, W = images.shape
    rows = math.ceil(N / per_row)
    grid = np.ones((rows * (H + 1) + 1, per_row * (W + 1) + 1, C), dtype=np.float32)
    arr = images.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    for i in range(N):
        r, c = divmod(i, per_row)
        grid[1 + r * (H + 1): 1 + r * (H + 1) + H, 1 + c * (W + 1): 1 + c * (W + 1) + W] = arr[i]
    arr8 = (grid * 255).round().astype(np.uint8)
    img = Image.fromarray(arr8[..., 0] if C == 1 else arr8)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)


def _loss_plot(path: Path, logs: dict, kinds) -> None:
    from .experiments.common import pyplot

    plt = pyplot()
    groups = [("vae", "VAE")] + [(k, f"{k} expert") for k in kinds]
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.4), squeeze=False)
    for ax, (prefix, title) in zip(axes[0], groups, strict=True):
        for name, lg in logs.items():
            if name.startswith(prefix + "-"):
                y = np.asarray(lg["loss"])
                w = max(1, len(y) // 30)
                ax.plot(np.convolve(y, np.ones(w) / w, mode="valid"), lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
