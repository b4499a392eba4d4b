"""Training step rates alone and beside a busy process, today's thread settings against molrmog's, in one run.

Workloads (the step of each stage of a run): a digits ConvVAE (batch 128), a MoG expert and a U-Net expert
on 196-dim latents (Fashion-MNIST's 4x7x7, batch 128). Settings:
- default: torch's own choice (one intra-op thread per core, OpenMP threads spin a while when they wait);
- passive: the same threads with OMP_WAIT_POLICY=PASSIVE (idle threads sleep at once);
- molrmog: what a molrmog training task does -- `molrmog.training.threads.choose_threads()`, the cores other
  processes leave free (it looks again at every checkpoint).
The busy process is a second torch process doing 512x512 matrix products on one thread (another
experiment, a notebook). Every measurement is a fresh process (the wait policy is read when torch
loads); medians over repeats of steps/s.

    python benchmarks/bench_threads.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import sys, time, torch
from molrmog.training.threads import choose_threads
setting, workload, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
if setting == "molrmog":
    torch.set_num_threads(choose_threads())
threads = torch.get_num_threads()
g = torch.Generator().manual_seed(0)
if workload == "vae":
    from molrmog.models.vae import ConvVAE, vae_loss
    model = ConvVAE(image_shape=(1, 8, 8), latent=(2, 4, 4), width=32, seed=0)
    x = torch.rand(1000, 1, 8, 8, generator=g)
    loss = lambda: vae_loss(model, x[torch.randint(0, 1000, (128,), generator=g)], g)
else:
    from molrmog.models.kinds import LatentExpert, get_kind
    from molrmog.core.losses import dsm_loss
    from molrmog.core.schedules import get_schedule
    entry = get_kind(workload)
    net = entry.build((4, 7, 7), entry.options(), get_schedule("vp").config(), 0)
    model = LatentExpert.wrap(workload, (4, 7, 7), net)
    u = torch.randn(4000, 196, generator=g)
    loss = lambda: dsm_loss(model, u[torch.randint(0, 4000, (128,), generator=g)], model.schedule, generator=g)
opt = torch.optim.Adam(model.parameters(), 1e-4)
def step():
    l = loss(); opt.zero_grad(); l.backward(); opt.step()
for _ in range(max(2, steps // 10)):
    step()
t0 = time.perf_counter()
for _ in range(steps):
    step()
print(steps / (time.perf_counter() - t0), threads)
"""

BUSY = r"""
import torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


def _steps(workload: str) -> int:
    from molrmog.models.kinds import baseline_kinds

    return 15 if workload in baseline_kinds() else 200  # the U-Net's steps are ~10x slower


def _default_workloads() -> str:
    from molrmog.models.kinds import baseline_kinds, headline_kinds

    return ",".join(["vae", *headline_kinds(), *baseline_kinds()])


def measure(setting: str, workload: str, steps: int) -> tuple[float, int]:
    env = dict(os.environ)
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MOLRMOG_THREADS"):
        env.pop(k, None)
    if setting == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run([sys.executable, "-c", CHILD, setting, workload, str(steps)], env=env, check=True,
                         capture_output=True, text=True, timeout=900).stdout.split()
    return float(out[0]), int(out[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workloads", default=_default_workloads(), help="vae and/or expert kinds")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    for busy in (False, True):
        proc = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
        if proc:
            time.sleep(2)  # the busy process is running
        try:
            for workload in a.workloads.split(","):
                for setting in ("default", "passive", "molrmog"):
                    runs = [measure(setting, workload, _steps(workload)) for _ in range(a.repeats)]
                    rate = statistics.median(r[0] for r in runs)
                    rows.append({"workload": workload, "setting": setting, "busy": busy, "steps_per_s": rate,
                                 "threads": sorted({r[1] for r in runs})})
                    print(f"{'beside a busy process' if busy else 'alone':22s} {workload:5s} {setting:8s} "
                          f"{rate:9.1f} steps/s  threads {rows[-1]['threads']}", flush=True)
        finally:
            if proc:
                proc.kill()
                proc.wait()
    print("\nslowdown beside the busy process (alone / beside), and molrmog's rate alone against the default's:")
    by = {(r["workload"], r["setting"], r["busy"]): r["steps_per_s"] for r in rows}
    for workload in a.workloads.split(","):
        d = by[(workload, "default", False)] / by[(workload, "default", True)]
        m = by[(workload, "molrmog", False)] / by[(workload, "molrmog", True)]
        p = by[(workload, "passive", False)] / by[(workload, "passive", True)]
        alone = by[(workload, "molrmog", False)] / by[(workload, "default", False)]
        p_alone = by[(workload, "passive", False)] / by[(workload, "default", False)]
        print(f"{workload:5s} beside a busy process: default {d:5.1f}x slower, passive {p:5.1f}x, molrmog {m:5.1f}x; "
              f"alone, against the default's rate: passive {p_alone:.2f}x, molrmog {alone:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpus": os.cpu_count(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
