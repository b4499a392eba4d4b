"""One command for the GPU half of the speed claims, printing one table (issue 21).

    python benchmarks/gpu_suite.py --device cuda --out OUT          # about 6-8 min on one H100 / H200
    python benchmarks/gpu_suite.py --device cpu --quick --out OUT   # the same code paths in ~2 min (a dry run)

Runs, each stage in its own process so that one stage's memory, compiled graphs and threads are its own:
1. the device (name, torch / CUDA versions, float32 GEMM rate with and without TF32);
2. benchmarks/bench_mixture.py: closed-form score evals/s and share of the GEMM rate for both score
   configurations at batch 4,096 and 65,536, eager and fused;
3. benchmarks/bench_experts.py: MoG / Gaussian / U-Net training samples/s at several batches (the best one
   is each kind's) and their ratios;
4. sampling latents/s: heun at 30 steps for every kind, the `exact` sampler at 1 / 2 / 4 steps for the kinds
   whose learned law is a mixture (MoG, Gaussian);
5. a digits `molrmog compare --device cuda --budget 30` with its quality-vs-time curve (FID per snapshot).
Writes every stage's JSON and the table (suite.md, suite.json) into --out. Needs nothing but the project and
its dependencies (no downloads: the featurizer is trained into OUT/cache).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_mixture import median_seconds  # (this folder is on the path of a script run from it)

HERE = Path(__file__).resolve().parent


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_info(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "name": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"}
    n = 8192 if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for tf32 in (False, True) if device.startswith("cuda") else (False,):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        sec = median_seconds(lambda: a @ b, device, 10)
        info["gemm_tf32_tflops" if tf32 else "gemm_fp32_tflops"] = 2 * n**3 / sec / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    return info


def sampling(device: str, quick: bool) -> list[dict]:
    """Latents/s of heun-30 for every default kind and of `exact` at 1/2/4 steps for the mixture kinds, on
    latents of Fashion-MNIST's shape (4x7x7) with each kind's EM / default start."""
    import math

    import torch

    from molrmog.core.distributions import MoLRMoG
    from molrmog.core.samplers import generate
    from molrmog.core.schedules import get_schedule, make_grid
    from molrmog.models.kinds import LatentExpert, default_kinds, get_kind

    latent = (4, 7, 7)
    d = math.prod(latent)
    law = MoLRMoG.random(d, 1, d, n=10, r=4, seed=0, dtype=torch.float32)
    z = law.sample(4000, torch.Generator().manual_seed(0))[0]
    rows = []
    for kind in default_kinds():
        entry = get_kind(kind)
        opts = entry.options()
        e = LatentExpert.wrap(kind, latent, entry.build(latent, opts, get_schedule("vp").config(), 0))
        e.shift.copy_(z.mean(0))
        e.scale.copy_(z.std(0).clamp_min(1e-3))
        if entry.init_from_data is not None:
            entry.init_from_data(e.net, e.standardise(z), opts, 0)
        e = e.to(device).eval()
        mixture = hasattr(e.net, "mixture_for")
        big = 4096 if quick else 65536
        batch = big if mixture else (512 if quick else 8192)
        plans = [("heun", 30)] + ([("exact", s) for s in (1, 2, 4)] if mixture else [])
        for sampler, steps in plans:
            ts = make_grid(e.schedule, steps, "karras")

            @torch.no_grad()
            def draw(e=e, ts=ts, sampler=sampler, batch=batch):  # noise drawn on the device (a device generator)
                gen = torch.Generator(device).manual_seed(1)
                return generate(e, batch, d, e.schedule, ts, sampler, generator=gen, dtype=torch.float32, device=device)

            sec = median_seconds(draw, device, 3)
            rows.append({"kind": kind, "sampler": sampler, "steps": steps, "batch": batch,
                         "latents_per_s": batch / sec})
            print(f"sampling {kind:9s} {sampler:5s} {steps:2d} steps batch {batch:6d}: {batch / sec:14,.0f} latents/s",
                  flush=True)
    return rows


def profile(device: str, quick: bool) -> str:
    """torch.profiler tables of one closed-form score call (D=784 K=10, batch 65,536) and one MoG DSM training
    step (batch 8,192): the top operators by device time and the number of kernel launches."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    from molrmog.core import mixture as mx
    from molrmog.core.distributions import MoLRMoG
    from molrmog.core.losses import dsm_loss
    from molrmog.core.schedules import get_schedule
    from molrmog.models.kinds import LatentExpert, get_kind, headline_kinds

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sort = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    mix = MoLRMoG.random(784, 10, 16, 40, 4, seed=0, dtype=torch.float32).mixture.to(device)
    x = torch.randn(4096 if quick else 65536, 784, device=device)
    s, g = torch.tensor(0.8, device=device), torch.tensor(0.6, device=device)
    latent = (4, 7, 7)
    kind = headline_kinds()[0]  # the MoG expert
    entry = get_kind(kind)
    net = entry.build(latent, entry.options(), get_schedule("vp").config(), 0)
    e = LatentExpert.wrap(kind, latent, net).to(device)
    u = torch.randn(1024 if quick else 8192, 196, device=device)
    opt = torch.optim.Adam(e.parameters(), lr=1e-4, foreach=True)
    gen = torch.Generator(device).manual_seed(0)

    def step():
        loss = dsm_loss(e, u, e.schedule, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    text = []
    for name, fn in (("score", lambda: mx.score(mix, x, s, g)), ("mog_dsm_step", step)):
        with torch.no_grad() if name == "score" else torch.enable_grad():
            for _ in range(3):
                fn()
            _sync(device)
            with prof(activities=acts) as p:
                fn()
                _sync(device)
        ev = p.key_averages()
        kernels = sum(k.count for k in ev if str(k.device_type).endswith("CUDA"))
        text.append(f"== {name}: {kernels} device kernels\n" + ev.table(sort_by=sort, row_limit=14))
    return "\n".join(text)


def _run(cmd: list[str], log: Path, timeout: float) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    print(log.read_text()[-3000:], flush=True)
    if p.returncode:
        print(f"(exit {p.returncode})", flush=True)
    return time.perf_counter() - t0


def _table(r: dict) -> str:
    i = r["device"]
    lines = [f"# GPU suite: {i['name']} (torch {i['torch']}, CUDA {i['cuda']})", "",
             f"float32 GEMM {i['gemm_fp32_tflops']:.1f} TFLOP/s"
             + (f", TF32 {i['gemm_tf32_tflops']:.1f}" if "gemm_tf32_tflops" in i else ""), ""]
    if r.get("mixture"):
        lines += ["| score configuration | batch | path | evals/s | share of fp32 GEMM |", "|---|---:|---|---:|---:|"]
        for x in r["mixture"]["rows"]:
            lines.append(f"| D={x['D']} K={x['K']} d={x['d']} n={x['n']} r={x['r']} | {x['batch']:,} | {x['path']} | "
                         f"{x['evals_per_s']:,.0f} | {x['gemm_share']:.1%} |")
        lines.append("")
    if r.get("experts"):
        lines += ["| expert | parameters | batch | train samples/s |", "|---|---:|---:|---:|"]
        for x in r["experts"]["rows"]:
            for b, t in x["train"].items():
                lines.append(f"| {x['kind']} | {x['parameters']:,} | {b} | {t['samples_per_s']:,.0f} |")
        for name, q in r["experts"]["ratios"].items():
            lines.append(f"\n{name}: training samples/s ratio {q['train_samples_per_s_best_batch']:.1f}x "
                         f"(each at its best batch), parameters {q['parameters']:.1f}x")
        lines.append("")
    if r.get("sampling"):
        lines += ["| expert | sampler | steps | batch | latents/s |", "|---|---|---:|---:|---:|"]
        for x in r["sampling"]:
            lines.append(f"| {x['kind']} | {x['sampler']} | {x['steps']} | {x['batch']:,} | "
                         f"{x['latents_per_s']:,.0f} |")
        lines.append("")
    if r.get("compare"):
        c = r["compare"]
        lines += [f"digits compare --budget {c['budget']} on {i['device']}: {c['seconds']:.0f} s", "",
                  "| kind | seconds | FID |", "|---|---:|---:|"]
        for x in c["quality_vs_time"]:
            lines.append(f"| {x['kind']} | {x['seconds']:.1f} | {x['fid']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="runs/gpu_suite")
    ap.add_argument("--quick", action="store_true", help="small sizes (a dry run of every code path on a CPU)")
    ap.add_argument("--budget", type=float, default=30.0, help="seconds per expert kind in the digits compare")
    ap.add_argument("--skip", default="", help="comma list of stages to skip: mixture,experts,sampling,profile,compare")
    ap.add_argument("--expert-kinds", default="mog,gaussian,unet", help="kinds for bench_experts")
    ap.add_argument("--expert-batches", default=None, help="training batches for bench_experts")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one in-process stage
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.stage == "device":
        (out / "device.json").write_text(json.dumps(device_info(a.device), indent=2))
        return 0
    if a.stage == "profile":
        (out / "profile.txt").write_text(profile(a.device, a.quick))
        return 0
    if a.stage == "sampling":
        (out / "sampling.json").write_text(json.dumps(sampling(a.device, a.quick), indent=2))
        return 0
    skip = set(filter(None, a.skip.split(",")))
    py = sys.executable
    me = [py, str(Path(__file__).resolve()), "--device", a.device, "--out", str(out)] + (["--quick"] if a.quick else [])
    result: dict = {}

    def load(name):  # a stage that failed leaves no JSON: the table says so instead of stopping the suite
        f = out / name
        return json.loads(f.read_text()) if f.is_file() else None

    _run(me + ["--stage", "device"], out / "device.log", 300)
    result["device"] = load("device.json")
    if "mixture" not in skip:
        batches = "1024" if a.quick else "4096,65536"
        _run([py, str(HERE / "bench_mixture.py"), "--device", a.device, "--batches", batches, "--repeats",
              "3" if a.quick else "7", "--json", str(out / "mixture.json")], out / "mixture.log", 600)
        result["mixture"] = load("mixture.json")
    if "experts" not in skip:
        batches = a.expert_batches or ("128,1024" if a.quick else "128,1024,8192,65536")
        _run([py, str(HERE / "bench_experts.py"), "--device", a.device, "--batches", batches, "--repeats",
              "3", "--steps", "5" if a.quick else "20", "--sample-batch", "256", "--kinds", a.expert_kinds,
              "--json", str(out / "experts.json")], out / "experts.log", 900)
        result["experts"] = load("experts.json")
    if "sampling" not in skip:
        _run(me + ["--stage", "sampling"], out / "sampling.log", 600)
        result["sampling"] = load("sampling.json")
    if "profile" not in skip:
        _run(me + ["--stage", "profile"], out / "profile.log", 300)
    if "compare" not in skip:
        run = out / "digits"
        cmd = [py, "-m", "molrmog.cli", "compare", "--dataset", "digits", "--device", a.device, "--budget",
               str(a.budget), "--no-unified", "--no-progress", "--out", str(run), "--cache", str(out / "cache")]
        if a.quick:
            cmd += ["--vae-steps", "100", "--samples", "200", "--reference", "500"]
        sec = _run(cmd, out / "compare.log", 1200)
        q = load("digits/quality_vs_time.json")
        points = [{k: x[k] for k in ("kind", "seconds", "fid")} for x in q["rows"]] if q else None
        result["compare"] = q and {"budget": a.budget, "seconds": sec, "quality_vs_time": points}
    (out / "suite.json").write_text(json.dumps(result, indent=2))
    table = _table(result)
    (out / "suite.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
