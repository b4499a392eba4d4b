"""The configuration of a training run, declared once.

`RunConfig` is a frozen dataclass: every field is an `option` (help text, range, choices), so
`molrmog train --help` is generated from it, `check_config` validates every value in one pass
(before any work or file), and a run directory's `config.json` is `run_config_to_json(cfg)`.
Latent expert kinds bring their own options (`molrmog.models.kinds`): `expert_options` maps each kind
in `experts` to its options dataclass; on the command line they are `--<kind>-<option>`.

`CommonOptions` (device, seed, progress, debug) and `ExecutorOptions` (executor, workers,
ray-address) are the options every command shares; their flags are declared here, once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from molrmog.core.errors import MolrmogError
from molrmog.core.options import check, comma_list, from_dict, option, shape3, to_dict
from molrmog.core.samplers import any_model_samplers
from molrmog.core.schedules import SCHEDULES
from molrmog.models.kinds import KindOptions, default_kinds, get_kind, kind_names
from molrmog.models.layouts import LAYOUTS
from molrmog.models.vae import RECON_LOSSES
from molrmog.pipeline.data import DATASETS, get_dataset, split_spec
from molrmog.training.train import LR_SCHEDULES

__all__ = ["RunConfig", "CommonOptions", "ExecutorOptions", "check_config", "resolve_config", "config_from_json",
           "config_to_json", "default_latent", "dataset_defaults", "RESUME_SAFE", "RUN_FORMAT", "parse_device",
           "VAE_FIELDS", "BUDGET_POINTS"]

RUN_FORMAT = 2
# per-dataset defaults of the fields that are None in RunConfig come from the dataset's registry entry
# (`molrmog.pipeline.data.DATASETS`); anything it leaves out: FALLBACK_DEFAULTS
FALLBACK_DEFAULTS = {"vae_width": 32, "vae_steps": 400, "vae_beta": 0.1, "vae_lr": 2e-3, "vae_blocks": 0,
                     "vae_lr_schedule": "constant", "vae_cycle": 0.0, "vae_recon": "bernoulli",
                     "vae_batch": 128}
# the fields a run takes from --vae-from RUN (its data, clusters and VAEs)
VAE_FIELDS = ("dataset", "data_dir", "limit", "size", "channels", "skip_bad", "clusters", "vae", "latent", "vae_width",
              "vae_beta", "vae_steps", "vae_lr", "vae_batch", "vae_blocks", "vae_lr_schedule", "lora_rank",
              "vae_cycle", "vae_recon", "lora_steps")
# settings added to format 2 later, each with the value that gives what a run without the key did (it still loads):
# a value, or a function of the file's other keys
ADDED_KEYS = {"vae_cycle": 0.0, "vae_recon": "bernoulli", "lora_steps": lambda raw: raw.get("vae_steps")}
LORA_STEPS_DIVISOR = 4  # default LoRA adapter steps: vae_steps / 4
BUDGET_POINTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # snapshots along a budget, as fractions of it
MAX_IMAGES = 10**7


def parse_device(text: str) -> str:
    if text not in ("cpu", "cuda") and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise MolrmogError(f"device must be cpu, cuda or cuda:N, got {text!r}")
    return text


def _dataset(text: str) -> str:
    split_spec(text)  # a registered name (with its PATH where it takes one), else one error naming the choices
    return text


def _dataset_help() -> str:
    return ", ".join(d.spec_help() for d in DATASETS.values())


@dataclass(frozen=True)
class CommonOptions:
    """Options of every command."""

    device: str = option("cpu", "cpu, cuda or cuda:N", parse=parse_device)
    seed: int = option(0, "random seed", low=0, high=2**31 - 1)
    progress: bool = option(True, "show progress bars (--no-progress: one log line per stage instead)")
    debug: bool = option(False, "log debugging details and show tracebacks for bad input too")


@dataclass(frozen=True)
class ExecutorOptions:
    """Where independent tasks run (see `molrmog.training.executors`)."""

    executor: str = option("local", "local (this process, or a process pool with --workers N) or ray "
                           "(pip install 'molrmog[ray]')", choices=("local", "ray"))
    workers: int = option(1, "local: processes; ray: CPUs of the local Ray runtime", low=1, high=4096)
    ray_address: str | None = option(None, "join this Ray cluster (e.g. ray://head:10001 or auto) instead of "
                                     "starting one")


@dataclass(frozen=True)
class RunConfig:
    """A training run: data, clusters, VAEs, latent experts, sampling. Every field is a flag of `molrmog train`."""

    dataset: str = option("digits", lambda: f"a registered dataset: {_dataset_help()}", parse=_dataset)
    data_dir: str | None = option(None, "folder with the dataset's files (default $MOLRMOG_DATA/<dataset>; "
                                  "fashion-mnist: else /usr/share/datasets/fashion-mnist)")
    limit: int | None = option(None, "use a random subset of this many training images", low=1, high=MAX_IMAGES)
    size: int = option(28, "image size of folder datasets", low=4, high=1024)
    channels: int = option(1, "image channels of folder datasets", choices=(1, 3))
    skip_bad: bool = option(False, "skip unreadable images of folder datasets instead of stopping")
    clusters: int | None = option(None, "cluster with k-means on unified-VAE features into this many clusters "
                                  "instead of using the labels", low=1, high=10_000)
    experts: tuple[str, ...] | None = option(None, "comma list of latent expert kinds (default: every registered "
                                             "kind marked default)", parse=comma_list, choices=kind_names,
                                             metavar="KIND,...")
    vae: str = option("dedicated", "VAE layout: one per cluster, one for all, or a shared backbone with "
                      "per-cluster LoRA adapters", choices=LAYOUTS.names)
    latent: tuple[int, int, int] | None = option(None, "latent shape c,h,w (default: digits 2,4,4; "
                                                 "fashion-mnist 4,7,7; folders 4,size/4,size/4)", parse=shape3,
                                                 metavar="C,H,W")
    vae_width: int | None = option(None, "VAE base channels (default per dataset)", low=1, high=1024)
    vae_beta: float | None = option(None, "KL weight of the VAEs (default per dataset)", low=0, high=1e4)
    vae_steps: int | None = option(None, "training steps per VAE (default per dataset)", low=1, high=10**7)
    vae_lr: float | None = option(None, "VAE learning rate (default per dataset)", low=0, low_open=True, high=10.0)
    vae_lr_schedule: str | None = option(None, "VAE learning-rate schedule (default per dataset)",
                                         choices=LR_SCHEDULES)
    vae_blocks: int | None = option(None, "residual blocks after each of the VAE's two lowest-resolution stages "
                                    "(default per dataset)", low=0, high=16)
    vae_batch: int | None = option(None, "VAE training batch size (default per dataset)", low=1, high=2**16)
    vae_recon: str | None = option(None, "VAE reconstruction likelihood: bernoulli (cross-entropy), normal or "
                                   "laplace (each with a learned per-pixel scale) (default per dataset)",
                                   choices=RECON_LOSSES)
    vae_cycle: float | None = option(None, "weight of the VAEs' cycle term ||E(D(m)) - m||^2 at the encoder mean m "
                                     "(0: none; default per dataset): the VAE then inverts what the experts generate",
                                     low=0, high=1e4)
    vae_from: str | None = option(None, "reuse the data, clusters and VAEs of this trained run (its VAE options "
                                  "apply; they are not trained again)", metavar="RUN")
    budget: float | None = option(None, "seconds of expert training per kind, all clusters together (the EM start "
                                  "included; each cluster gets an equal share; --<kind>-steps is ignored); "
                                  "snapshots are kept at 1/32 ... 1 of it", low=0, low_open=True, high=10**7)
    lora_rank: int = option(4, "rank of the per-cluster LoRA adapters (--vae lora)", low=1, high=1024)
    lora_steps: int | None = option(None, "training steps per LoRA adapter (--vae lora; default: a quarter of "
                                    "--vae-steps)", low=1, high=10**7)
    schedule: str = option("vp", "noise schedule of the latent experts", choices=SCHEDULES.names)
    sampler: str = option("heun", "sampler for report grids and evaluation", choices=any_model_samplers)
    sample_steps: int = option(30, "sampler steps", low=1, high=10_000)
    samples_per_class: int = option(8, "samples per cluster in the report's grids", low=1, high=1000)
    checkpoint_every: int = option(50, "checkpoint every this many training steps", low=1, high=10**7)
    seed: int = option(0, "random seed", low=0, high=2**31 - 1, cli=False)  # flag: CommonOptions
    device: str = option("cpu", "cpu, cuda or cuda:N", parse=parse_device, cli=False)  # flag: CommonOptions
    expert_options: dict[str, Any] = field(default_factory=dict)  # kind -> its options (flags --<kind>-<option>)

    def options_of(self, kind: str) -> KindOptions:
        """The options of one trained kind (its defaults when the run did not set them)."""
        return self.expert_options.get(kind) or get_kind(kind).options()


RESUME_SAFE = ("device", "progress", "debug", "executor", "workers", "ray_address")


def default_latent(dataset: str, size: int) -> tuple[int, int, int]:
    return get_dataset(dataset).defaults.get("latent", (4, max(1, size // 4), max(1, size // 4)))


def dataset_defaults(cfg: RunConfig, image_shape) -> RunConfig:
    """A copy with every per-dataset default (fields left None) filled in."""
    defaults = {**FALLBACK_DEFAULTS, **get_dataset(cfg.dataset).defaults}
    defaults["latent"] = default_latent(cfg.dataset, image_shape[-1])
    cfg = dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    if cfg.lora_steps is None:  # an adapter starts from a backbone trained on every image (README: the LoRA layout)
        cfg = dataclasses.replace(cfg, lora_steps=max(1, cfg.vae_steps // LORA_STEPS_DIVISOR))
    return cfg


def check_config(cfg: RunConfig, image_shape=None, source: str | None = None) -> None:
    """Validate a whole run configuration: every field (types, ranges, choices), every kind's options,
    and -- with the data's image shape -- the latent shape and what depends on it. Problems name the
    flags, or with `source` (a config.json read back) the file and its keys."""
    if not isinstance(cfg, RunConfig):
        raise MolrmogError(f"a run configuration must be a RunConfig, got {type(cfg).__name__}")
    key = None if source is None else f"{source}: "
    check(cfg, key=key)
    experts_name = "--experts" if source is None else f"{source}: experts"
    experts = cfg.experts if cfg.experts is not None else default_kinds()
    if len(set(experts)) != len(experts):
        raise MolrmogError(f"{experts_name} lists a kind twice: {','.join(experts)}")
    if not isinstance(cfg.expert_options, dict):
        raise MolrmogError("expert_options must map expert kinds to their options")
    extra = sorted(set(cfg.expert_options) - set(experts))
    if extra:
        raise MolrmogError(f"options were given for expert kind(s) {extra} that {experts_name} does not train "
                           f"({','.join(experts)}); drop them or add the kind to {experts_name}")
    latent = cfg.latent
    for kind in experts:
        entry = get_kind(kind)
        opts = cfg.options_of(kind)
        if type(opts) is not entry.options:
            raise MolrmogError(f"the options of expert kind {kind!r} must be {entry.options.__name__}")
        check(opts, prefix=f"{kind}-", key=None if source is None else f"{source}: expert_options.{kind}.")
        if entry.check is not None and latent is not None:
            entry.check(opts, latent)
    if image_shape is not None and latent is not None:
        from molrmog.models.vae import check_latent_shape

        check_latent_shape(image_shape, latent)
        if math.prod(latent) > 2**16:
            raise MolrmogError(f"latent {'x'.join(map(str, latent))} has {math.prod(latent)} dimensions; at most "
                               f"65536 are supported")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise MolrmogError("device cuda was asked for but no CUDA device is available; use cpu", param="device")


def resolve_config(cfg: RunConfig, image_shape) -> RunConfig:
    """A copy with the latent shape filled in from the dataset, validated against the data (the caller's
    object is left as it was)."""
    check_config(cfg)
    if cfg.experts is None:
        cfg = dataclasses.replace(cfg, experts=default_kinds())
    cfg = dataset_defaults(cfg, image_shape)
    # every trained kind's options written out, so the run does not depend on this version's defaults
    cfg = dataclasses.replace(cfg, expert_options={k: cfg.options_of(k) for k in cfg.experts})
    check_config(cfg, image_shape)
    return cfg


def config_to_json(cfg: RunConfig) -> dict:
    return {"format_version": RUN_FORMAT, **to_dict(cfg)}


def config_from_json(raw: Any, source: str) -> RunConfig:
    """The RunConfig a run's config.json describes; any damage is one MolrmogError naming the file."""
    where = f"{source}"
    if not isinstance(raw, dict):
        raise MolrmogError(f"{where} must hold a JSON object (a run configuration), got {type(raw).__name__}")
    raw = dict(raw)
    version = raw.pop("format_version", None)
    if version != RUN_FORMAT:
        raise MolrmogError(f"{where}: run format {version!r} is not the format this molrmog reads ({RUN_FORMAT}); "
                           f"it was written by another version: train the run again")
    for key, before in ADDED_KEYS.items():  # keys added after format 2 was fixed: absent = what runs did before
        if key not in raw:
            raw[key] = before(raw) if callable(before) else before
    missing = sorted({f.name for f in dataclasses.fields(RunConfig)} - set(raw))
    if missing:
        raise MolrmogError(f"{where} lacks the key(s) {missing}; a run's config.json holds every setting (it was "
                           f"edited or damaged): restore it or train the run again")
    opts_raw = raw.pop("expert_options")
    cfg = from_dict(RunConfig, raw, where)
    if not isinstance(opts_raw, dict):
        raise MolrmogError(f"{where}: expert_options must be a JSON object")
    if not isinstance(cfg.experts, tuple) or not all(isinstance(e, str) for e in cfg.experts):
        raise MolrmogError(f"{where}: experts must be a list of kind names, got {cfg.experts!r}")
    opts = {}
    for kind, o in opts_raw.items():
        opts[kind] = from_dict(get_kind(kind).options, o, f"{where}: expert_options.{kind}")
    cfg = dataclasses.replace(cfg, expert_options=opts)
    check_config(cfg, source=where)
    return cfg
