"""Every registered latent expert kind on the same latents: training throughput (steps/s and samples/s, at
each batch size asked for), sampling throughput (latents/s), parameter counts, peak memory, and the
ratios of the headline kind (MoG) to the baseline kind (U-Net) -- all measured in one run.

Latents: cluster 0 of a trained run (--run RUN), else draws from a random MoLR-MoG of the latent
shape (default 4x7x7, Fashion-MNIST's). Each kind is measured in its own process, so its peak memory
(CPU: growth of the peak resident set over the process's baseline; CUDA: peak allocated) is its own.
Medians over repeats.

    python benchmarks/bench_experts.py [--latent 4,7,7] [--run RUN] [--device cuda] [--batches 128,1024]
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


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _latents(a) -> torch.Tensor:
    if a.run:
        from molrmog.pipeline.run import Run

        return Run.load(a.run, device="cpu").latents(0)
    from molrmog.core.distributions import MoLRMoG

    d = math.prod(a.latent)
    return MoLRMoG.random(d, 1, d, n=10, r=4, seed=0, dtype=torch.float32).sample(
        a.n, torch.Generator().manual_seed(0))[0]


def _median_time(fn, device, repeats) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(kind: str, a, z: torch.Tensor, latent) -> dict:
    from molrmog.core.losses import dsm_loss
    from molrmog.core.samplers import generate
    from molrmog.core.schedules import get_schedule, make_grid
    from molrmog.models.kinds import LatentExpert, get_kind

    dev = a.device
    entry = get_kind(kind)
    opts = entry.options()
    schedule = get_schedule("vp").config()
    e = LatentExpert.wrap(kind, latent, entry.build(latent, opts, schedule, 0))
    e.shift.copy_(z.mean(0))
    e.scale.copy_(z.std(0).clamp_min(1e-3))
    u = e.standardise(z)
    if entry.init_from_data is not None:
        entry.init_from_data(e.net, u, opts, 0)
    e, u = e.to(dev), u.to(dev)
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    opt = torch.optim.Adam(e.parameters(), lr=1e-4)
    g = torch.Generator(dev).manual_seed(0)  # on the training device, as `fit` draws: no host work per step
    train = {}
    for batch in a.batches:
        def steps(batch=batch):
            for _ in range(a.steps):
                idx = torch.randint(0, u.shape[0], (batch,), generator=g, device=dev)
                loss = dsm_loss(e, u[idx], e.schedule, generator=g)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        sec = _median_time(steps, dev, a.repeats) / a.steps
        train[batch] = {"steps_per_s": 1 / sec, "samples_per_s": batch / sec}
    ts = make_grid(e.schedule, a.sample_steps, "karras")

    @torch.no_grad()
    def sample():
        return generate(e, a.sample_batch, e.shift.numel(), e.schedule, ts, "heun",
                        generator=torch.Generator().manual_seed(1), dtype=torch.float32, device=dev)

    ssec = _median_time(sample, dev, max(3, a.repeats // 2))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.startswith("cuda")
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024)
    best = max(train.values(), key=lambda r: r["samples_per_s"])
    return {"kind": kind, "label": entry.label, "parameters": e.net.num_parameters(), "train": train,
            "best_train_samples_per_s": best["samples_per_s"],
            "sample_latents_per_s": a.sample_batch / ssec, "peak_memory_mib": peak}


def _child(kind, a, z, latent, q):
    if a.threads:
        torch.set_num_threads(a.threads)
    q.put(measure(kind, a, z, latent))


def _run_latent(run):
    from molrmog.pipeline.stages import load_config

    return tuple(load_config(run).latent)


def main():
    from molrmog.models.kinds import baseline_kinds, headline_kinds, kind_names

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latent", type=lambda v: tuple(int(x) for x in v.replace("x", ",").split(",")),
                    default=(4, 7, 7))
    ap.add_argument("--run", default=None, help="take cluster 0's latents from this trained run")
    ap.add_argument("--kinds", default=",".join(kind_names()), help="comma list (default: every registered kind)")
    ap.add_argument("--n", type=int, default=6000, help="synthetic latents (default 6000)")
    ap.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=[128],
                    help="training batch sizes to measure (default 128)")
    ap.add_argument("--steps", type=int, default=20, help="training steps per timing repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sample-batch", type=int, default=256)
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()
    z = _latents(a)
    latent = _run_latent(a.run) if a.run else a.latent
    ctx = mp.get_context("spawn")
    rows = []
    for kind in a.kinds.split(","):
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(kind, a, z, latent, q))
        p.start()
        rows.append(q.get())
        p.join()
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {a.device} [{name}], latents {tuple(z.shape)}, heun {a.sample_steps} steps x "
          f"{a.sample_batch} latents, medians of {a.repeats}")
    print(f"{'expert':10s} {'parameters':>11s} {'batch':>6s} {'train steps/s':>14s} {'train samples/s':>16s} "
          f"{'sampling latents/s':>19s} {'peak MiB':>9s}")
    for r in rows:
        for i, (batch, t) in enumerate(r["train"].items()):
            tail = f"{r['sample_latents_per_s']:19.1f} {r['peak_memory_mib']:9.1f}" if i == 0 else ""
            print(f"{r['kind'] if i == 0 else '':10s} {r['parameters'] if i == 0 else '':>11} {batch:6d} "
                  f"{t['steps_per_s']:14.1f} {t['samples_per_s']:16.0f} {tail}")
    by = {r["kind"]: r for r in rows}
    ratios = {}
    for h in [k for k in headline_kinds() if k in by]:
        for b in [k for k in baseline_kinds() if k in by]:
            ratios[f"{h}/{b}"] = {
                "parameters": by[b]["parameters"] / by[h]["parameters"],
                "train_samples_per_s_best_batch": by[h]["best_train_samples_per_s"] / by[b]["best_train_samples_per_s"],
                "sampling_latents_per_s": by[h]["sample_latents_per_s"] / by[b]["sample_latents_per_s"]}
            r = ratios[f"{h}/{b}"]
            print(f"{h}/{b}: {b} has {r['parameters']:.1f}x the parameters; {h} trains "
                  f"{r['train_samples_per_s_best_batch']:.1f}x the samples/s (each at its best batch) and samples "
                  f"{r['sampling_latents_per_s']:.1f}x faster")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": a.device, "device_name": name, "rows": rows, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
