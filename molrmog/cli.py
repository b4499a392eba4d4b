"""The `molrmog` command line, declared as data.

Every flag is an `option` field of a dataclass (`molrmog.core.options`), declared once: `RunConfig` gives the
flags of `train` and `compare`, each registered expert kind its `--<kind>-<option>` flags, `CommonOptions`
/ `ExecutorOptions` the flags every command shares, and the small dataclasses below the flags of the
other commands (`RunArg` is the positional RUN of every command that reads a run, `KindsArg` is --kinds,
...). A command is one `Command` entry in `commands()`: its function, its help and the option classes whose
flags it takes; `build_parser` only walks that table (the registries of expert kinds and experiments add
theirs). Choices, ranges and help texts come from the declarations (registries included), values are checked
by `molrmog.core.options.check`.

The library speaks of its parameters ("cluster must lie in 0..9"); `main` names the flag instead ("--class
must lie in 0..9"): `MolrmogError.param`, translated with the command's `param_flags`.

Exit codes: 0 done; 2 bad input (one line `molrmog: error: ...`); 1 training diverged, tasks failed, or a
bug (traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from molrmog.applications.fieldmark import PSNR as FIELD_PSNR
from molrmog.applications.fieldmark import SIGMA as FIELD_SIGMA
from molrmog.applications.fieldmark import STEPS as FIELD_STEPS
from molrmog.applications.signature import BITS, EXTRACTOR_STEPS, MARK_STEPS, PSNR, SMOOTH, WEBER
from molrmog.applications.subspacemark import PSNR as SUBSPACE_PSNR
from molrmog.applications.watermark import ATTACKS as WATERMARK_ATTACKS
from molrmog.applications.watermark import AUTO as WATERMARK_AUTO
from molrmog.applications.watermark import INVERT_SIGMA, INVERT_STEPS
from molrmog.applications.watermark import METHODS as WATERMARK_METHODS
from molrmog.core.errors import MolrmogError, TrainingDiverged
from molrmog.core.options import add_options, check, comma_list, flag_of, float_list, given, int_list, option
from molrmog.core.samplers import SAMPLERS
from molrmog.models.kinds import get_kind, kind_names
from molrmog.pipeline.config import RESUME_SAFE, CommonOptions, ExecutorOptions, RunConfig
from molrmog.training.executors import TasksFailed
from molrmog.training.threads import ENV, choose_threads

__all__ = ["main", "build_parser", "commands", "Command"]

log = logging.getLogger("molrmog")


# --- the options of the commands, each declared once ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunArg:
    run: str = option(None, "run directory written by molrmog train", positional=True)


@dataclasses.dataclass(frozen=True)
class OutArg:
    out: str | None = option(None, "where the command writes (default {out})")


@dataclasses.dataclass(frozen=True)
class KindArg:
    kind: str | None = option(None, "expert kind (default: the run's first MoG / Gaussian kind, else its first)",
                              choices=kind_names)


@dataclasses.dataclass(frozen=True)
class KindsArg:
    kinds: tuple[str, ...] | None = option(None, "comma list of expert kinds (default: all in the run)",
                                           parse=comma_list, choices=kind_names, metavar="KIND,...")


@dataclasses.dataclass(frozen=True)
class ClusterArg:
    cluster: int = option(0, "cluster (class) index", low=0, high=10_000)


@dataclasses.dataclass(frozen=True)
class CacheArg:
    cache: str | None = option(None, "featurizer cache (default $MOLRMOG_CACHE or ~/.cache/molrmog)")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """Flags of `evaluate`, `compare` and `analyze few-step`."""

    samples: int = option(1000, "samples per model", low=2, high=10**6)
    reference: int = option(10000, "training images for FID/KID", low=2, high=10**7)
    draws: int = option(1, "sets of --samples per model (seeds SEED, SEED+1, ...); the tables give each number's "
                        "median over the sets and the FID's range (one set of 1,000 moves a FID by 1-2)", low=1,
                        high=100)


@dataclasses.dataclass(frozen=True)
class MemorisationArg:
    no_memorisation: bool = option(False, "skip the memorisation baseline")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    resume: str | None = option(None, "continue the run in RUN with its saved settings", metavar="RUN")


@dataclasses.dataclass(frozen=True)
class CompareOptions:
    no_unified: bool = option(False, "skip the unified-VAE ablation")


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    n: int = option(64, "number of images", low=1, high=10**6)
    cls: int | None = option(None, "cluster / class index (default: drawn by weight)", low=0, high=10_000,
                             flag="--class")
    sampler: str | None = option(None, "sampler (default: the run's)", choices=SAMPLERS.names)
    steps: int | None = option(None, "sampler steps (default: the run's)", low=1, high=10_000)
    npy: bool = option(False, "also write the images as .npy")


@dataclasses.dataclass(frozen=True)
class FeaturizerOptions:
    steps: int | None = option(None, "training steps (default: the dataset's, e.g. digits 600, fashion-mnist "
                               "2500, folders 2000)", low=1, high=10**6)
    force: bool = option(False, "retrain even when a finished featurizer is cached")


@dataclasses.dataclass(frozen=True)
class EvaluateOptions:
    threshold: float = option(0.6, "similarity threshold of the generalisation / reproducibility scores", low=0,
                              low_open=True, high=1)


@dataclasses.dataclass(frozen=True)
class JacobianOptions:
    t: tuple[float, ...] = option((0.02, 0.1, 0.3, 0.6, 1.0), "comma list of times in (0, 1]", parse=float_list,
                                  low=0, low_open=True, high=1, metavar="T,...")
    points: int = option(8, "points per t", low=1, high=1000)
    tol: float = option(1e-2, "relative tolerance of the numerical rank (a fraction of the largest singular "
                        "value)", low=0, low_open=True, high=1)


@dataclasses.dataclass(frozen=True)
class RoundtripOptions:
    samples: int = option(256, "latents per cluster and kind", low=2, high=100_000)


@dataclasses.dataclass(frozen=True)
class FewStepOptions:
    sampler: str = option("ddpm", "sampler", choices=SAMPLERS.names)
    steps: tuple[int, ...] = option((5, 10, 20, 50), "comma list of step counts", parse=lambda t: _tuple(int_list(t)),
                                    low=1, high=10_000, metavar="N,...")


@dataclasses.dataclass(frozen=True)
class EditOptions:
    image: int | None = option(None, "index of a training image of the cluster (default: a generated image)",
                               low=0)
    t: float = option(0.6, "edit time as a fraction of the horizon sigma_t = 1", low=0, low_open=True, high=1)
    directions: int = option(3, "singular directions to edit along", low=1, high=32)
    lambdas: tuple[float, ...] = option((-0.2, -0.1, 0.0, 0.1, 0.2), "comma list of step sizes in units of the "
                                        "noise norm gamma_t sqrt(d) at the edit time (a list that starts with a minus "
                                        "needs the = form: --lambdas=-0.3,0.3)", parse=float_list, low=-100,
                                        high=100, metavar="L,...")
    mask: tuple[int, ...] | None = option(None, "x0,y0,x1,y1: a rectangle of pixels the edit should stay in",
                                          parse=lambda t: _tuple(int_list(t)), low=0, metavar="X0,Y0,X1,Y1")
    null_tol: float = option(0.3, "with --mask: a latent direction counts as leaving the outside unchanged when "
                             "its outside gain is at most this fraction of the largest", low=0, low_open=True, high=1)
    held_out: int = option(4, "test images of the cluster the metrics are also measured on", low=0, high=1000)


@dataclasses.dataclass(frozen=True)
class WatermarkOptions:
    action: str = option(None, "embed, detect or evaluate", positional=True, choices=("embed", "detect", "evaluate"))
    n: int = option(64, "images to embed / evaluate", low=2, high=100_000)
    key: str = option("12345", "the secret key (any string)")
    method: str = option(WATERMARK_AUTO, "auto: subspace where the experts have low-rank modes (MoG), else field; "
                         "ring: ring key, L1 statistic; null: null-space pattern, cosine statistic; "
                         "decoder: Stable Signature, each cluster's decoder fine-tuned to write the key's bits, read "
                         "by an extractor network trained once per --out; field: each decoded image times (1 + eps f), "
                         "f a smooth field drawn from the key, eps set per image for --psnr, read by a detector "
                         "network correlating with f, trained once per key and --out; subspace: each decoded image "
                         "moved (at --psnr) so its encoding steps off its mode's subspace along the key's direction, "
                         "read as the residual of a fit of the decoder's manifold (MoG experts)",
                         choices=(WATERMARK_AUTO, *WATERMARK_METHODS))
    invert_steps: int = option(INVERT_STEPS, "embed / evaluate: Adam steps of decoder inversion before detection "
                               "(0: the encoder's mean)", low=0, high=100_000)
    invert_sigma: float = option(INVERT_SIGMA, "embed / evaluate: pixel noise std of decoder inversion, the MAP "
                                 "latent under the expert's law (0: least squares without a prior)", low=0, high=1)
    strength: float = option(0.3, "null: pattern norm / noise norm at t", low=0, low_open=True, high=10)
    ring_mix: float = option(1.0, "ring: the fraction of the way from the latent's spectrum to the key on the disk "
                             "(1: replaced by it, as Tree-Ring; less: a fainter mark, a higher PSNR)", low=0,
                             low_open=True, high=1)
    t: float = option(0.3, "time as a fraction of the horizon sigma_t = 1", low=0, low_open=True, high=1)
    fid_samples: int = option(1000, "evaluate: marked / clean image pairs per set for the FID change (more than --n: "
                              "on 64 images a FID change is noise)", low=2, high=100_000)
    draws: int = option(3, "evaluate: sets of --fid-samples pairs (seeds SEED, SEED+1, ...); the FID change is their "
                        "median", low=1, high=100)
    bits: int = option(BITS, "decoder: bits of the key's message", low=1, high=256)
    extractor_steps: int | None = option(None, "decoder / field: Adam steps of the extractor's (the field's "
                                         "detector's) training, once per --out, kept there; a stopped training "
                                         "resumes from its checkpoint there when asked again (default: decoder "
                                         f"{EXTRACTOR_STEPS}, field {FIELD_STEPS})", low=1, high=1_000_000)
    mark_steps: int = option(MARK_STEPS, "decoder: Adam steps of each cluster's decoder fine-tune", low=1,
                             high=1_000_000)
    psnr: float | None = option(None, "decoder: PSNR (dB) at which the marked decoder is held against the clean one; "
                                "field / subspace: each marked image's PSNR against its clean image (default: "
                                f"decoder {PSNR:g}, field {FIELD_PSNR:g}, subspace {SUBSPACE_PSNR:g})", low=10,
                                high=80)
    field_sigma: float = option(FIELD_SIGMA, "field: the blur (pixels) of the key's white-noise field", low=0,
                                high=16)
    weber: float = option(WEBER, "decoder: L0 of the image loss's luminance masking, squared changes weighted by "
                          "1 / (L0 + local brightness)^2 (0: plain MSE)", low=0, high=10)
    smooth: float = option(SMOOTH, "decoder: the image loss charges a change's fine detail (what a blur of sigma 1 "
                           "removes) this many times more (0: plain MSE)", low=0, high=1000)
    images: str | None = option(None, "detect: an .npy file of images (N, C, H, W) in [0, 1]")
    keyfile: str | None = option(None, "detect: key.json written by embed (default OUT/key.json)")


@dataclasses.dataclass(frozen=True)
class KeyBoundOptions:
    n: int = option(16, "marked and clean images of --cluster", low=2, high=10_000)
    key: str = option("12345", "the secret key (any string)")
    t: float = option(0.3, "time of the key as a fraction of the horizon sigma_t = 1", low=0, low_open=True, high=1)
    fit_steps: int = option(300, "Adam steps of each fit", low=1, high=100_000)
    fit_sigma: float = option(0.01, "pixel noise std of the fits (and of the MAP reading that starts them)", low=0,
                              low_open=True, high=1)
    ode_steps: int = option(10, "probability-flow ODE steps from t to t_min inside the fits (differentiated)", low=1,
                            high=1_000)
    attacks: tuple[str, ...] | None = option(None, "comma list of attacks (default: all)", parse=comma_list,
                                             choices=tuple(WATERMARK_ATTACKS), metavar="ATTACK,...")


@dataclasses.dataclass(frozen=True)
class ExperimentOptions:
    quick: bool = option(False, "small preset (under a minute on 2 CPU cores)")


@dataclasses.dataclass(frozen=True)
class ExperimentRunArg:
    run: str | None = option(None, "a trained run: also sweep N on its cluster 0 (latent MoG and U-Net experts, "
                             "metrics in the featurizer's space)", metavar="RUN")


def _tuple(v) -> tuple:
    return v if isinstance(v, tuple) else (v,)


# --- reading the values -----------------------------------------------------------------------------------


def _common(a) -> CommonOptions:
    c = dataclasses.replace(CommonOptions(), **given(a, CommonOptions))
    check(c)
    if c.device.startswith("cuda") and not torch.cuda.is_available():
        raise MolrmogError(f"--device {c.device}: no CUDA device is visible to torch (torch.cuda.is_available() is "
                           f"False); use --device cpu")
    return c


def _values(a) -> SimpleNamespace:
    """Every option of the command (its `Command.options`): the flags given, else the declared defaults,
    checked; plus the common options (`.common`)."""
    out = SimpleNamespace(common=_common(a))
    for cls in a.command_spec.options:
        cls, only = cls if isinstance(cls, tuple) else (cls, None)
        obj = dataclasses.replace(cls(), **given(a, cls))
        check(obj)
        out.__dict__.update({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
                             if only is None or f.name in only})
    return out


def _executor(a, device: str):
    from molrmog.training.executors import Executor

    o = dataclasses.replace(ExecutorOptions(), **given(a, ExecutorOptions))
    check(o)
    if o.ray_address and o.executor != "ray":
        raise MolrmogError("--ray-address needs --executor ray")
    return Executor(o.executor, o.workers, o.ray_address, device)


def _run_config(a) -> RunConfig:
    """The RunConfig the flags describe (common options included); kind flags fill expert_options."""
    from molrmog.pipeline.config import VAE_FIELDS

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


def _run(o):
    """The trained run the command reads (RUN), on the command's device."""
    from molrmog.pipeline.run import Run

    return Run.load(o.run, device=o.common.device)


