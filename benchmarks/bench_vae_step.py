"""A dataset's VAE training step on the CPU (issue 18's study): batch size, channels-last memory format and
`torch.compile`, each against the plain step, in one run.

The VAE is the dataset's default (`--dataset`: Fashion-MNIST's ConvVAE is 28x28 -> 4x7x7, width 16, Bernoulli
loss; digits' 8x8 -> 2x4x4, width 32); the data are random images (the step's cost does not depend on them).
For each setting, `--repeats` blocks of `--steps` Adam steps are timed after a warm-up (for `compile`, the
warm-up holds the compilation, reported apart); the medians of the blocks are printed as ms per step and
images per second, with the ratio to the plain step of that batch.

    python benchmarks/bench_vae_step.py [--dataset fashion-mnist|digits|...] [--batches 32,128] [--steps 100]
        [--repeats 5] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from molrmog.models.layouts import new_vae
from molrmog.models.vae import vae_loss
from molrmog.pipeline.config import RunConfig, resolve_config

SHAPES = {"digits": (1, 8, 8), "fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def measure(dataset: str, setting: str, batch: int, steps: int, repeats: int) -> dict:
    shape = SHAPES[dataset]
    model = new_vae(resolve_config(RunConfig(dataset=dataset), shape), shape, seed=0)
    if setting == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4096, *shape, generator=g)
    if setting == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    loss_fn = torch.compile(vae_loss) if setting == "compile" else vae_loss
    opt = torch.optim.Adam(model.parameters(), 4e-3)

    def step():
        loss = loss_fn(model, x[torch.randint(0, x.shape[0], (batch,), generator=g)], g)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(5):
        step()
    warmup = time.perf_counter() - t0
    blocks = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        blocks.append((time.perf_counter() - t0) / steps)
    ms = 1000 * statistics.median(blocks)
    return {"setting": setting, "batch": batch, "ms_per_step": ms, "images_per_s": batch / ms * 1000,
            "warmup_s": warmup, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(SHAPES), help="whose default VAE")
    p.add_argument("--batches", default="32,128")
    p.add_argument("--settings", default="plain,channels_last,compile")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's; a run with "
                   "--workers 2 gives each VAE 1 on 2 cores)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for batch in (int(b) for b in a.batches.split(",")):
        plain = None
        for setting in a.settings.split(","):
            try:
                r = measure(a.dataset, setting, batch, a.steps, a.repeats)
            except Exception as e:  # torch.compile needs a C++ compiler; say so and go on
                print(f"batch {batch:4d} {setting:14s} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                continue
            plain = r["ms_per_step"] if setting == "plain" else plain
            r["ratio_to_plain"] = plain / r["ms_per_step"] if plain else None
            rows.append(r)
            ratio = f"{r['ratio_to_plain']:.2f}x" if r["ratio_to_plain"] else "-"
            print(f"batch {batch:4d} {setting:14s} {r['ms_per_step']:7.2f} ms/step  {r['images_per_s']:8.0f} "
                  f"images/s  {ratio} the plain step  (warm-up {r['warmup_s']:.1f} s, {r['threads']} threads)",
                  flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
