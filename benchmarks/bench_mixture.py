"""Throughput of the closed-form MoLR-MoG score against the machine's float32 GEMM.

Useful work per score evaluation is counted as 2 B (D sum_k d_k + 2 sum_k n_k d_k r_k) FLOPs
(the encoder product and the two low-rank factor products), whatever the implementation does.
Prints medians over repeats, measured in one run.

    python benchmarks/bench_mixture.py [--device cuda] [--batch 4096] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from molrmog import mixture as mx
from molrmog.distributions import MoLRMoG

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
    sec = median_seconds(lambda: a @ b, device, repeats)
    return 2 * n**3 / sec / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    torch.manual_seed(0)
    peak = gemm_gflops(a.device, a.repeats)
    print(f"device {a.device}, threads {torch.get_num_threads()}, batch {a.batch}, float32")
    print(f"float32 GEMM (2048^3): {peak:8.1f} GFLOP/s")
    for c in CONFIGS:
        bench_config(c, a.device, a.batch, a.repeats, peak)


def bench_config(c: dict, device: str, batch: int, repeats: int, peak: float) -> None:
    dist = MoLRMoG.random(c["D"], c["K"], c["d"], c["n"], c["r"], seed=0, dtype=torch.float32)
    mix = dist.mixture.to(device)
    x = torch.randn(batch, c["D"], device=device)
    s, g = torch.tensor(0.8, device=device), torch.tensor(0.6, device=device)
    with torch.no_grad():
        sec = median_seconds(lambda: mx.score(mix, x, s, g), device, repeats)
    flops = 2 * batch * (c["D"] * c["K"] * c["d"] + 2 * c["K"] * c["n"] * c["d"] * c["r"])
    gf = flops / sec / 1e9
    # the same-shaped encoder GEMM alone, for reference
    W = torch.randn(c["D"], c["K"] * c["d"], device=device)
    enc_sec = median_seconds(lambda: x @ W, device, repeats)
    enc = 2 * batch * c["D"] * c["K"] * c["d"] / enc_sec / 1e9
    print(f"D={c['D']:4d} K={c['K']:2d} d={c['d']:2d} n_k={c['n']} r={c['r']}: "
          f"{batch / sec:10.0f} score evals/s, {sec * 1e3:7.2f} ms/batch, {gf:7.1f} GFLOP/s useful, "
          f"{gf / peak:5.1%} of GEMM peak (encoder-shaped GEMM alone: {enc:.1f} GFLOP/s)")

if __name__ == "__main__":
    main()