# --- the commands ----------------------------------------------------------------------------------------


def _cmd_train(a) -> int:
    from molrmog.pipeline.report import finish_run
    from molrmog.pipeline.stages import load_config, train_run

    o = _values(a)
    if o.resume:
        if o.out is not None:
            raise MolrmogError("--resume RUN continues RUN in place; drop --out")
        saved = load_config(o.resume)
        _refuse_changes(a, saved, "--resume keeps the run's settings", "may be given with --resume")
        device = given(a, CommonOptions).get("device", saved.device)
        done = train_run(o.resume, resume=True, progress=o.common.progress, executor=_executor(a, device),
                         device=device, after=finish_run)
        out = o.resume
    else:
        cfg = _run_config(a)
        out = o.out or "runs/train"
        done = train_run(out, cfg, progress=o.common.progress, executor=_executor(a, cfg.device), after=finish_run)
    print(json.dumps(done["after"], indent=2))  # the report, written while the run was locked
    print(f"wrote {out}/report.md and sample grids")
    return 0


def _cmd_sample(a) -> int:
    import numpy as np

    from molrmog.core.artefacts import atomic_write
    from molrmog.core.outputs import save_grid
    from molrmog.pipeline.stages import sample_run

    o = _values(a)
    c, run = o.common, _run(o)
    kind = o.kind or run.mixture_kind()
    out = Path(o.out) if o.out else run.path / f"sample_{kind}.png"
    if out.is_dir():
        out = out / f"sample_{kind}.png"
    elif out.suffix.lower() != ".png":
        raise MolrmogError(f"--out {o.out} must be a .png file or an existing folder")
    imgs, _ = sample_run(run, kind, o.n, o.cls, o.sampler, o.steps, c.seed, c.device, progress=c.progress,
                         executor=_executor(a, c.device))
    if not bool(torch.isfinite(imgs).all()):
        raise MolrmogError(f"the {kind} experts of {o.run} produced non-finite images (their weights or the VAE's "
                           f"are damaged, or the sampler diverged: try --sampler heun); nothing was written")
    save_grid(out, imgs, min(8, o.n))
    if o.npy:
        atomic_write(out.with_suffix(".npy"), lambda p: np.save(open(p, "wb"), imgs.numpy()))
    print(f"wrote {out}" + (f" and {out.with_suffix('.npy')}" if o.npy else ""))
    return 0


