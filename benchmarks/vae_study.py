"""The VAE study (issue 18): reconstruction FID, round trip and wall-clock of candidate VAE settings against
today's defaults, per cluster, in one invocation on this machine.

For each cluster and candidate, one dedicated VAE is trained as a run trains it (the dataset's defaults from
`molrmog.pipeline.config`, the candidate's overrides on top; same seed, same data) and measured:
- seconds: wall-clock of the training (nothing else should run beside it: say so when quoting);
- recon FID: the cluster's training images against their reconstructions (encoder mean, decoded) in the
  features of the dataset's own featurizer -- what sets the memorisation floor of the comparison;
- round trip ||E(D(z)) - z|| / ||z - mean|| (median) for the training latents and for draws from the
  Gaussian fit of them (a stand-in for what an expert generates; `molrmog analyze roundtrip` measures the
  real expert samples of a trained run).

    python benchmarks/vae_study.py --dataset fashion-mnist --clusters 0,6 \
        --candidate default= --candidate cycle10=vae_cycle:10 [--out runs/vae_study]
    python benchmarks/vae_study.py --dataset fashion-mnist --clusters 0 --candidate default= \
        --candidate gauss=vae_recon:normal --candidate b32s3k=vae_batch:32,vae_steps:3000

A candidate is NAME=key:value,... over RunConfig fields (vae_cycle, vae_steps, vae_lr, vae_width, vae_beta,
vae_blocks, vae_batch, vae_recon, latent as c/h/w). Writes vae_study.csv/.json/.png into --out and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from molrmog.core import metrics as M
from molrmog.core.outputs import pyplot, save_figure, write_csv, write_json
from molrmog.evaluation.featurizer import get_featurizer
from molrmog.models.layouts import new_vae, train_vae
from molrmog.models.vae import roundtrip_ratio
from molrmog.pipeline.config import RunConfig, resolve_config
from molrmog.pipeline.stages import load_run_data


def parse_candidate(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition("=")
    over = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition(":")
        field = {f.name: f for f in dataclasses.fields(RunConfig)}[key]
        if key == "latent":
            over[key] = tuple(int(v) for v in value.split("/"))
        else:
            kind = str(field.type)
            over[key] = (float if "float" in kind else str if "str" in kind else int)(value)
    return name, over


def study(dataset: str, clusters: list[int], candidates: list[tuple[str, dict]], cache=None, progress=False):
    base = RunConfig(dataset=dataset)
    data = load_run_data(base)
    feat = get_featurizer(dataset, cache, "cpu", progress=progress)
    rows = []
    for k in clusters:
        x = data.images[data.labels == k]
        f_data = feat.embed(x)[0]
        for name, over in candidates:
            cfg = resolve_config(dataclasses.replace(base, **over), data.shape)
            vae = new_vae(cfg, data.shape, cfg.seed + k)

            t0 = time.perf_counter()
            train_vae(vae, x, cfg, seed=cfg.seed, progress=progress, desc=f"{name} cluster {k}")
            seconds = time.perf_counter() - t0
            vae.eval()
            with torch.no_grad():
                z = torch.cat([vae.encode(b)[0].flatten(1) for b in x.split(512)])
                recon = torch.cat([torch.sigmoid(vae.decode(b)) for b in z.split(512)])
                chol = torch.linalg.cholesky(torch.cov(z.T) + 1e-4 * torch.eye(z.shape[1]))
                draws = z.mean(0) + torch.randn(1000, z.shape[1], generator=torch.Generator().manual_seed(0)) @ chol.T
                rt_data = roundtrip_ratio(vae, z[:1000].view(-1, *cfg.latent), z.mean(0)).median()
                rt_draw = roundtrip_ratio(vae, draws.view(-1, *cfg.latent), z.mean(0)).median()
            row = {"cluster": k, "candidate": name, "overrides": json.dumps(over), "seconds": round(seconds, 1),
                   "recon_fid": M.fid(f_data, feat.embed(recon)[0]), "roundtrip_data": float(rt_data),
                   "roundtrip_gaussian_draws": float(rt_draw), "latent_dim": int(z.shape[1]),
                   "vae_steps": cfg.vae_steps, "vae_cycle": cfg.vae_cycle}
            rows.append(row)
            print(f"cluster {k:2d} {name:12s} {row['seconds']:7.1f} s  recon FID {row['recon_fid']:7.2f}  "
                  f"round trip data {row['roundtrip_data']:.3f}  draws {row['roundtrip_gaussian_draws']:.3f}",
                  flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--clusters", default="0,6", help="comma list of class indices (default 0,6)")
    p.add_argument("--candidate", action="append", default=None,
                   help="NAME=key:value,... (repeatable; default: default= and cycle10=vae_cycle:10)")
    p.add_argument("--cache", default=None, help="featurizer cache")
    p.add_argument("--out", default="runs/vae_study")
    a = p.parse_args()
    candidates = [parse_candidate(c) for c in (a.candidate or ["default=", "cycle10=vae_cycle:10"])]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = study(a.dataset, [int(c) for c in a.clusters.split(",")], candidates, a.cache)
    out = Path(a.out)
    write_csv(out / "vae_study.csv", rows)
    write_json(out / "vae_study.json", {"dataset": a.dataset, "rows": rows})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, _ in candidates:
        pts = [r for r in rows if r["candidate"] == name]
        ax.scatter([r["seconds"] for r in pts], [r["recon_fid"] for r in pts], label=name)
    ax.set_xlabel("training seconds per VAE (2 CPU cores)")
    ax.set_ylabel("reconstruction FID (cluster)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "vae_study.png", dpi=110)
    print(f"wrote {out}/vae_study.csv, vae_study.json and vae_study.png")


if __name__ == "__main__":
    main()
