"""Expert-parallel speed-up: the expert stage of a digits run (10 clusters) with 1 worker vs N.

The VAEs are trained once; then the expert stage (one task per cluster: encode the cluster's
images, train its latent expert, save it) is timed from scratch with each worker count and
executor, medians over repeats, all in one run. Worker start-up (spawning processes, importing
torch) is part of the measured time, as it is for a user. With --device cuda the stage is also
timed on the GPU.

    python benchmarks/bench_parallel.py [--kind mog] [--workers 2] [--repeats 3] [--executor local|ray]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from molrmog.models.kinds import get_kind, headline_kinds, kind_names
from molrmog.pipeline.config import RunConfig
from molrmog.pipeline.stages import expert_task, train_run
from molrmog.training.executors import Executor, Task, run_tasks


def expert_stage(run: Path, kind: str, K: int, ex: Executor) -> float:
    for d in [run / "experts" / kind, *(run / "checkpoints").glob(f"{kind}-*")]:
        shutil.rmtree(d, ignore_errors=True)
    tasks = [Task(f"{kind}-{k}", expert_task, (str(run), kind, k)) for k in range(K)]
    t0 = time.perf_counter()
    run_tasks(tasks, ex, progress=False)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default=headline_kinds()[0], choices=kind_names())
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400, help="expert training steps (default 400, as make demo)")
    ap.add_argument("--executor", default="local", choices=["local", "ray"])
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to add the GPU figures")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cfg = RunConfig(dataset="digits", experts=(a.kind,),
                        expert_options={a.kind: get_kind(a.kind).options(steps=a.steps)})
        train_run(run, cfg, progress=False)  # VAEs (and one expert stage, discarded)
        K = 10
        rows = []
        for w in sorted({1, a.workers}):
            kinds = ["local"] if w == 1 else sorted({"local", a.executor})
            for kind in kinds:
                ex = Executor(kind, w)
                times = [expert_stage(run, a.kind, K, ex) for _ in range(a.repeats)]
                rows.append((f"{kind}, {w} worker(s)", statistics.median(times), times))
        if a.device.startswith("cuda"):
            import json

            cfg_path = run / "config.json"
            c = json.loads(cfg_path.read_text())
            c["device"] = a.device
            cfg_path.write_text(json.dumps(c))  # (a scratch run of this benchmark)
            times = [expert_stage(run, a.kind, K, Executor(device=a.device)) for _ in range(a.repeats)]
            rows.append((f"local, 1 worker, {a.device}", statistics.median(times), times))
        base = rows[0][1]
        print(f"expert stage: 10 digit clusters, {a.kind} experts, {a.steps} steps each, medians of {a.repeats}")
        for name, med, times in rows:
            print(f"{name:28s} {med:7.2f} s  speed-up {base / med:4.2f}x   (runs: "
                  f"{', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