def _cmd_synth(a) -> int:
    from molrmog.experiments.synth import check_size, run_synth

    o = _values(a)
    check_size(o)
    res = run_synth(o.out, D=o.D, K=o.K, d=o.d, n=o.n, r=o.r, separation=o.separation, schedule=o.schedule,
                    sampler=o.sampler, steps=o.steps, grid=o.grid, samples=o.samples, seed=o.common.seed,
                    device=o.common.device, progress=o.common.progress)
    summary = {k: res[k] for k in ("energy_distance", "energy_distance_true_vs_true", "sliced_w2",
                                   "sliced_w2_true_vs_true")}
    summary["mode_weight_max_abs_error"] = res["mode_weights_generated"]["max_abs"]
    print(json.dumps(summary, indent=2))
    print(f"wrote {o.out}/synth.png and {o.out}/synth.json")
    return 0


def _cmd_featurizer(a) -> int:
    from molrmog.evaluation.featurizer import featurizer_dir, train_featurizer

    o = _values(a)
    c = o.common
    m = train_featurizer(o.dataset, cache=o.cache, steps=o.steps, seed=c.seed, size=o.size, channels=o.channels,
                         data_dir=o.data_dir, device=c.device, progress=c.progress, force=o.force)
    print(json.dumps({"dataset": o.dataset, "test_accuracy": round(float(m.test_accuracy), 4),
                      "parameters": m.num_parameters()}, indent=2))
    print(f"featurizer in {featurizer_dir(o.dataset, o.cache)}")
    return 0


