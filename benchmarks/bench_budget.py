"""How closely a wall-clock training budget is kept: a MoG expert trained with `fit(time_budget=B)` for several B
on this machine, the elapsed time it reports against B (median over repeats; a timing, so it lives here and
not in the tests, which check the budget logic with an injected clock).

    python benchmarks/bench_budget.py [--budgets 1,3,6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from molrmog.core.distributions import MoLRMoG
from molrmog.models.experts import MoGExpert
from molrmog.training.train import train_score


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="1,3,6", help="comma list of seconds")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    x = MoLRMoG.random(32, 1, 32, n=8, r=4, seed=0, dtype=torch.float32).sample(
        3000, torch.Generator().manual_seed(0))[0]
    print("budget (s)  elapsed reported (s)  wall clock (s)  overshoot (median)")
    for b in (float(v) for v in a.budgets.split(",")):
        rows = []
        for r in range(a.repeats):
            net = MoGExpert(32, n=8, r=4, seed=r)
            t0 = time.perf_counter()
            h = train_score(net, x, steps=10**7, batch_size=128, lr=1e-3, seed=r, progress=False, time_budget=b)
            rows.append((h["elapsed"], time.perf_counter() - t0))
        el, wall = statistics.median(e for e, _ in rows), statistics.median(w for _, w in rows)
        print(f"{b:10.1f}  {el:20.3f}  {wall:14.3f}  {(el - b) / b:+.1%}")


if __name__ == "__main__":
    main()
