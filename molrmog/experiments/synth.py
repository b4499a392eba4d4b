"""`molrmog synth`: sample a random MoLR-MoG with the exact score and compare with the truth."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from molrmog.core.distributions import MoLRMoG
from molrmog.core.errors import MolrmogError
from molrmog.core.metrics import energy_distance, mode_weight_error, sliced_w2
from molrmog.core.options import int_list, option
from molrmog.core.outputs import pyplot, save_figure, write_json
from molrmog.core.samplers import SAMPLERS, generate
from molrmog.core.schedules import GRIDS, SCHEDULES, make_grid


@dataclass(frozen=True)
class SynthOptions:
    """The flags of `molrmog synth`."""

    D: int = option(64, "ambient dimension", low=1, high=100_000, flag="--D")
    K: int = option(3, "number of subspaces", low=1, high=1000, flag="--K")
    d: int | tuple[int, ...] = option(4, "latent dimension d_k: an int or a comma list per k", parse=int_list,
                                      low=1, high=100_000, flag="--d")
    n: int | tuple[int, ...] = option(3, "modes n_k per subspace: an int or a comma list", parse=int_list, low=1,
                                      high=10_000, flag="--n")
    r: int | tuple[int, ...] | None = option(None, "rank r_k of each mode's factor (default d_k)", parse=int_list,
                                             low=1, high=100_000, flag="--r")
    separation: float = option(5.0, "typical norm of the latent means", low=0, high=1e6)
    schedule: str = option("vp", "noise schedule", choices=SCHEDULES.names)
    sampler: str = option("heun", "sampler", choices=SAMPLERS.names)
    grid: str = option("karras", "time grid", choices=GRIDS.names)
    steps: int = option(30, "sampler steps", low=1, high=10_000)
    samples: int = option(2000, "points to generate (and to draw from the truth, twice)", low=2, high=10_000)
    out: str = option("runs/synth", "output directory")


MAX_BYTES = 4 * 2**30  # what a synth command may hold in its largest arrays (float64)


def check_size(o: SynthOptions) -> None:
    """Refuse sizes whose arrays together (subspaces, means and factors, the samples) would pass MAX_BYTES:
    each option may be within its range while their product is not."""
    def top(v):
        return max(v) if isinstance(v, tuple) else (v or 0)

    d, n = top(o.d), top(o.n)
    r = top(o.r) or d
    need = 8 * (o.K * o.D * d + o.K * n * d * (r + 1) + 4 * o.samples * o.D + o.samples * o.K * n * (r + 1))
    if need > MAX_BYTES:
        raise MolrmogError(f"D = {o.D}, K = {o.K}, d = {d}, n = {n}, r = {r} with {o.samples} samples would need about "
                           f"{need / 2**30:.0f} GiB (limit {MAX_BYTES / 2**30:.0f} GiB); lower D, K, d or n")


def run_synth(out: str | Path, *, D: int = 64, K: int = 3, d=4, n=3, r=None, separation: float = 5.0,
              schedule: str = "vp", sampler: str = "heun", steps: int = 30, grid: str = "karras",
              samples: int = 2000, seed: int = 0, device: str = "cpu", progress: bool = True) -> dict:
    """Draw a random MoLR-MoG, generate with the exact score, write synth.png and synth.json."""
    dist = MoLRMoG.random(D, K, d, n, r, separation=separation, seed=seed, schedule=schedule)  # validates first
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dist.save(out / "distribution")
    g = torch.Generator().manual_seed(seed + 1)
    x_data, lab_data = dist.sample(samples, generator=g)
    x_ref, _ = dist.sample(samples, generator=g)  # a second true sample: the metrics' noise floor

    sched = dist.schedule
    ts = make_grid(sched, steps, grid)
    t0 = time.perf_counter()
    x_gen = generate(dist.score, samples, D, sched, ts, sampler, generator=g, device=device,
                     progress=progress).cpu()
    elapsed = time.perf_counter() - t0

    # label generated points by their most responsible component at t_min
    R = dist.responsibilities(x_gen, sched.t_min).flatten(1)
    lab_gen = R.argmax(1)
    L = dist.mixture.L
    flat_true = lab_data[:, 0] * L + lab_data[:, 1]
    weights = dist.mode_weights.flatten()
    gp = torch.Generator().manual_seed(seed + 2)
    result = {
        "config": {"D": D, "K": K, "d": dist.d, "n": dist.n, "r": dist.r, "separation": separation,
                   "schedule": schedule, "sampler": sampler, "steps": steps, "grid": grid,
                   "samples": samples, "seed": seed},
        "energy_distance": energy_distance(x_gen, x_data),
        "energy_distance_true_vs_true": energy_distance(x_ref, x_data),
        "sliced_w2": sliced_w2(x_gen, x_data, generator=gp),
        "sliced_w2_true_vs_true": sliced_w2(x_ref, x_data, generator=torch.Generator().manual_seed(seed + 2)),
        "mode_weights_generated": mode_weight_error(lab_gen, weights),
        "mode_weights_data": mode_weight_error(flat_true, weights),
        "sampling_seconds": elapsed,
        "score_evaluations": steps * (2 if sampler == "heun" else 1) + 1,
    }
    write_json(out / "synth.json", result)
    _plot(out / "synth.png", x_data, lab_data[:, 0], x_gen, lab_gen // L, result)
    return result


def _plot(path: Path, x_data, k_data, x_gen, k_gen, result) -> None:
    plt = pyplot()
    # 2-D projection: the top two principal directions of the data
    mean = x_data.mean(0)
    _, _, V = torch.linalg.svd(x_data - mean, full_matrices=False)
    P = V[:2].T
    pd, pg = ((x_data - mean) @ P).numpy(), ((x_gen - mean) @ P).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
    for ax, pts, k, title in ((axes[0], pd, k_data, "data (true subspace k)"),
                              (axes[1], pg, k_gen, "generated, exact score (assigned k)")):
        ax.scatter(pts[:, 0], pts[:, 1], c=k.numpy(), cmap="tab10", s=4, alpha=0.6, vmin=0, vmax=9)
        ax.set_title(title)
        ax.set_xlabel("PC 1")
    axes[0].set_ylabel("PC 2")
    fig.suptitle(f"energy distance {result['energy_distance']:.4f} "
                 f"(true vs true {result['energy_distance_true_vs_true']:.4f}); "
                 f"sliced W2 {result['sliced_w2']:.3f}")
    fig.tight_layout()
    save_figure(fig, path)