def _cmd_evaluate(a) -> int:
    from molrmog.evaluation.evaluate import evaluate_run

    o = _values(a)
    c = o.common
    run = _run(o)
    evaluate_run(run, samples=o.samples, reference=o.reference, kinds=o.kinds, memorisation=not o.no_memorisation,
                 threshold=o.threshold, cache=o.cache, seed=c.seed, device=c.device, progress=c.progress,
                 draws=o.draws)
    print((run.path / "evaluation.md").read_text())
    print(f"wrote {o.run}/evaluation.json, evaluation.md and evaluation_samples.png")
    return 0


def _cmd_jacobian(a) -> int:
    from molrmog.evaluation.evaluate import jacobian_spectra

    o = _values(a)
    res = jacobian_spectra(_run(o), kinds=o.kinds, ts=o.t, cluster=o.cluster, points=o.points, tol=o.tol,
                           memorisation=not o.no_memorisation, seed=o.common.seed, out=o.out)
    ranks = {m: {t: v["rank_median"] for t, v in per_t.items()} for m, per_t in res["models"].items()}
    print(json.dumps({"numerical_rank_median": ranks}, indent=2))
    print(f"wrote {o.out or o.run + '/jacobian'}/jacobian.csv, jacobian.json and jacobian.png")
    return 0


def _cmd_roundtrip(a) -> int:
    from molrmog.evaluation.evaluate import roundtrip

    o = _values(a)
    res = roundtrip(_run(o), kinds=o.kinds, samples=o.samples, seed=o.common.seed, out=o.out)
    print(json.dumps({"round_trip_median_over_clusters": res["median_over_clusters"]}, indent=2))
    print(f"wrote {o.out or o.run + '/roundtrip'}/roundtrip.csv, roundtrip.json and roundtrip.png")
    return 0


