"""Throughput of the closed-form MoLR-MoG score against the machine's limits, measured in one run.

For each configuration, batch size and path (eager: the reference; fused: the same arithmetic through
torch.compile), prints score evaluations per second, the useful GFLOP/s and their share of the float32
GEMM rate, and the input + output bandwidth (GB/s) and its share of the device's copy bandwidth.
Useful work per evaluation is counted as 2 (D sum_k d_k + 2 sum_k n_k d_k r_k) FLOPs (the encoder product
and the two low-rank factor products), whatever the implementation does; traffic as 2 D * 4 bytes
(x in, score out, float32). Medians over repeats.

    python benchmarks/bench_mixture.py [--device cuda] [--batches 4096,65536] [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from molrmog.core import mixture as mx
from molrmog.core.distributions import MoLRMoG

CONFIGS = [dict(D=784, K=10, d=16, n=40, r=4), dict(D=64, K=1, d=64, n=40, r=8)]


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, device, repeats):
    fn()
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_gflops(device, repeats, n=2048):
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return 2 * n**3 / median_seconds(lambda: a @ b, device, repeats) / 1e9


def copy_gbs(device, repeats, mb=256):
    x = torch.empty(mb * 2**18, device=device)  # mb MiB of float32
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / median_seconds(lambda: y.copy_(x), device, repeats) / 1e9  # read + write


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default=None, help="comma list (default: 4096 on the CPU, 4096,65536 on a GPU)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--paths", default="eager,fused", help="eager, fused or both")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()
    batches = [int(b) for b in (a.batches or ("4096" if a.device == "cpu" else "4096,65536")).split(",")]
    torch.manual_seed(0)
    peak, bw = gemm_gflops(a.device, a.repeats), copy_gbs(a.device, a.repeats)
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {a.device} [{name}], float32; float32 GEMM (2048^3) {peak:.1f} GFLOP/s, copy {bw:.1f} GB/s")
    rows = []
    for c in CONFIGS:
        dist = MoLRMoG.random(c["D"], c["K"], c["d"], c["n"], c["r"], seed=0, dtype=torch.float32)
        mix = dist.mixture.to(a.device)
        flops_per = 2 * (c["D"] * c["K"] * c["d"] + 2 * c["K"] * c["n"] * c["d"] * c["r"])
        for batch in batches:
            x = torch.randn(batch, c["D"], device=a.device)
            s, g = torch.tensor(0.8, device=a.device), torch.tensor(0.6, device=a.device)
            for path in a.paths.split(","):
                fused = path == "fused"
                with torch.no_grad():
                    sec = median_seconds(lambda m=mix, x=x, s=s, g=g, f=fused: mx.score(m, x, s, g, fused=f),
                                         a.device, a.repeats)
                evals = batch / sec
                gf, gb = evals * flops_per / 1e9, evals * 2 * c["D"] * 4 / 1e9
                rows.append({**c, "batch": batch, "path": path, "evals_per_s": evals, "gflops": gf, "gemm_gflops": peak,
                             "gemm_share": gf / peak, "gb_per_s": gb, "copy_gb_per_s": bw, "copy_share": gb / bw})
                print(f"D={c['D']:4d} K={c['K']:2d} d={c['d']:2d} n_k={c['n']} r={c['r']} batch {batch:6d} "
                      f"{path:5s}: {evals:12,.0f} evals/s, {gf:7.1f} GFLOP/s useful ({gf / peak:6.1%} of GEMM), "
                      f"{gb:6.2f} GB/s in+out ({gb / bw:6.1%} of copy)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": a.device, "device_name": name, "gemm_gflops": peak, "copy_gb_per_s": bw, "rows": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()
