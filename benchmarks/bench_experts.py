"""MoG vs Gaussian vs U-Net latent experts on the same latents and batch: training steps/s, sampling
images/s, parameter counts, peak memory, and the ratios -- all measured in one run.

Latents: cluster 0 of a trained run (--run RUN), else draws from a random MoLR-MoG of the latent
shape (default 4x7x7, Fashion-MNIST's). Each expert kind is measured in its own process, so its
peak memory (CPU: growth of the peak resident set over the process's baseline; CUDA: peak
allocated) is its own. Medians over repeats.

    python benchmarks/bench_experts.py [--latent 4,7,7] [--run RUN] [--device cuda] [--batch 128]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import statistics
import time

import torch

KINDS = ("mog", "gaussian", "unet")


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _latents(a) -> torch.Tensor:
    if a.run:
        from molrmog.evaluation import _Context

        ctx = _Context(a.run, "cpu")
        _, _, vaes, _ = ctx.load(ctx.cfg.experts[0])
        return ctx.latents(vaes[0], 0)
    from molrmog.distributions import MoLRMoG

    d = math.prod(a.latent)
    return MoLRMoG.random(d, 1, d, n=10, r=4, seed=0, dtype=torch.float32).sample(
        a.n, torch.Generator().manual_seed(0))[0]


def measure(kind: str, a, z: torch.Tensor) -> dict:
    from molrmog.experts import LatentExpert
    from molrmog.losses import dsm_loss
    from molrmog.samplers import generate
    from molrmog.schedules import make_grid

    torch.manual_seed(0)
    dev = a.device
    latent = a.latent if not a.run else None
    e = LatentExpert(kind, latent or _run_latent(a.run), modes=a.modes, rank=a.rank, width=a.unet_width,
                     precondition=True)
    e.shift.copy_(z.mean(0))
    e.scale.copy_(z.std(0).clamp_min(1e-3))
    u = e.standardise(z)
    if kind != "unet":
        e.net.init_from_data(u)
    e = e.to(dev)
    u = u.to(dev)
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    opt = torch.optim.Adam(e.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(0, u.shape[0], (a.batch,), generator=g)
        loss = dsm_loss(e, u[idx], e.schedule, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    times = []
    for _ in range(a.repeats):
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        _sync(dev)
        times.append((time.perf_counter() - t0) / a.steps)
    ts = make_grid(e.schedule, a.sample_steps, "karras")
    d = e.shift.numel()

    @torch.no_grad()
    def sample():
        return generate(e, a.sample_batch, d, e.schedule, ts, "heun", generator=torch.Generator().manual_seed(1),
                        dtype=torch.float32, device=dev)

    sample()
    stimes = []
    for _ in range(max(3, a.repeats // 2)):
        _sync(dev)
        t0 = time.perf_counter()
        sample()
        _sync(dev)
        stimes.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.startswith("cuda")
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024)
    return {"kind": kind, "parameters": e.net.num_parameters(),
            "train_steps_per_s": 1 / statistics.median(times),
            "sample_images_per_s": a.sample_batch / statistics.median(stimes), "peak_memory_mib": peak}


def _run_latent(run):
    from molrmog.pipeline import load_config

    return load_config(run).latent


def _child(kind, a, z, q):
    torch.set_num_threads(a.threads) if a.threads else None
    q.put(measure(kind, a, z))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latent", type=lambda v: [int(x) for x in v.replace("x", ",").split(",")], default=[4, 7, 7])
    ap.add_argument("--run", default=None, help="take cluster 0's latents from this trained run")
    ap.add_argument("--n", type=int, default=6000, help="synthetic latents (default 6000)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--unet-width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="training steps per timing repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sample-batch", type=int, default=256)
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()
    z = _latents(a)
    ctx = mp.get_context("spawn")
    rows = []
    for kind in KINDS:
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(kind, a, z, q))
        p.start()
        rows.append(q.get())
        p.join()
    print(f"device {a.device}, latents {tuple(z.shape)}, batch {a.batch}, heun {a.sample_steps} steps x "
          f"{a.sample_batch} images, medians of {a.repeats}")
    print(f"{'expert':10s} {'parameters':>11s} {'train steps/s':>14s} {'images/s':>10s} {'peak MiB':>9s}")
    for r in rows:
        print(f"{r['kind']:10s} {r['parameters']:11,d} {r['train_steps_per_s']:14.1f} {r['sample_images_per_s']:10.1f} "
              f"{r['peak_memory_mib']:9.1f}")
    by = {r["kind"]: r for r in rows}
    ratios = {f"{x}/unet": {"parameters": by["unet"]["parameters"] / by[x]["parameters"],
                            "train_speed": by[x]["train_steps_per_s"] / by["unet"]["train_steps_per_s"],
                            "sampling_speed": by[x]["sample_images_per_s"] / by["unet"]["sample_images_per_s"]}
              for x in ("mog", "gaussian")}
    for name, r in ratios.items():
        print(f"{name}: U-Net has {r['parameters']:.1f}x the parameters; {name.split('/')[0]} trains "
              f"{r['train_speed']:.1f}x and samples {r['sampling_speed']:.1f}x faster")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