def _cmd_key_bound(a) -> int:
    from molrmog.applications.watermark import key_bound

    o = _values(a)
    res = key_bound(_run(o), kind=o.kind, cluster=o.cluster, n=o.n, key=o.key, fraction=o.t, seed=o.common.seed,
                    sigma=o.fit_sigma, steps=o.fit_steps, ode_steps=o.ode_steps, attacks=o.attacks, out=o.out)
    print(json.dumps({a["attack"]: {k: round(a[k], 5) for k in ("excess_marked", "excess_clean", "auc")}
                      for a in res["attacks"]}, indent=2))
    print(f"wrote {o.out or o.run + '/watermark'}/key_bound.json, key_bound.csv, key_bound.md and key_bound.png")
    return 0


def _cmd_few_step(a) -> int:
    from molrmog.evaluation.evaluate import few_step_images

    o = _values(a)
    c = o.common
    res = few_step_images(_run(o), kinds=o.kinds, sampler=o.sampler, steps=o.steps, samples=o.samples,
                          reference=o.reference, cache=o.cache, seed=c.seed, out=o.out, progress=c.progress,
                          draws=o.draws)
    for r in res["rows"]:
        print(f"{r['kind']:10s} {r['sampler']:8s} {r['steps']:4d} steps  FID {r['fid']:8.2f}  recall "
              f"{r['recall']:.3f}  {r['images_per_second']:9.1f} images/s")
    print(f"wrote {o.out or o.run + '/few_step'}/few_step_{o.sampler}.csv, .json and .png")
    return 0


def _cmd_edit(a) -> int:
    from molrmog.applications.editing import edit_run

    o = _values(a)
    if o.mask is not None and len(o.mask) != 4:
        raise MolrmogError(f"--mask must be x0,y0,x1,y1 in pixels, got {','.join(map(str, o.mask))}")
    res = edit_run(_run(o), kind=o.kind, cluster=o.cluster, image=o.image, seed=o.common.seed, fraction=o.t,
                   directions=o.directions, lambdas=o.lambdas, mask=o.mask, null_tol=o.null_tol,
                   held_out=o.held_out, out=o.out)
    print(json.dumps({k: res[k] for k in ("t", "singular_values", "summary", "held_out_summary",
                                          "locality_without_projection") if k in res}, indent=2))
    print(f"wrote {o.out or o.run + '/edit'}/edit.png and edit.json")
    return 0


def _cmd_watermark(a) -> int:
    from molrmog.applications import watermark as wm

    o = _values(a)
    c, run = o.common, _run(o)
    how = {"kind": o.kind, "key": o.key, "fraction": o.t, "method": o.method, "invert_steps": o.invert_steps,
           "invert_sigma": o.invert_sigma, "ring_mix": o.ring_mix, "progress": c.progress,
           "signature": {"bits": o.bits, "mark_steps": o.mark_steps, "weber": o.weber, "smooth": o.smooth,
                         "field_sigma": o.field_sigma, **({"psnr": o.psnr} if o.psnr is not None else {}),
                         **({"extractor_steps": o.extractor_steps} if o.extractor_steps else {})}}
    if o.action == "evaluate":
        res = wm.evaluate_watermark(run, n=o.n, strength=o.strength, seed=c.seed, cache=o.cache, out=o.out,
                                    fid_samples=o.fid_samples, draws=o.draws, **how)
        print(json.dumps({k: res[k] for k in ("attacks", "psnr_db", "fid_change")}, indent=2))
        print(f"wrote {o.out or o.run + '/watermark'}/watermark.json, watermark.md and watermark.png")
    elif o.action == "embed":
        res = wm.embed_run(run, cluster=o.cluster, n=o.n, strength=o.strength, seed=c.seed, out=o.out, **how)
        print(f"wrote {res['out']}/watermarked.npy, watermarked.png and key.json (threshold {res['threshold']:.4f}, "
              f"1% false positives on clean images)")
    else:
        if not o.images:
            raise MolrmogError("watermark detect needs --images FILE.npy")
        scores, keyfile = wm.detect_run(run, o.images, keyfile=o.keyfile, out=o.out, kind=o.kind)
        for i, v in enumerate(scores.tolist()):
            print(f"{i}\t{v:.4f}\t{'watermarked' if v > keyfile['threshold'] else 'clean'}")
    return 0


def _cmd_compare(a) -> int:
    from molrmog.evaluation.compare import compare
    from molrmog.pipeline.stages import load_config

    o = _values(a)
    out = o.out or "runs/compare"
    cfg = _run_config(a)
    if (Path(out) / "dedicated" / "config.json").is_file():  # a comparison to continue: strict, as train --resume
        _refuse_changes(a, load_config(Path(out) / "dedicated"), f"{out} holds a comparison, continued with its "
                        f"runs' settings", "may be given to continue it (or choose another --out)")
    compare(out, cfg, unified=not o.no_unified, samples=o.samples, reference=o.reference, cache=o.cache,
            progress=o.common.progress, executor=_executor(a, cfg.device), draws=o.draws)
    print((Path(out) / "comparison.md").read_text())
    print(f"wrote {out}/comparison.md, comparison.json, comparison_samples.png, comparison_losses.png")
    return 0


