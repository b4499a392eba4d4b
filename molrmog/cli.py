"""The `molrmog` command line."""

from __future__ import annotations

import argparse
import json
import sys

from .executors import TasksFailed
from .samplers import SAMPLERS
from .train import TrainingDiverged

__all__ = ["main", "build_parser"]

SAMPLER_NAMES = list(SAMPLERS)


def _int_list(text: str) -> int | list[int]:
    """'4' -> 4, '4,6,8' -> [4, 6, 8]."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        msg = f"expected an integer or a comma-separated list, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals[0] if len(vals) == 1 else vals


def _device(text: str) -> str:
    if text not in ("cpu", "cuda") and not text.startswith("cuda:"):
        raise argparse.ArgumentTypeError(f"device must be cpu or cuda[:N], got {text!r}")
    return text


def add_executor_options(p) -> None:
    """--executor / --workers / --ray-address (see molrmog.executors)."""
    g = p.add_argument_group("parallel execution")
    g.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local (default: in this process, or a process pool with --workers N) or ray "
                   "(one Ray task per expert / sweep point; pip install 'molrmog[ray]')")
    g.add_argument("--workers", type=int, default=1,
                   help="local: processes; ray: CPUs of the local Ray runtime (default 1)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting one")


def executor_from(a, device: str = "cpu"):
    from .executors import Executor

    if a.ray_address and a.executor != "ray":
        raise ValueError("--ray-address needs --executor ray")
    return Executor(a.executor, a.workers, a.ray_address, device)


def _add_synth(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="sample a random MoLR-MoG with its exact score (PF-ODE) and compare with the truth",
        description="Draw a random MoLR-MoG, run the probability-flow ODE with the exact closed-form "
        "score, and write synth.png (2-D projection of data vs generated points, coloured by subspace) "
        "and synth.json (energy distance, sliced W2, mode-weight error) into --out.",
    )
    p.add_argument("--D", type=int, default=64, help="ambient dimension (default 64)")
    p.add_argument("--K", type=int, default=3, help="number of subspaces (default 3)")
    p.add_argument("--d", type=_int_list, default=4,
                   help="latent dimension d_k: int or list per k (default 4)")
    p.add_argument("--n", type=_int_list, default=3, help="modes n_k per subspace: int or list (default 3)")
    p.add_argument("--r", type=_int_list, default=None, help="rank r_k of each mode's factor (default d_k)")
    p.add_argument("--separation", type=float, default=5.0, help="typical norm of latent means (default 5)")
    p.add_argument("--schedule", choices=["vp", "ve", "cosine"], default="vp")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default="heun")
    p.add_argument("--grid", choices=["uniform", "logsnr", "karras"], default="karras")
    p.add_argument("--steps", type=int, default=30, help="sampler steps (default 30)")
    p.add_argument("--samples", type=int, default=2000, help="points to generate (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", default="runs/synth", help="output directory (default runs/synth)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(a) -> int:
    from .experiments.synth import run_synth

    if a.steps < 1 or a.samples < 2:
        raise ValueError("--steps must be >= 1 and --samples >= 2")
    res = run_synth(a.out, D=a.D, K=a.K, d=a.d, n=a.n, r=a.r, separation=a.separation,
                    schedule=a.schedule, sampler=a.sampler, steps=a.steps, grid=a.grid,
                    samples=a.samples, seed=a.seed, device=a.device, progress=not a.no_progress)
    summary = {k: res[k] for k in ("energy_distance", "energy_distance_true_vs_true", "sliced_w2",
                                   "sliced_w2_true_vs_true")}
    summary["mode_weight_max_abs_error"] = res["mode_weights_generated"]["max_abs"]
    print(json.dumps(summary, indent=2))
    print(f"wrote {a.out}/synth.png and {a.out}/synth.json")
    return 0


def _shape(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        vals = []
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected a latent shape c,h,w (e.g. 4,7,7), got {text!r}")
    return vals


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train VAEs and latent experts on an image dataset",
        description="Train one VAE per cluster (or one unified VAE, or a shared backbone with per-cluster "
        "LoRA adapters) and a small latent expert per cluster for each expert kind; write a run "
        "directory with models, losses, loss curves, sample grids and report.md. Checkpoints are "
        "written every --checkpoint-every steps; --resume RUN continues a stopped run.")
    _add_run_options(p)
    p.add_argument("--experts", default="mog,gaussian,unet", help="comma list of mog, gaussian, unet")
    p.add_argument("--vae", default="dedicated", help="dedicated (default), unified or lora")
    p.add_argument("--out", default="runs/train", help="run directory (default runs/train)")
    p.add_argument("--resume", metavar="RUN", default=None,
                   help="continue the run in RUN (its saved settings are used; other options are ignored)")
    add_executor_options(p)
    p.set_defaults(func=_cmd_train)


def _add_run_options(p) -> None:
    """Dataset and training options shared by `train` and `compare`."""
    from .pipeline import RunConfig

    d = RunConfig()
    p.add_argument("--dataset", default=d.dataset, help="digits (default), fashion-mnist or folder:PATH")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files "
                   "(default $MOLRMOG_DATA/fashion-mnist, else /usr/share/datasets/fashion-mnist)")
    p.add_argument("--limit", type=int, default=None, help="use a random subset of this many images")
    p.add_argument("--size", type=int, default=d.size, help="image size for folder datasets (default 28)")
    p.add_argument("--channels", type=int, default=d.channels, choices=[1, 3])
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    p.add_argument("--clusters", type=int, default=None,
                   help="cluster with k-means on unified-VAE features instead of using labels")
    p.add_argument("--latent", type=_shape, default=None, help="latent c,h,w (digits 2,4,4; fashion 4,7,7)")
    p.add_argument("--modes", type=int, default=d.modes, help="MoG modes n_k per expert (default 10)")
    p.add_argument("--rank", type=int, default=d.rank, help="rank r of MoG / Gaussian factors (default 4)")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--vae-width", type=int, default=d.vae_width, help="VAE base channels (default 32)")
    p.add_argument("--vae-beta", type=float, default=d.vae_beta, help="KL weight of the VAEs (default 0.1)")
    p.add_argument("--expert-steps", type=int, default=d.expert_steps)
    p.add_argument("--unet-steps", type=int, default=d.unet_steps, help="steps for U-Net experts")
    p.add_argument("--unet-width", type=int, default=d.unet_width)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--sampler", default=d.sampler, choices=SAMPLER_NAMES)
    p.add_argument("--sample-steps", type=int, default=d.sample_steps)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _run_config(a, **fixed):
    from .pipeline import RunConfig

    kw = dict(dataset=a.dataset, data_dir=a.data_dir, limit=a.limit, size=a.size,
              channels=a.channels, skip_bad=a.skip_bad, clusters=a.clusters,
              latent=a.latent, modes=a.modes, rank=a.rank, vae_steps=a.vae_steps,
              vae_beta=a.vae_beta, vae_width=a.vae_width,
              expert_steps=a.expert_steps, unet_steps=a.unet_steps, unet_width=a.unet_width,
              batch=a.batch, sampler=a.sampler, sample_steps=a.sample_steps,
              checkpoint_every=a.checkpoint_every, seed=a.seed, device=a.device)
    kw.update(fixed)
    return RunConfig(**kw)


def _cmd_train(a) -> int:
    from .pipeline import train_run

    if a.resume:
        from .pipeline import load_config

        ex = executor_from(a, load_config(a.resume).device)
        report = train_run(a.resume, resume=True, progress=not a.no_progress, executor=ex)
        out = a.resume
    else:
        cfg = _run_config(a, experts=[e.strip() for e in a.experts.split(",") if e.strip()], vae=a.vae)
        report = train_run(a.out, cfg, progress=not a.no_progress, executor=executor_from(a, cfg.device))
        out = a.out
    print(json.dumps(report, indent=2))
    print(f"wrote {out}/report.md and sample grids")
    return 0


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate images from a trained run",
                       description="Generate images with one expert kind of a trained run: a cluster is "
                       "drawn by its weight (or fixed with --class), its latent is sampled with the "
                       "sampler and decoded by that cluster's VAE. Writes a PNG grid (and .npy with --npy).")
    p.add_argument("run", help="run directory written by molrmog train")
    p.add_argument("--kind", default="mog", choices=["mog", "gaussian", "unet"])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--class", dest="cls", type=int, default=None, help="cluster / class index")
    p.add_argument("--sampler", default=None, choices=SAMPLER_NAMES)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--out", default=None, help="PNG path (default RUN/sample_<kind>.png)")
    p.add_argument("--npy", action="store_true", help="also write the images as .npy")
    add_executor_options(p)
    p.set_defaults(func=_cmd_sample)


def _cmd_sample(a) -> int:
    from pathlib import Path

    import numpy as np

    from .pipeline import sample_run
    from .report import save_grid

    if a.steps is not None and a.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {a.steps}")
    imgs, ks = sample_run(a.run, a.kind, a.n, a.cls, a.sampler, a.steps, a.seed, a.device, progress=True,
                          executor=executor_from(a, a.device))
    out = Path(a.out or Path(a.run) / f"sample_{a.kind}.png")
    save_grid(out, imgs, min(8, a.n))
    if a.npy:
        np.save(out.with_suffix(".npy"), imgs.numpy())
    print(f"wrote {out}" + (f" and {out.with_suffix('.npy')}" if a.npy else ""))
    return 0


def _add_featurizer(sub) -> None:
    p = sub.add_parser("featurizer", help="train the offline feature extractor (classifier) of a dataset",
                       description="Train a small CNN classifier on the dataset's train split, once; it is "
                       "cached (config.json + model.safetensors + featurizer.json with its test accuracy) "
                       "under --cache, $MOLRMOG_CACHE or ~/.cache/molrmog. Its penultimate features serve "
                       "FID, KID, precision/recall and the similarity scores; its softmax the class score.")
    p.add_argument("--dataset", default="digits", help="digits (default), fashion-mnist or folder:PATH")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--size", type=int, default=28, help="image size for folder datasets (default 28)")
    p.add_argument("--channels", type=int, default=1, choices=[1, 3])
    p.add_argument("--steps", type=int, default=None, help="training steps (default digits 600, "
                   "fashion-mnist 2500, folders 2000)")
    p.add_argument("--cache", default=None, help="cache folder (default $MOLRMOG_CACHE or ~/.cache/molrmog)")
    p.add_argument("--force", action="store_true", help="retrain even when a finished featurizer is cached")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_featurizer)


def _cmd_featurizer(a) -> int:
    from .featurizer import featurizer_dir, train_featurizer

    m = train_featurizer(a.dataset, cache=a.cache, steps=a.steps, seed=a.seed, size=a.size,
                         channels=a.channels, data_dir=a.data_dir, device=a.device,
                         progress=not a.no_progress, force=a.force)
    print(json.dumps({"dataset": a.dataset, "test_accuracy": round(float(m.test_accuracy), 4),
                      "parameters": m.num_parameters()}, indent=2))
    print(f"featurizer in {featurizer_dir(a.dataset, a.cache)}")
    return 0


def _add_eval_options(p) -> None:
    p.add_argument("--samples", type=int, default=1000, help="samples per model (default 1000)")
    p.add_argument("--reference", type=int, default=10000, help="training images for FID/KID (default 10000)")
    p.add_argument("--cache", default=None, help="featurizer cache (default $MOLRMOG_CACHE or ~/.cache/molrmog)")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="FID, KID, precision/recall, class and similarity scores of a run",
                       description="Sample every expert kind of a trained run (and the memorisation baseline: "
                       "the exact denoiser of each cluster's empirical latent distribution) and measure FID, "
                       "KID, precision/recall against the training images and the class score in the "
                       "features of the dataset's own classifier (`molrmog featurizer`, trained first if "
                       "missing); generalisation, reproducibility and probability-flow distance between "
                       "models from shared noise. The test split is measured alongside as the floor. Writes "
                       "evaluation.json, evaluation.md and evaluation_samples.png into RUN.")
    p.add_argument("run", help="run directory written by molrmog train")
    _add_eval_options(p)
    p.add_argument("--kinds", default=None, help="comma list of expert kinds (default: all in the run)")
    p.add_argument("--no-memorisation", action="store_true", help="skip the memorisation baseline")
    p.add_argument("--threshold", type=float, default=0.6, help="similarity threshold (default 0.6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_evaluate)


def _kinds(text):
    return None if text is None else [k.strip() for k in text.split(",") if k.strip()]


def _cmd_evaluate(a) -> int:
    from .evaluation import evaluate_run

    evaluate_run(a.run, samples=a.samples, reference=a.reference, kinds=_kinds(a.kinds),
                 memorisation=not a.no_memorisation, threshold=a.threshold, cache=a.cache, seed=a.seed,
                 device=a.device, progress=not a.no_progress)
    print(open(f"{a.run}/evaluation.md").read())
    print(f"wrote {a.run}/evaluation.json, evaluation.md and evaluation_samples.png")
    return 0


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="analyses of trained runs (jacobian)",
                       description="Analyses of a trained run.")
    asub = p.add_subparsers(dest="analysis", metavar="NAME", required=True)
    j = asub.add_parser("jacobian", help="singular values of the denoiser's Jacobian per expert kind and t",
                        description="Singular values of d x0_hat / d x_t of each expert kind's latent denoiser "
                        "(and the memorisation baseline) at noised training latents of one cluster, for "
                        "several t; numerical rank = number of singular values above --tol times the largest. "
                        "Writes jacobian.csv, jacobian.json and jacobian.png into --out (default RUN/jacobian).")
    j.add_argument("run", help="run directory written by molrmog train")
    j.add_argument("--t", type=lambda v: [float(x) for x in v.split(",")], default=[0.02, 0.1, 0.3, 0.6, 1.0],
                   help="comma list of times in (0, 1] (default 0.02,0.1,0.3,0.6,1.0)")
    j.add_argument("--cluster", type=int, default=0, help="cluster whose latents are used (default 0)")
    j.add_argument("--points", type=int, default=8, help="points per t (default 8)")
    j.add_argument("--tol", type=float, default=1e-2, help="relative tolerance of the numerical rank")
    j.add_argument("--kinds", default=None, help="comma list of expert kinds (default: all in the run)")
    j.add_argument("--no-memorisation", action="store_true", help="skip the memorisation baseline")
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    j.add_argument("--out", default=None, help="output folder (default RUN/jacobian)")
    j.set_defaults(func=_cmd_jacobian)


def _cmd_jacobian(a) -> int:
    from .evaluation import jacobian_spectra

    res = jacobian_spectra(a.run, kinds=_kinds(a.kinds), ts=a.t, cluster=a.cluster, points=a.points, tol=a.tol,
                           memorisation=not a.no_memorisation, seed=a.seed, device=a.device, out=a.out)
    ranks = {m: {t: v["rank_median"] for t, v in per_t.items()} for m, per_t in res["models"].items()}
    print(json.dumps({"numerical_rank_median": ranks}, indent=2))
    print(f"wrote {a.out or a.run + '/jacobian'}/jacobian.csv, jacobian.json and jacobian.png")
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="MoG vs Gaussian vs U-Net experts (and dedicated vs unified VAE)",
                       description="Train (or resume) OUT/dedicated with MoG, Gaussian and U-Net experts on one "
                       "VAE per cluster and OUT/unified with MoG experts on one shared VAE, evaluate both "
                       "(see `molrmog evaluate`) and write comparison.md, comparison.json, "
                       "comparison_samples.png (rows MoG / Gaussian / U-Net / MoG on the unified VAE) and "
                       "comparison_losses.png into OUT.")
    _add_run_options(p)
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--no-unified", action="store_true", help="skip the unified-VAE ablation")
    _add_eval_options(p)
    add_executor_options(p)
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(a) -> int:
    from .compare import compare

    cfg = _run_config(a)
    compare(a.out, cfg, unified=not a.no_unified, samples=a.samples, reference=a.reference,
            cache=a.cache, progress=not a.no_progress, executor=executor_from(a, cfg.device))
    print(open(f"{a.out}/comparison.md").read())
    print(f"wrote {a.out}/comparison.md, comparison.json, comparison_samples.png, comparison_losses.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .experiments.registry import add_experiment_parsers

    parser = argparse.ArgumentParser(
        prog="molrmog",
        description="Diffusion models on mixtures of low-rank subspaces with mixture-of-Gaussian "
        "latents (MoLR-MoG): closed-form scores, learnable mixture-of-experts score models and "
        "the experiments that check the theory.",
    )
    parser.add_argument("--version", action="version", version=f"molrmog {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_synth(sub)
    _add_train(sub)
    _add_sample(sub)
    _add_featurizer(sub)
    _add_evaluate(sub)
    _add_analyze(sub)
    _add_compare(sub)
    add_experiment_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad input: one line, no traceback
        print(f"molrmog: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"molrmog: training stopped: {e}", file=sys.stderr)
        return 1
    except TasksFailed as e:
        print(f"molrmog: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("molrmog: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
