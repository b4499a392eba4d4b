"""The `molrmog` command line.

Options are declared once, as dataclass fields (`molrmog.options`): `RunConfig` generates the flags
of `train` and `compare`, each registered expert kind its `--<kind>-<option>` flags, and
`CommonOptions` / `ExecutorOptions` the flags every command shares. Exit codes: 0 done; 2 bad
input (one line `molrmog: error: ...`); 1 training diverged, tasks failed, or a bug (traceback);
130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path

import torch

from .config import RESUME_SAFE, CommonOptions, ExecutorOptions, RunConfig
from .data import DATASETS
from .errors import MolrmogError, TrainingDiverged
from .executors import TasksFailed
from .kinds import get_kind, kind_names
from .options import add_options, flag_of, given, option
from .samplers import SAMPLERS
from .threads import ENV, choose_threads
from .watermark import INVERT_STEPS
from .watermark import METHODS as WATERMARK_METHODS

__all__ = ["main", "build_parser"]

log = logging.getLogger("molrmog")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"molrmog: error: {self.prog.removeprefix('molrmog').strip() or 'molrmog'}: {message} "
                     f"(see {self.prog} --help)\n")


def _parents() -> dict[str, argparse.ArgumentParser]:
    common = argparse.ArgumentParser(add_help=False)
    add_options(common, CommonOptions, title="common options")
    executor = argparse.ArgumentParser(add_help=False)
    add_options(executor, ExecutorOptions, title="parallel execution (molrmog.executors)")
    return {"common": common, "executor": executor}


def _common(a) -> CommonOptions:
    from .options import check

    c = dataclasses.replace(CommonOptions(), **given(a, CommonOptions))
    check(c)
    if c.device.startswith("cuda") and not torch.cuda.is_available():
        raise MolrmogError(f"--device {c.device}: no CUDA device is visible to torch (torch.cuda.is_available() is "
                           f"False); use --device cpu")
    return c


def _executor(a, device: str):
    from .executors import Executor

    o = dataclasses.replace(ExecutorOptions(), **given(a, ExecutorOptions))
    if o.ray_address and o.executor != "ray":
        raise MolrmogError("--ray-address needs --executor ray")
    return Executor(o.executor, o.workers, o.ray_address, device)


def _add_run_options(p) -> None:
    """RunConfig's flags, then every registered kind's (prefixed with its name)."""
    add_options(p, RunConfig, title="run options (molrmog.config.RunConfig)")
    for name in kind_names():
        kind = get_kind(name)
        add_options(p, kind.options, prefix=f"{name}-", title=f"{kind.label} options (--experts {name})")


def _run_config(a) -> RunConfig:
    """The RunConfig the flags describe (common options included); kind flags fill expert_options."""
    from .config import VAE_FIELDS

    c = _common(a)
    g = given(a, RunConfig)
    clash = sorted(set(g) & set(VAE_FIELDS)) if g.get("vae_from") else []
    if clash:
        flags = ", ".join(flag_of(f) for f in clash)
        raise MolrmogError(f"--vae-from RUN brings its data and VAE options; drop {flags}")
    cfg = dataclasses.replace(RunConfig(), **g, seed=c.seed, device=c.device)
    opts = {}
    for name in kind_names():
        g = given(a, get_kind(name).options, prefix=f"{name}_")
        if g:
            opts[name] = dataclasses.replace(get_kind(name).options(), **g)
    return dataclasses.replace(cfg, expert_options=opts)


def _resume_changes(a, saved: RunConfig) -> list[str]:
    """The flags of a `--resume` call that would change the saved run (they are refused)."""
    wanted = {**given(a, RunConfig), **{k: v for k, v in given(a, CommonOptions).items() if k == "seed"}}
    changes = [f"{flag_of(k)} {v!r} (the run has {getattr(saved, k)!r})" for k, v in wanted.items()
               if k not in RESUME_SAFE and getattr(saved, k) != v]
    for name in kind_names():
        g = given(a, get_kind(name).options, prefix=f"{name}_")
        current = saved.expert_options.get(name)
        for k, v in g.items():
            if current is None or getattr(current, k) != v:
                changes.append(f"--{name}-{k.replace('_', '-')} {v!r} (the run has "
                               f"{getattr(current, k) if current is not None else 'no ' + name + ' experts'!r})")
    return changes


def _refuse_changes(a, saved: RunConfig, what: str, fix: str) -> None:
    changes = _resume_changes(a, saved)
    if changes:
        safe = ", ".join("--no-progress" if s == "progress" else "--" + s.replace("_", "-") for s in RESUME_SAFE)
        raise MolrmogError(f"{what}; these flags would change them: {'; '.join(changes)}. Only {safe} {fix}")


# --- commands ----------------------------------------------------------------------------------


def _cmd_train(a) -> int:
    from .pipeline import load_config, train_run
    from .report import finish_run

    c = _common(a)
    if a.resume:
        if a.out is not None:
            raise MolrmogError("--resume RUN continues RUN in place; drop --out")
        saved = load_config(a.resume)
        _refuse_changes(a, saved, "--resume keeps the run's settings", "may be given with --resume")
        device = given(a, CommonOptions).get("device", saved.device)
        done = train_run(a.resume, resume=True, progress=c.progress, executor=_executor(a, device), device=device,
                         after=finish_run)
        out = a.resume
    else:
        cfg = _run_config(a)
        out = a.out or "runs/train"
        done = train_run(out, cfg, progress=c.progress, executor=_executor(a, cfg.device), after=finish_run)
    report = done["after"]  # the report is written while the run is locked
    print(json.dumps(report, indent=2))
    print(f"wrote {out}/report.md and sample grids")
    return 0


def _cmd_sample(a) -> int:
    import numpy as np

    from .artefacts import atomic_write
    from .outputs import save_grid
    from .pipeline import sample_run

    c = _common(a)
    if a.steps is not None and not 1 <= a.steps <= 10_000:
        raise MolrmogError(f"--steps must lie in [1, 10000], got {a.steps}")
    out = Path(a.out) if a.out else Path(a.run) / f"sample_{a.kind}.png"
    if out.is_dir():
        out = out / f"sample_{a.kind}.png"
    elif out.suffix.lower() != ".png":
        raise MolrmogError(f"--out {a.out} must be a .png file or an existing folder")
    imgs, _ = sample_run(a.run, a.kind, a.n, a.cls, a.sampler, a.steps, c.seed, c.device, progress=c.progress,
                         executor=_executor(a, c.device))
    if not bool(torch.isfinite(imgs).all()):
        raise MolrmogError(f"the {a.kind} experts of {a.run} produced non-finite images (their weights or the VAE's "
                           f"are damaged, or the sampler diverged: try --sampler heun); nothing was written")
    save_grid(out, imgs, min(8, a.n))
    if a.npy:
        atomic_write(out.with_suffix(".npy"), lambda p: np.save(open(p, "wb"), imgs.numpy()))
    print(f"wrote {out}" + (f" and {out.with_suffix('.npy')}" if a.npy else ""))
    return 0


def _cmd_synth(a) -> int:
    from .experiments.synth import SynthOptions, check_size, run_synth
    from .options import check

    c = _common(a)
    o = dataclasses.replace(SynthOptions(), **given(a, SynthOptions))
    check(o)
    check_size(o)
    res = run_synth(o.out, D=o.D, K=o.K, d=o.d, n=o.n, r=o.r, separation=o.separation, schedule=o.schedule,
                    sampler=o.sampler, steps=o.steps, grid=o.grid, samples=o.samples, seed=c.seed, device=c.device,
                    progress=c.progress)
    summary = {k: res[k] for k in ("energy_distance", "energy_distance_true_vs_true", "sliced_w2",
                                   "sliced_w2_true_vs_true")}
    summary["mode_weight_max_abs_error"] = res["mode_weights_generated"]["max_abs"]
    print(json.dumps(summary, indent=2))
    print(f"wrote {o.out}/synth.png and {o.out}/synth.json")
    return 0


def _cmd_featurizer(a) -> int:
    from .featurizer import featurizer_dir, train_featurizer

    c = _common(a)
    if a.steps is not None and not 1 <= a.steps <= 10**6:
        raise MolrmogError(f"--steps must lie in [1, 1000000], got {a.steps}")
    m = train_featurizer(a.dataset, cache=a.cache, steps=a.steps, seed=c.seed, size=a.size, channels=a.channels,
                         data_dir=a.data_dir, device=c.device, progress=c.progress, force=a.force)
    print(json.dumps({"dataset": a.dataset, "test_accuracy": round(float(m.test_accuracy), 4),
                      "parameters": m.num_parameters()}, indent=2))
    print(f"featurizer in {featurizer_dir(a.dataset, a.cache)}")
    return 0


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """Flags of `evaluate` and `compare`."""

    samples: int = option(1000, "samples per model", low=2, high=10**6)
    reference: int = option(10000, "training images for FID/KID", low=2, high=10**7)
    cache: str | None = option(None, "featurizer cache (default $MOLRMOG_CACHE or ~/.cache/molrmog)")


def _eval_options(a) -> EvalOptions:
    from .options import check

    o = dataclasses.replace(EvalOptions(), **given(a, EvalOptions))
    check(o)
    return o


def _kinds(text):
    return None if text is None else [k.strip() for k in text.split(",") if k.strip()]


def _cmd_evaluate(a) -> int:
    from .evaluation import evaluate_run

    c, o = _common(a), _eval_options(a)
    if not 0 < a.threshold <= 1:
        raise MolrmogError(f"--threshold must lie in (0, 1], got {a.threshold}")
    evaluate_run(a.run, samples=o.samples, reference=o.reference, kinds=_kinds(a.kinds),
                 memorisation=not a.no_memorisation, threshold=a.threshold, cache=o.cache, seed=c.seed,
                 device=c.device, progress=c.progress)
    print((Path(a.run) / "evaluation.md").read_text())
    print(f"wrote {a.run}/evaluation.json, evaluation.md and evaluation_samples.png")
    return 0


def _cmd_jacobian(a) -> int:
    from .evaluation import jacobian_spectra

    c = _common(a)
    if not 0 < a.tol < 1 or not 1 <= a.points <= 1000:
        raise MolrmogError(f"--tol must lie in (0, 1) (a fraction of the largest singular value) and --points in "
                           f"[1, 1000]; got {a.tol} and {a.points}")
    res = jacobian_spectra(a.run, kinds=_kinds(a.kinds), ts=a.t, cluster=a.cluster, points=a.points, tol=a.tol,
                           memorisation=not a.no_memorisation, seed=c.seed, device=c.device, out=a.out)
    ranks = {m: {t: v["rank_median"] for t, v in per_t.items()} for m, per_t in res["models"].items()}
    print(json.dumps({"numerical_rank_median": ranks}, indent=2))
    print(f"wrote {a.out or a.run + '/jacobian'}/jacobian.csv, jacobian.json and jacobian.png")
    return 0


def _cmd_roundtrip(a) -> int:
    from .evaluation import roundtrip

    c = _common(a)
    res = roundtrip(a.run, kinds=_kinds(a.kinds), samples=a.samples, seed=c.seed, device=c.device, out=a.out)
    print(json.dumps({"round_trip_median_over_clusters": res["median_over_clusters"]}, indent=2))
    print(f"wrote {a.out or a.run + '/roundtrip'}/roundtrip.csv, roundtrip.json and roundtrip.png")
    return 0


def _cmd_few_step(a) -> int:
    from .evaluation import few_step_images

    c, o = _common(a), _eval_options(a)
    try:
        steps = [int(v) for v in a.steps.split(",") if v.strip()]
    except ValueError:
        raise MolrmogError(f"--steps must be a comma list of integers, got {a.steps!r}") from None
    res = few_step_images(a.run, kinds=_kinds(a.kinds), sampler=a.sampler, steps=steps, samples=o.samples,
                          reference=o.reference, cache=o.cache, seed=c.seed, device=c.device, out=a.out,
                          progress=c.progress)
    for r in res["rows"]:
        print(f"{r['kind']:10s} {r['sampler']:8s} {r['steps']:4d} steps  FID {r['fid']:8.2f}  recall "
              f"{r['recall']:.3f}  {r['images_per_second']:9.1f} images/s")
    print(f"wrote {a.out or a.run + '/few_step'}/few_step_{a.sampler}.csv, .json and .png")
    return 0


def _mask(text: str | None):
    if text is None:
        return None
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 4:
        raise MolrmogError(f"--mask must be x0,y0,x1,y1 in pixels, got {text!r}")
    return vals


def _cmd_edit(a) -> int:
    from .editing import edit_run

    c = _common(a)
    try:
        lambdas = tuple(_float_list(a.lambdas))
    except argparse.ArgumentTypeError as e:
        raise MolrmogError(f"--lambdas: {e}") from None
    if not lambdas or not all(math.isfinite(v) and abs(v) <= 100 for v in lambdas) or not 1 <= a.directions <= 32:
        raise MolrmogError(f"--lambdas needs finite values in [-100, 100] (got {a.lambdas!r}) and --directions must "
                           f"lie in [1, 32]")
    if not 0 < a.t <= 1 or not 0 <= a.held_out <= 1000 or not 0 < a.null_tol <= 1:
        raise MolrmogError(f"--t must lie in (0, 1], --held-out in [0, 1000] and --null-tol in (0, 1]; got {a.t}, "
                           f"{a.held_out}, {a.null_tol}")
    res = edit_run(a.run, kind=a.kind, cluster=a.cluster, image=a.image, seed=c.seed, fraction=a.t,
                   directions=a.directions, lambdas=lambdas, mask=_mask(a.mask), null_tol=a.null_tol,
                   held_out=a.held_out, out=a.out, device=c.device)
    print(json.dumps({k: res[k] for k in ("t", "singular_values", "summary", "held_out_summary",
                                          "locality_without_projection") if k in res}, indent=2))
    print(f"wrote {a.out or a.run + '/edit'}/edit.png and edit.json")
    return 0


def _cmd_watermark(a) -> int:
    import numpy as np

    from . import watermark as wm
    from .artefacts import atomic_write, read_json, write_json
    from .outputs import save_grid
    from .run import Run

    c = _common(a)
    run = Run.load(a.run, device=c.device)
    kind = a.kind or run.mixture_kind()
    run.check_kinds([kind])
    if not 0 < a.t <= 1 or not 0 < a.strength <= 10:
        raise MolrmogError("--t must lie in (0, 1] and --strength in (0, 10]")
    if not 2 <= a.n <= 100_000:
        raise MolrmogError(f"--n must lie in [2, 100000] (images to embed / evaluate), got {a.n}")
    if not 0 <= a.invert_steps <= 100_000:
        raise MolrmogError(f"--invert-steps must lie in [0, 100000], got {a.invert_steps}")
    if a.action == "evaluate":
        res = wm.evaluate_watermark(run, kind=kind, n=a.n, key=a.key, strength=a.strength, fraction=a.t,
                                    seed=c.seed, cache=a.cache, out=a.out, device=c.device, progress=c.progress,
                                    method=a.method, invert_steps=a.invert_steps)
        print(json.dumps({k: res[k] for k in ("attacks", "psnr_db", "fid_change")}, indent=2))
        print(f"wrote {a.out or a.run + '/watermark'}/watermark.json, watermark.md and watermark.png")
        return 0
    vaes, experts = run.vaes(), run.experts(kind)
    if not 0 <= a.cluster < len(experts):
        raise MolrmogError(f"--cluster must lie in 0..{len(experts) - 1}, got {a.cluster}")
    out = Path(a.out or Path(a.run) / "watermark")
    if a.action == "embed":
        how = {"strength": a.strength, "fraction": a.t, "method": a.method}
        marked, _, info = wm.embed(experts[a.cluster], vaes[a.cluster], a.n, a.key, seed=c.seed, **how)
        _, clean, _ = wm.embed(experts[a.cluster], vaes[a.cluster], a.n, a.key, seed=c.seed + 1, **how)
        calib = wm.detection_scores(experts[a.cluster], vaes[a.cluster], clean, a.key, fraction=a.t, method=a.method,
                                    invert_steps=a.invert_steps)
        threshold = float(np.quantile(calib.numpy(), 0.99))
        atomic_write(out / "watermarked.npy", lambda p: np.save(open(p, "wb"), marked.numpy()))
        save_grid(out / "watermarked.png", marked, min(8, a.n))
        write_json(out / "key.json", {"key": str(a.key), "kind": kind, "cluster": a.cluster, "t": a.t,
                                      "strength": a.strength, "threshold": threshold,
                                      "invert_steps": a.invert_steps, **info})
        print(f"wrote {out}/watermarked.npy, watermarked.png and key.json (threshold {threshold:.4f}, 1% false "
              f"positives on clean images)")
        return 0
    if a.action == "detect" and not a.images:
        raise MolrmogError("watermark detect needs --images FILE.npy")
    path = Path(a.keyfile) if a.keyfile else out / "key.json"
    keyfile = wm.check_key(read_json(path, "watermark key"), path, kind, len(experts))
    images = wm.read_images(a.images, tuple(getattr(vaes[0], "vae", vaes[0]).config.image_shape))
    scores = wm.detection_scores(experts[keyfile["cluster"]], vaes[keyfile["cluster"]], images, keyfile["key"],
                                 fraction=keyfile["t"], method=keyfile["method"],
                                 invert_steps=keyfile["invert_steps"])
    for i, v in enumerate(scores.tolist()):
        print(f"{i}\t{v:.4f}\t{'watermarked' if v > keyfile['threshold'] else 'clean'}")
    return 0


def _cmd_compare(a) -> int:
    from .compare import compare
    from .pipeline import load_config

    c, o = _common(a), _eval_options(a)
    cfg = _run_config(a)
    if (Path(a.out) / "dedicated" / "config.json").is_file():  # a comparison to continue: strict, as train --resume
        _refuse_changes(a, load_config(Path(a.out) / "dedicated"), f"{a.out} holds a comparison, continued with its "
                        f"runs' settings", "may be given to continue it (or choose another --out)")
    compare(a.out, cfg, unified=not a.no_unified, samples=o.samples, reference=o.reference, cache=o.cache,
            progress=c.progress, executor=_executor(a, cfg.device))
    print((Path(a.out) / "comparison.md").read_text())
    print(f"wrote {a.out}/comparison.md, comparison.json, comparison_samples.png, comparison_losses.png")
    return 0


def _cmd_experiment(a) -> int:
    from .experiments.registry import EXPERIMENTS

    c = _common(a)
    fn = EXPERIMENTS[a.experiment_name][0]
    extra = {"run": a.run} if getattr(a, "run", None) else {}
    if extra and not (Path(a.run) / "config.json").is_file():
        raise MolrmogError(f"--run {a.run}: not a run directory (no config.json); train one with molrmog train")
    res = fn(a.out, preset="quick" if a.quick else "default", seed=c.seed, progress=c.progress,
             executor=_executor(a, c.device), **extra)
    res = {k: v for k, v in res.items() if k != "config"}
    text = json.dumps(res, indent=2)
    print(text if len(text) < 3000 else text[:3000] + "\n...")
    print(f"wrote results into {a.out}")
    return 0


# --- the parser --------------------------------------------------------------------------------


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .experiments.registry import EXPERIMENTS
    from .experiments.synth import SynthOptions

    par = _parents()
    parser = _Parser(
        prog="molrmog",
        description="Diffusion models on mixtures of low-rank subspaces with mixture-of-Gaussian latents "
        "(MoLR-MoG): closed-form scores, learnable mixture-of-experts score models, latent experts on "
        "dedicated VAEs, and the experiments that check the theory. Exit codes: 0 done, 2 bad input "
        "(one line), 1 training diverged / tasks failed / a bug, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"molrmog {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("synth", parents=[par["common"]],
                       help="sample a random MoLR-MoG with its exact score (PF-ODE) and compare with the truth",
                       description="Draw a random MoLR-MoG, run the probability-flow ODE with the exact closed-form "
                       "score, and write synth.png (2-D projection of data vs generated points, coloured by "
                       "subspace) and synth.json (energy distance, sliced W2, mode-weight error) into --out.")
    add_options(p, SynthOptions, title="synth options")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser(
        "train", parents=[par["common"], par["executor"]], help="train VAEs and latent experts on an image dataset",
        description="Train one VAE per cluster (or one unified VAE, or a shared backbone with per-cluster LoRA "
        "adapters) and a small latent expert per cluster for each expert kind; write a run directory with models, "
        "losses, loss curves, sample grids and report.md. Every run option below is stored in RUN/config.json. "
        "Checkpoints are written every --checkpoint-every steps, only from states whose loss and parameters are "
        "finite and whose loss has not exploded (100x its running median); divergence stops with exit 1 and keeps "
        "the last good checkpoint. One process trains a run at a time (RUN/.lock). --resume RUN continues a "
        "stopped run with its saved settings: flags that would change them are refused; only --device, "
        "--no-progress, --debug, --executor, --workers and --ray-address may be given.")
    p.add_argument("--out", default=None, help="run directory (default runs/train)")
    p.add_argument("--resume", metavar="RUN", default=None, help="continue the run in RUN with its saved settings")
    _add_run_options(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", parents=[par["common"], par["executor"]], help="generate images from a trained run",
                       description="Generate images with one expert kind of a trained run: a cluster is drawn by its "
                       "weight (or fixed with --class), its latent is sampled with the sampler and decoded by that "
                       "cluster's VAE. Writes a PNG grid (and .npy with --npy).")
    p.add_argument("run", help="run directory written by molrmog train")
    p.add_argument("--kind", default=kind_names()[0], choices=kind_names(), help="expert kind (default %(default)s)")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--class", dest="cls", type=int, default=None, help="cluster / class index")
    p.add_argument("--sampler", default=None, choices=SAMPLERS.names(), help="default: the run's sampler")
    p.add_argument("--steps", type=int, default=None, help="default: the run's sample steps")
    p.add_argument("--out", default=None, help="PNG path or an existing folder (default RUN/sample_<kind>.png)")
    p.add_argument("--npy", action="store_true", help="also write the images as .npy")
    p.set_defaults(func=_cmd_sample, param_flags={"cluster": "--class"})

    p = sub.add_parser("featurizer", parents=[par["common"]],
                       help="train the offline feature extractor (classifier) of a dataset",
                       description="Train a small CNN classifier on the dataset's train split, once; it is cached "
                       "(config.json + diffusion_pytorch_model.safetensors + featurizer.json with its test accuracy) "
                       "under --cache, $MOLRMOG_CACHE or ~/.cache/molrmog. Its penultimate features serve FID, KID, "
                       "precision/recall and the similarity scores; its softmax the class score.")
    p.add_argument("--dataset", default="digits", help="a registered dataset (default digits): " +
                   ", ".join(d.spec_help() for d in DATASETS.values()))
    p.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    p.add_argument("--size", type=int, default=28, help="image size for folder datasets (default 28)")
    p.add_argument("--channels", type=int, default=1, choices=[1, 3])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the dataset's, e.g. digits "
                   "600, fashion-mnist 2500, folders 2000)")
    p.add_argument("--cache", default=None, help="cache folder (default $MOLRMOG_CACHE or ~/.cache/molrmog)")
    p.add_argument("--force", action="store_true", help="retrain even when a finished featurizer is cached")
    p.set_defaults(func=_cmd_featurizer)

    p = sub.add_parser("evaluate", parents=[par["common"]],
                       help="FID, KID, precision/recall, class and similarity scores of a run",
                       description="Sample every expert kind of a trained run (and the memorisation baseline: the "
                       "exact denoiser of each cluster's empirical latent distribution) and measure FID, KID, "
                       "precision/recall against the training images and the class score in the features of the "
                       "dataset's own classifier (`molrmog featurizer`, trained first if missing); generalisation, "
                       "reproducibility and probability-flow distance between models from shared noise. The test "
                       "split is measured alongside as the floor. Writes evaluation.json, evaluation.md and "
                       "evaluation_samples.png into RUN.")
    p.add_argument("run", help="run directory written by molrmog train")
    add_options(p, EvalOptions, title="evaluation options")
    p.add_argument("--kinds", default=None, help="comma list of expert kinds (default: all in the run)")
    p.add_argument("--no-memorisation", action="store_true", help="skip the memorisation baseline")
    p.add_argument("--threshold", type=float, default=0.6, help="similarity threshold (default 0.6)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("analyze", help="analyses of trained runs (jacobian, few-step, roundtrip)",
                       description="Analyses of a trained run.")
    asub = p.add_subparsers(dest="analysis", metavar="NAME", required=True, parser_class=_Parser)
    j = asub.add_parser("jacobian", parents=[par["common"]],
                        help="singular values of the denoiser's Jacobian per expert kind and t",
                        description="Singular values of d x0_hat / d x_t of each expert kind's latent denoiser (and "
                        "the memorisation baseline) at noised training latents of one cluster, for several t; "
                        "numerical rank = number of singular values above --tol times the largest. Writes "
                        "jacobian.csv, jacobian.json and jacobian.png into --out (default RUN/jacobian).")
    j.add_argument("run", help="run directory written by molrmog train")
    j.add_argument("--t", type=_float_list, default=[0.02, 0.1, 0.3, 0.6, 1.0],
                   help="comma list of times in (0, 1] (default 0.02,0.1,0.3,0.6,1.0)")
    j.add_argument("--cluster", type=int, default=0, help="cluster whose latents are used (default 0)")
    j.add_argument("--points", type=int, default=8, help="points per t (default 8)")
    j.add_argument("--tol", type=float, default=1e-2, help="relative tolerance of the numerical rank")
    j.add_argument("--kinds", default=None, help="comma list of expert kinds (default: all in the run)")
    j.add_argument("--no-memorisation", action="store_true", help="skip the memorisation baseline")
    j.add_argument("--out", default=None, help="output folder (default RUN/jacobian)")
    j.set_defaults(func=_cmd_jacobian)

    rt = asub.add_parser("roundtrip", parents=[par["common"]],
                         help="how far a VAE decode-encode round trip moves the latents the experts generate",
                         description="Per cluster and expert kind: ||E(D(z)) - z|| / ||z - mean|| (E: encoder mean, "
                         "D: decoder, mean: the cluster's mean training latent) for latents z drawn from the expert "
                         "(the exact sampler in one step for MoG / Gaussian experts, else the run's sampler) and for "
                         "training latents. Writes roundtrip.csv, roundtrip.json and roundtrip.png into --out "
                         "(default RUN/roundtrip).")
    rt.add_argument("run", help="run directory written by molrmog train")
    rt.add_argument("--kinds", default=None, help="comma list of expert kinds (default: all in the run)")
    rt.add_argument("--samples", type=int, default=256, help="latents per cluster and kind (default 256)")
    rt.add_argument("--out", default=None, help="output folder (default RUN/roundtrip)")
    rt.set_defaults(func=_cmd_roundtrip)

    fs = asub.add_parser("few-step", parents=[par["common"]],
                         help="FID of expert kinds at few sampling steps (ddpm, ddim, exact, ...)",
                         description="Sample each expert kind of a trained run with --sampler at each of --steps "
                         "(and with the run's own sampler as the reference) and measure FID, KID, precision, recall, "
                         "class score and images/s against the training images. Writes few_step_<sampler>.csv/.json/"
                         ".png into --out (default RUN/few_step). The exact sampler needs MoG / Gaussian experts.")
    fs.add_argument("run", help="run directory written by molrmog train")
    fs.add_argument("--kinds", default=None, help="comma list of expert kinds (default: all in the run)")
    fs.add_argument("--sampler", default="ddpm", choices=SAMPLERS.names(), help="sampler (default ddpm)")
    fs.add_argument("--steps", default="5,10,20,50", help="comma list of step counts (default 5,10,20,50)")
    add_options(fs, EvalOptions, title="evaluation options")
    fs.add_argument("--out", default=None, help="output folder (default RUN/few_step)")
    fs.set_defaults(func=_cmd_few_step)

    p = sub.add_parser("edit", parents=[par["common"]], help="LOCO-style edits along the denoiser Jacobian's "
                       "singular vectors", description="Invert an image (a training image of the cluster with --image, "
                       "else a generated one) with the probability-flow ODE to the edit time, find the top right "
                       "singular vectors of d decode(x0_hat) / d u_t (closed form for MoG / Gaussian experts, Jacobian-"
                       "vector products otherwise; with --mask, the directions that change the pixels inside it most "
                       "among those in the null space of the pixels outside it), move along them by each lambda, run "
                       "the ODE back and decode. Writes edit.png (rows: "
                       "directions, columns: lambdas) and edit.json (singular values, locality, linearity, "
                       "transferability and composability on the image and on held-out test images).")
    p.add_argument("run", help="run directory written by molrmog train")
    p.add_argument("--kind", default=None, help="expert kind (default: the run's first MoG / Gaussian kind)")
    p.add_argument("--cluster", type=int, default=0)
    p.add_argument("--image", type=int, default=None, help="index of a training image of the cluster")
    p.add_argument("--t", type=float, default=0.6, help="edit time as a fraction of the horizon sigma_t = 1 "
                   "(default 0.6)")
    p.add_argument("--directions", type=int, default=3)
    p.add_argument("--lambdas", default="-0.2,-0.1,0,0.1,0.2", help="comma list of step sizes in units of the "
                   "noise norm gamma_t sqrt(d) at the edit time (default -0.2,-0.1,0,0.1,0.2; a list that starts "
                   "with a minus needs the = form: --lambdas=-0.3,0.3)")
    p.add_argument("--mask", default=None, help="x0,y0,x1,y1: a rectangle of pixels the edit should stay in")
    p.add_argument("--null-tol", type=float, default=0.3, help="with --mask: a latent direction counts as leaving "
                   "the outside unchanged when its outside gain is at most this fraction of the largest (default 0.3)")
    p.add_argument("--held-out", type=int, default=4, help="test images of the cluster the metrics are also "
                   "measured on (default 4)")
    p.add_argument("--out", default=None, help="output folder (default RUN/edit)")
    p.set_defaults(func=_cmd_edit)

    p = sub.add_parser("watermark", parents=[par["common"]], help="latent watermarks: embed, detect, evaluate",
                       description="embed: generate --n watermarked images of --cluster (at the small time --t, a "
                       "keyed pattern in the null space of the denoiser's Jacobian, or with --method ring the ring key "
                       "of Tree-Ring / Shallow Diffuse on latent channel 0's spectrum) into watermarked.npy/.png and "
                       "key.json "
                       "(with the detection threshold: 1%% false positives on clean images); detect: a score and a "
                       "decision per image of an .npy file; evaluate: AUC and TPR at 1%% FPR over --n watermarked and "
                       "--n clean images, clean and under attacks (noise, blur, JPEG, brightness, VAE re-encoding), "
                       "with PSNR and FID of watermarked vs clean images: watermark.json/.md/.png.")
    p.add_argument("action", choices=["embed", "detect", "evaluate"])
    p.add_argument("run", help="run directory written by molrmog train")
    p.add_argument("--kind", default=None, help="expert kind (default: the run's first MoG / Gaussian kind)")
    p.add_argument("--cluster", type=int, default=0, help="cluster of embed (default 0)")
    p.add_argument("--n", type=int, default=64, help="images to embed / evaluate (default 64)")
    p.add_argument("--key", default="12345", help="the secret key (any string)")
    p.add_argument("--method", default="null", choices=list(WATERMARK_METHODS),
                   help="null: null-space pattern, cosine statistic; ring: ring key, L1 statistic (default null)")
    p.add_argument("--invert-steps", type=int, default=INVERT_STEPS,
                   help=f"embed / evaluate: Adam steps of decoder inversion before detection (default {INVERT_STEPS}; "
                   f"0: the encoder's mean)")
    p.add_argument("--strength", type=float, default=0.3, help="pattern norm / noise norm at t (default 0.3)")
    p.add_argument("--t", type=float, default=0.3, help="time as a fraction of the horizon sigma_t = 1 (default 0.3)")
    p.add_argument("--images", default=None, help="detect: an .npy file of images (N, C, H, W) in [0, 1]")
    p.add_argument("--keyfile", default=None, help="detect: key.json written by embed (default OUT/key.json)")
    p.add_argument("--cache", default=None, help="featurizer cache (evaluate)")
    p.add_argument("--out", default=None, help="output folder (default RUN/watermark)")
    p.set_defaults(func=_cmd_watermark)

    p = sub.add_parser("compare", parents=[par["common"], par["executor"]],
                       help="every expert kind on the same dedicated VAEs (and dedicated vs unified VAE)",
                       description="Train (or resume) OUT/dedicated with every expert kind of --experts on one VAE "
                       "per cluster and OUT/unified with the headline kind (MoG) on one shared VAE, evaluate both "
                       "(see `molrmog evaluate`) and write comparison.md, comparison.json, comparison_samples.png "
                       "and comparison_losses.png into OUT.")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--no-unified", action="store_true", help="skip the unified-VAE ablation")
    add_options(p, EvalOptions, title="evaluation options")
    _add_run_options(p)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("experiment", help="run a theory experiment (" + ", ".join(EXPERIMENTS) + ")",
                       description="Run one of the experiments that check the theory claims; each writes CSV + JSON "
                       "numbers and PNG figures into --out.")
    esub = p.add_subparsers(dest="experiment", metavar="NAME", required=True, parser_class=_Parser)
    for name, (_, helptext, files) in EXPERIMENTS.items():
        e = esub.add_parser(name, parents=[par["common"], par["executor"]], help=helptext,
                            description=f"{helptext}. Writes {files}.")
        e.add_argument("--quick", action="store_true", help="small preset (under a minute on 2 CPU cores)")
        e.add_argument("--out", default=f"runs/{name}", help=f"output directory (default runs/{name})")
        if name == "generalisation":
            e.add_argument("--run", default=None, help="a trained run: also sweep N on its cluster 0 (latent MoG "
                           "and U-Net experts, metrics in the featurizer's space)")
        e.set_defaults(func=_cmd_experiment, experiment_name=name)
    return parser


def _setup_logging(debug: bool) -> None:
    root = logging.getLogger("molrmog")
    root.handlers = [h for h in root.handlers if not getattr(h, "_molrmog", False)]
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("molrmog: %(message)s"))
    h._molrmog = True
    root.addHandler(h)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


def _set_threads() -> None:
    """The process's intra-op threads: MOLRMOG_THREADS, else OMP_NUM_THREADS (torch reads it itself), else the
    cores other processes leave free (`molrmog.threads`); training tasks choose again when they start."""
    if os.environ.get(ENV) or not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(choose_threads())


def _in_flags(e: MolrmogError, args) -> str:
    """The message of a library error that starts with a parameter's name, with the command's flag for it
    (`param_flags` of the command, else --name-with-dashes)."""
    msg, param = str(e), getattr(e, "param", None)
    if not param or not msg.startswith(param):
        return msg
    flag = getattr(args, "param_flags", {}).get(param) or f"--{param.replace('_', '-')}"
    return flag + msg[len(param):]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a one-line usage error (already printed)
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False))
    _setup_logging(debug)
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        _set_threads()
        with logging_redirect_tqdm(loggers=[logging.getLogger("molrmog")]):
            return int(args.func(args) or 0)
    except MolrmogError as e:  # bad input: one line, no traceback; a library parameter is named by its flag
        if debug:
            traceback.print_exc()
        print(f"molrmog: error: {_in_flags(e, args)}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError) as e:  # an output path that is a file where a folder goes
        print(f"molrmog: error: {e.filename} exists and is not a folder; give --out a new or existing folder",
              file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"molrmog: training diverged: {e}", file=sys.stderr)
        return 1
    except TasksFailed as e:
        print(f"molrmog: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("molrmog: interrupted; finished stages and the last checkpoints are kept (--resume continues)",
              file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - a bug: show it
        traceback.print_exc()
        print("molrmog: internal error (a bug, not your input): please report it with the traceback above",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