def _cmd_experiment(a) -> int:
    from molrmog.experiments.registry import EXPERIMENTS

    o = _values(a)
    name = a.command_spec.name
    out = o.out or f"runs/{name}"
    extra = {"run": o.run} if getattr(o, "run", None) else {}
    if extra and not (Path(o.run) / "config.json").is_file():
        raise MolrmogError(f"--run {o.run}: not a run directory (no config.json); train one with molrmog train")
    res = EXPERIMENTS[name][0](out, preset="quick" if o.quick else "default", seed=o.common.seed,
                               progress=o.common.progress, executor=_executor(a, o.common.device), **extra)
    text = json.dumps({k: v for k, v in res.items() if k != "config"}, indent=2)
    print(text if len(text) < 3000 else text[:3000] + "\n...")
    print(f"wrote results into {out}")
    return 0


# --- the commands, declared -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
    """One command: its function, its help, the option classes whose flags it takes (a class, or (class,
    fields) for some of its fields), the shared flag groups, and its place (`group`: a sub-command of
    `molrmog analyze` or `molrmog experiment`)."""

    name: str
    func: Callable[[argparse.Namespace], int]
    help: str
    description: str
    options: tuple = ()
    shared: tuple[str, ...] = ("common",)  # "common": CommonOptions; "executor": ExecutorOptions
    run_options: bool = False  # RunConfig's flags and every kind's (train, compare)
    group: str | None = None
    out: str | None = None  # --out's default, in words (None: the command has no --out)
    param_flags: dict = dataclasses.field(default_factory=dict)  # library parameter -> flag, where they differ


GROUPS = {"analyze": ("analyses of trained runs (jacobian, few-step, roundtrip, key-bound)",
                      "Analyses of a trained run."),
          "experiment": ("run a theory experiment", "Run one of the experiments that check the theory claims; each "
                         "writes CSV + JSON numbers and PNG figures into --out.")}


def commands() -> tuple[Command, ...]:
    from molrmog.experiments.registry import EXPERIMENTS
    from molrmog.experiments.synth import SynthOptions

    data = (RunConfig, ("dataset", "data_dir", "size", "channels"))
    cmds = [
        Command("synth", _cmd_synth, "sample a random MoLR-MoG with its exact score (PF-ODE) and compare with the "
                "truth", "Draw a random MoLR-MoG, run the probability-flow ODE with the exact closed-form score, and "
                "write synth.png (2-D projection of data vs generated points, coloured by subspace) and synth.json "
                "(energy distance, sliced W2, mode-weight error) into --out.", (SynthOptions,)),
        Command("train", _cmd_train, "train VAEs and latent experts on an image dataset", TRAIN_HELP,
                (OutArg, TrainOptions), ("common", "executor"), run_options=True, out="runs/train"),
        Command("sample", _cmd_sample, "generate images from a trained run", "Generate images with one expert kind "
                "of a trained run: a cluster is drawn by its weight (or fixed with --class), its latent is sampled "
                "with the sampler and decoded by that cluster's VAE. Writes a PNG grid (and .npy with --npy).",
                (RunArg, KindArg, SampleOptions, OutArg), ("common", "executor"), out="RUN/sample_<kind>.png; a "
                ".png path or an existing folder", param_flags={"cluster": "--class"}),
        Command("featurizer", _cmd_featurizer, "train the offline feature extractor (classifier) of a dataset",
                "Train a small CNN classifier on the dataset's train split, once; it is cached (config.json + "
                "diffusion_pytorch_model.safetensors + featurizer.json with its test accuracy) under --cache, "
                "$MOLRMOG_CACHE or ~/.cache/molrmog. Its penultimate features serve FID, KID, precision/recall and "
                "the similarity scores; its softmax the class score.", (data, FeaturizerOptions, CacheArg)),
        Command("evaluate", _cmd_evaluate, "FID, KID, precision/recall, class and similarity scores of a run",
                EVALUATE_HELP, (RunArg, KindsArg, EvalOptions, CacheArg, MemorisationArg, EvaluateOptions)),
        Command("jacobian", _cmd_jacobian, "singular values of the denoiser's Jacobian per expert kind and t",
                "Singular values of d x0_hat / d x_t of each expert kind's latent denoiser (and the memorisation "
                "baseline) at noised training latents of one cluster, for several t; numerical rank = number of "
                "singular values above --tol times the largest. Writes jacobian.csv, jacobian.json and jacobian.png "
                "into --out.", (RunArg, KindsArg, ClusterArg, JacobianOptions, MemorisationArg, OutArg),
                group="analyze", out="RUN/jacobian"),
        Command("roundtrip", _cmd_roundtrip, "how far a VAE decode-encode round trip moves the latents the experts "
                "generate", "Per cluster and expert kind: ||E(D(z)) - z|| / ||z - mean|| (E: encoder mean, D: "
                "decoder, mean: the cluster's mean training latent) for latents z drawn from the expert (the exact "
                "sampler in one step for MoG / Gaussian experts, else the run's sampler) and for training latents. "
                "Writes roundtrip.csv, roundtrip.json and roundtrip.png into --out.",
                (RunArg, KindsArg, RoundtripOptions, OutArg), group="analyze", out="RUN/roundtrip"),
        Command("few-step", _cmd_few_step, "FID of expert kinds at few sampling steps (ddpm, ddim, exact, ...)",
                "Sample each expert kind of a trained run with --sampler at each of --steps (and with the run's own "
                "sampler as the reference) and measure FID, KID, precision, recall, class score and images/s "
                "against the training images. Writes few_step_<sampler>.csv/.json/.png into --out. The exact "
                "sampler needs MoG / Gaussian experts.", (RunArg, KindsArg, FewStepOptions, EvalOptions, CacheArg,
                                                          OutArg), group="analyze", out="RUN/few_step"),
        Command("key-bound", _cmd_key_bound, "how far images lie from those the expert makes with the ring key, "
                "clean and under attacks", KEY_BOUND_HELP, (RunArg, KindArg, ClusterArg, KeyBoundOptions, OutArg),
                group="analyze", out="RUN/watermark"),
        Command("edit", _cmd_edit, "LOCO-style edits along the denoiser Jacobian's singular vectors", EDIT_HELP,
                (RunArg, KindArg, ClusterArg, EditOptions, OutArg), out="RUN/edit"),
        Command("watermark", _cmd_watermark, "watermarks (latent or decoder): embed, detect, evaluate", WATERMARK_HELP,
                (WatermarkOptions, RunArg, KindArg, ClusterArg, CacheArg, OutArg), out="RUN/watermark"),
        Command("compare", _cmd_compare, "every expert kind on the same dedicated VAEs (and dedicated vs unified "
                "VAE)", COMPARE_HELP, (OutArg, CompareOptions, EvalOptions, CacheArg), ("common", "executor"),
                run_options=True, out="runs/compare")]
    for name, (_, text, files) in EXPERIMENTS.items():
        extra = (ExperimentRunArg,) if name == "generalisation" else ()
        cmds.append(Command(name, _cmd_experiment, text, f"{text}. Writes {files}.",
                            (ExperimentOptions, OutArg, *extra), ("common", "executor"), group="experiment",
                            out=f"runs/{name}"))
    return tuple(cmds)


TRAIN_HELP = (
    "Train one VAE per cluster (or one unified VAE, or a shared backbone with per-cluster LoRA adapters) and a small "
    "latent expert per cluster for each expert kind; write a run directory with models, losses, loss curves, sample "
    "grids and report.md. Every run option below is stored in RUN/config.json. Checkpoints are written every "
    "--checkpoint-every steps, only from states whose loss and parameters are finite and whose loss has not "
    "exploded (100x its running median); divergence stops with exit 1 and keeps the last good checkpoint. One "
    "process trains a run at a time (RUN/.lock). --resume RUN continues a stopped run with its saved settings: flags "
    "that would change them are refused; only --device, --no-progress, --debug, --executor, --workers and "
    "--ray-address may be given.")
EVALUATE_HELP = (
    "Sample every expert kind of a trained run (and the memorisation baseline: the exact denoiser of each cluster's "
    "empirical latent distribution) and measure FID, KID, precision/recall against the training images and the "
    "class score in the features of the dataset's own classifier (`molrmog featurizer`, trained first if missing); "
    "generalisation, reproducibility and probability-flow distance between models from shared noise. The test split "
    "is measured alongside as the floor. Writes evaluation.json, evaluation.md and evaluation_samples.png into RUN.")
EDIT_HELP = (
    "Invert an image (a training image of the cluster with --image, else a generated one) with the probability-flow "
    "ODE to the edit time, find the top right singular vectors of d decode(x0_hat) / d u_t (closed form for MoG / "
    "Gaussian experts, Jacobian-vector products otherwise; with --mask, the directions that change the pixels inside "
    "it most among those in the null space of the pixels outside it), move along them by each lambda, run the ODE "
    "back and decode. Writes edit.png (rows: directions, columns: lambdas) and edit.json (singular values, locality, "
    "linearity, transferability and composability on the image and on held-out test images).")
KEY_BOUND_HELP = (
    "For --n marked and --n clean images of --cluster (the ring key at --t, as `watermark evaluate` draws them), "
    "without and under each attack: fit each image by the expert's own sampler from t (the latent at t through the "
    "differentiated probability-flow ODE and the decoder; a MAP reading of the image at --fit-sigma starts it) "
    "twice, once free and once with the key held, and report the excess of the held fit (RMS per pixel). A "
    "detector can tell marked from clean images only by that distance: where an attack leaves marked images as "
    "far from the keyed images as clean ones, no statistic finds the key. Also the AUC of -excess itself (a "
    "generalised likelihood ratio). Writes key_bound.json/.csv/.md/.png into --out.")
WATERMARK_HELP = (
    "embed: generate --n watermarked images of --cluster (by default, --method auto, with the subspace mark where the"
    " expert has low-rank modes (MoG) and the field otherwise; with --method ring at the small time --t the ring key "
    "of Tree-Ring / Shallow Diffuse on latent channel 0's spectrum, or with --method null a keyed pattern in the null"
    " space of the denoiser's Jacobian, or with --method decoder the key's --bits written by the cluster's decoder "
    "fine-tuned against an extractor network, Stable Signature's way, or with --method field the decoded images "
    "multiplied by 1 + eps f, f a smooth field drawn from the key, eps per image, or with --method subspace the "
    "decoded images moved so that their encodings step off their modes' subspaces along the key's directions) into "
    "watermarked.npy/.png and key.json (with the detection threshold: 1% false positives on clean images; decoder: "
    "also the extractor's folder and marked-vae-<cluster>.safetensors; field: the detector's folder and sigma; "
    "subspace: the statistic's calibration and the key's direction, chosen on the calibration images); detect: a "
    "score and a decision per image of an .npy file (encoder mean, "
    "MAP decoder inversion under the expert's law, ODE back to --t, statistic; decoder: the extractor's agreement "
    "with the key's bits; field: the detector's map correlated with the field; subspace: the residual of a fit of the"
    " decoder's manifold along the key's direction); evaluate: AUC and TPR at 1% FPR over --n watermarked and --n "
    "clean images, clean and under attacks (noise, blur, JPEG, brightness, VAE re-encoding), with PSNR of watermarked"
    " vs clean images and the FID change the key makes (median over --draws sets of --fid-samples marked / clean "
    "pairs from the same noise, beside that of white noise with each mark's MSE on the same clean images): "
    "watermark.json/.md/.png."
)
COMPARE_HELP = (
    "Train (or resume) OUT/dedicated with every expert kind of --experts on one VAE per cluster and OUT/unified with "
    "the headline kind (MoG) on one shared VAE, evaluate both (see `molrmog evaluate`) and write comparison.md, "
    "comparison.json, comparison_samples.png and comparison_losses.png into OUT.")


# --- the parser: a walk over COMMANDS --------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"molrmog: error: {self.prog.removeprefix('molrmog').strip() or 'molrmog'}: {message} "
                     f"(see {self.prog} --help)\n")


def _add_flags(p: argparse.ArgumentParser, cmd: Command, shared: dict) -> None:
    for cls in cmd.options:
        cls, only = cls if isinstance(cls, tuple) else (cls, None)
        skip = tuple(f.name for f in dataclasses.fields(cls) if only is not None and f.name not in only)
        add_options(p, cls, skip=skip, help_format={"out": cmd.out})
    if cmd.run_options:
        add_options(p, RunConfig, title="run options (molrmog.config.RunConfig)")
        for name in kind_names():
            kind = get_kind(name)
            add_options(p, kind.options, prefix=f"{name}-", title=f"{kind.label} options (--experts {name})")
    for name in cmd.shared:
        add_options(p, shared[name][0], title=shared[name][1])


def build_parser() -> argparse.ArgumentParser:
    from molrmog import __version__

    shared = {"common": (CommonOptions, "common options"),
              "executor": (ExecutorOptions, "parallel execution (molrmog.executors)")}
    parser = _Parser(prog="molrmog", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"molrmog {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    groups: dict = {}
    for cmd in commands():
        where = sub
        if cmd.group is not None:
            if cmd.group not in groups:
                g = sub.add_parser(cmd.group, help=GROUPS[cmd.group][0], description=GROUPS[cmd.group][1])
                groups[cmd.group] = g.add_subparsers(dest=cmd.group, metavar="NAME", required=True,
                                                     parser_class=_Parser)
            where = groups[cmd.group]
        p = where.add_parser(cmd.name, help=cmd.help, description=cmd.description)
        _add_flags(p, cmd, shared)
        p.set_defaults(func=cmd.func, command_spec=cmd)
    return parser


DESCRIPTION = ("Diffusion models on mixtures of low-rank subspaces with mixture-of-Gaussian latents (MoLR-MoG): "
               "closed-form scores, learnable mixture-of-experts score models, latent experts on dedicated VAEs, and "
               "the experiments that check the theory. Exit codes: 0 done, 2 bad input (one line), 1 training "
               "diverged / tasks failed / a bug, 130 interrupted.")


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
    cores other processes leave free (`molrmog.training.threads`); training tasks choose again when they start."""
    if os.environ.get(ENV) or not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(choose_threads())


def _in_flags(e: MolrmogError, args) -> str:
    """The message of a library error that starts with a parameter's name, with the command's flag for it
    (the command's `param_flags`, else --name-with-dashes)."""
    msg, param = str(e), getattr(e, "param", None)
    if not param or not msg.startswith(param):
        return msg
    spec = getattr(args, "command_spec", None)
    flag = (spec.param_flags.get(param) if spec else None) or f"--{param.replace('_', '-')}"
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
