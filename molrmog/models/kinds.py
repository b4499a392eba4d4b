"""The registry of latent expert kinds, and `LatentExpert` (one cluster's expert with its standardisation).

A kind is one `ExpertKind` entry: the score-model class it trains, the options it takes (a
dataclass of `molrmog.core.options.option` fields -- its own steps, learning rate, batch, EMA, width...),
how to build the model's constructor arguments from a latent shape and those options, and an
optional data-driven start. Pipeline, compare, evaluation, the command line (`--<kind>-<option>`
flags) and the benchmarks iterate over this registry; adding a kind is one class and one
`register(ExpertKind(...))`:

    @dataclass(frozen=True)
    class MyOptions(KindOptions):
        width: int = option(64, "hidden width", low=1, high=4096)

    register(ExpertKind("mine", "My expert", MyScoreModel, MyOptions,
                        net_config=lambda latent, o, schedule, seed: {"D": prod(latent), "width": o.width,
                                                                      "schedule": schedule, "seed": seed}))

Seeds come from stable names: `expert_seed(seed, kind, k)` = seed + 1000 * salt + k, where the salt
is declared with the kind (built-in kinds: 1, 2, 3; otherwise derived from the kind's name), never
from a position in a list.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from molrmog.core.artefacts import FORMAT_VERSION, Model, build_from_config, register_to_config
from molrmog.core.errors import MolrmogError
from molrmog.core.options import option
from molrmog.models.experts import GaussianExpert, MLPScore, MoEScore, MoGExpert, ScoreModel, UNetScore
from molrmog.models.smd import SMDMLPScore, SMDUNetScore
from molrmog.training.train import LR_SCHEDULES

__all__ = ["KindOptions", "ExpertKind", "register", "unregister", "get_kind", "kind_names", "headline_kinds",
           "baseline_kinds", "default_kinds",
           "expert_seed", "LatentExpert", "model_config", "MAX_STEPS"]

MAX_STEPS = 10**7


@dataclass(frozen=True)
class KindOptions:
    """Options every latent expert kind has (flags --<kind>-steps, --<kind>-lr, ...)."""

    steps: int = option(400, "training steps per expert", low=1, high=MAX_STEPS)
    lr: float = option(1e-2, "Adam learning rate", low=0, low_open=True, high=10.0)
    batch: int = option(128, "training batch size", low=1, high=2**16)
    ema_decay: float = option(0.99, "EMA decay of the weights; 0 turns EMA off", low=0, high=0.99999)
    lr_schedule: str = option("constant", "learning-rate schedule: constant, or cosine (to 0 over the steps, or over "
                              "the expert's share of --budget)", choices=LR_SCHEDULES)


@dataclass(frozen=True)
class ExpertKind:
    """One latent expert kind (see the module docstring)."""

    name: str
    label: str  # for tables and figures
    net_class: type
    options: type = KindOptions
    net_config: Callable[[tuple, Any, dict, int], dict] | None = None  # (latent, options, schedule, seed) -> kwargs
    init_from_data: Callable[[Any, Tensor, Any, int], None] | None = None  # (net, u (N, d), options, seed)
    check: Callable[[Any, tuple], None] | None = None  # (options, latent) -> raise MolrmogError when they clash
    resolve: Callable[[Any, Tensor, int], tuple[Any, dict]] | None = None  # (options, u, seed) -> (options, info)
    finish: Callable[[Any, Any, Tensor], dict] | None = None  # (net, options, u (N, d)) -> info: after training,
    # and on each snapshot
    seed_salt: int | None = None
    default: bool = True  # trained when --experts is not given
    headline: bool = False  # the project's own model: compare also trains it on a unified VAE
    baseline: bool = False  # the reference the headline kind is measured against (benchmark ratios)
    description: str = ""

    @property
    def salt(self) -> int:
        return self.seed_salt if self.seed_salt is not None else 4 + zlib.crc32(self.name.encode()) % 997

    def build(self, latent, options, schedule: dict, seed: int) -> ScoreModel:
        return self.net_class(**self.net_config(tuple(latent), options, schedule, seed))

    def finished(self, expert: LatentExpert, options, u: Tensor) -> dict:
        """Apply the kind's `finish` to a trained expert, given its standardised training latents u (its config
        follows); returns what it reports."""
        if self.finish is None:
            return {}
        info = self.finish(expert.net, options, u)
        expert.register_to_config(net_config=model_config(expert.net))
        return info


_REGISTRY: dict[str, ExpertKind] = {}


def register(kind: ExpertKind, *, replace: bool = False) -> ExpertKind:
    """Add a kind; its name must be a new plain identifier and its seed salt unused."""
    if not kind.name.replace("_", "").isalnum() or kind.name != kind.name.lower():
        raise MolrmogError(f"an expert kind name must be lower-case letters, digits or _, got {kind.name!r}")
    if kind.name in _REGISTRY and not replace:
        raise MolrmogError(f"expert kind {kind.name!r} is already registered")
    clash = [k.name for k in _REGISTRY.values() if k.name != kind.name and k.salt == kind.salt]
    if clash:
        raise MolrmogError(f"expert kind {kind.name!r}: seed salt {kind.salt} is used by {clash[0]!r}; "
                           f"declare another seed_salt")
    if not dataclasses.is_dataclass(kind.options) or not issubclass(kind.options, KindOptions):
        raise MolrmogError(f"expert kind {kind.name!r}: options must be a dataclass derived from KindOptions")
    _REGISTRY[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_kind(name: str) -> ExpertKind:
    if name not in _REGISTRY:
        raise MolrmogError(f"unknown expert kind {name!r}; choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def kind_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def default_kinds() -> tuple[str, ...]:
    """The kinds a run trains when --experts is not given."""
    return tuple(k.name for k in _REGISTRY.values() if k.default)


def headline_kinds() -> tuple[str, ...]:
    return tuple(k.name for k in _REGISTRY.values() if k.headline)


def baseline_kinds() -> tuple[str, ...]:
    return tuple(k.name for k in _REGISTRY.values() if k.baseline)


def expert_seed(seed: int, kind: str, k: int) -> int:
    """The seed of (kind, cluster k): from names, not positions."""
    return int(seed) + 1000 * get_kind(kind).salt + int(k)


def model_config(model: Model) -> dict:
    """A model's constructor config with its class name: what `build_from_config` rebuilds."""
    return {"_class_name": type(model).__name__, "_molrmog_format": FORMAT_VERSION,
            **{k: v for k, v in model.config.items() if not k.startswith("_")}}


class LatentExpert(Model):
    """The expert of one cluster: a score model of its kind in standardised latent coordinates
    u = (z - shift) / scale, the statistics stored beside it as buffers.

    kind: a registered kind; latent: the (c, h, w) latent shape; net_config: the score model's config
    (`model_config(net)`), rebuilt with the kind's model class as `self.net`."""

    @register_to_config
    def __init__(self, kind: str = "mog", latent=(2, 4, 4), net_config: dict | None = None):
        super().__init__()
        entry = get_kind(kind)
        self.kind, self.latent = kind, tuple(int(v) for v in latent)
        if net_config is None:
            raise MolrmogError("LatentExpert needs the config of its score model (net_config=model_config(model))")
        self.net = build_from_config(net_config, entry.net_class, f"the {kind} expert's net_config", f"{kind} model")
        d = math.prod(self.latent)
        self.register_buffer("shift", torch.zeros(d))
        self.register_buffer("scale", torch.ones(d))

    @classmethod
    def wrap(cls, kind: str, latent, net: ScoreModel) -> LatentExpert:
        """A LatentExpert whose net starts as a copy of `net` (weights included)."""
        e = cls(kind, tuple(latent), model_config(net))
        e.net.load_state_dict(net.state_dict())
        return e

    @property
    def schedule(self):
        return self.net.schedule

    def standardise(self, z: Tensor) -> Tensor:
        return (z.flatten(1) - self.shift) / self.scale

    def unstandardise(self, u: Tensor) -> Tensor:
        return u * self.scale + self.shift

    def forward(self, u: Tensor, t) -> Tensor:
        """Score in standardised latent coordinates u (evaluated in the expert's dtype, returned in u's)."""
        return self.net(u.to(self.shift.dtype), t).to(u.dtype)

    def score(self, u: Tensor, t) -> Tensor:
        return self.forward(u, t)

    def denoise(self, u: Tensor, t) -> Tensor:
        return self.net.denoise(u.to(self.shift.dtype), t).to(u.dtype)

    def mixture_for(self, u: Tensor):
        """The net's closed-form law in standardised coordinates (MoG / Gaussian kinds; the exact sampler)."""
        if not hasattr(self.net, "mixture_for"):
            raise MolrmogError(f"the exact sampler needs a closed-form mixture; a {self.kind} expert has none "
                               f"(use heun, ddim, dpmpp_2m, ddpm or euler_maruyama)")
        return self.net.mixture_for(u)


# --- the built-in kinds ---------------------------------------------------------------------------


def _int_or(word: str):
    """A flag parser for an integer or one word (auto, full)."""
    def parse(text: str) -> int | str:
        if str(text).strip().lower() == word:
            return word
        try:
            return int(text)
        except ValueError:
            raise MolrmogError(f"expected an integer or {word}, got {text!r}") from None
    return parse


_int_or_auto, _int_or_full = _int_or("auto"), _int_or("full")


AUTO_MODES, AUTO_RANKS = (1, 2, 4, 8, 16, 32), (1, 2, 4, 8, 16)
FLOORS = ("none", "match", "diag", "mode-diag", "learn")  # the MoG expert's floor option
_DIAG = {"diag": "shared", "mode-diag": "mode"}  # --mog-floor -> MoGExpert(diag_floor=...)


@dataclass(frozen=True)
class MoGOptions(KindOptions):
    steps: int = option(400, "DSM steps after the closed-form EM start (0: the EM fit alone)", low=0,
                        high=MAX_STEPS)
    modes: int | str = option(10, "mixture modes n_k per expert, or auto (held-out likelihood of the EM fit, "
                              f"among {','.join(map(str, AUTO_MODES))})", low=1, high=4096, parse=_int_or_auto)
    rank: int | str = option(4, "rank r of each mode's covariance factor, or auto (among "
                             f"{','.join(map(str, AUTO_RANKS))})", low=1, high=4096, parse=_int_or_auto)
    param_cap: int = option(100_000, "largest expert (parameters) the auto choice may pick", low=1, high=10**9)
    floor: str = option(
        "none",
        "variance floor of every mode: none; set after training from the data: mode-diag (one per "
        "mode and coordinate, N(mu_l, U_l U_l^T + diag(c_l)): what each mode's factor leaves of its second moment "
        "about its mean over the data it is responsible for; its n d numbers count as parameters, also under "
        "--mog-param-cap); diag (one per coordinate shared by the modes, N(mu_l, U_l U_l^T + diag(c)): mode-diag's "
        "floors averaged with the modes' shares of the data; d numbers, counted likewise); match (one isotropic "
        "number, N(mu_l, U_l U_l^T + floor I): diag's floor averaged over the coordinates); or learn (one isotropic "
        "parameter, started at the EM fit's floor and trained with the rest)",
        choices=FLOORS)


@dataclass(frozen=True)
class MoLROptions(KindOptions):
    steps: int = option(400, "DSM steps after the closed-form start (PCA / K-subspaces, then EM in each subspace; 0: "
                        "the start alone)", low=0, high=MAX_STEPS)
    subspaces: int = option(1, "subspaces K of the expert's law", low=1, high=64)
    dim: int = option(30, "dimension q of each subspace", low=1, high=4096)
    modes: int = option(4, "Gaussian modes n in each subspace", low=1, high=4096)
    rank: int | str = option("full", "rank r of each mode's covariance factor in its subspace, or full (a Cholesky "
                             "factor: q (q + 1) / 2 numbers per mode)", low=1, high=4096, parse=_int_or_full)
    floor: str = option("match", "isotropic variance floor off the subspaces: match (the floor that gives the law "
                        "the data's total variance, set at the closed-form start, trained with, and set again after "
                        "training) or none", choices=("match", "none"))


@dataclass(frozen=True)
class GaussianOptions(KindOptions):
    steps: int = option(400, "DSM steps after the closed-form PPCA start (0: the PCA fit alone)", low=0,
                        high=MAX_STEPS)
    rank: int = option(4, "rank r of the covariance factor", low=1, high=4096)


@dataclass(frozen=True)
class UNetOptions(KindOptions):
    steps: int = option(300, "training steps per expert", low=1, high=MAX_STEPS)
    lr: float = option(3e-3, "Adam learning rate", low=0, low_open=True, high=10.0)
    width: int = option(16, "channels of the first U-Net block (the second has twice as many)", low=4, high=1024)


def _check_rank(o, latent) -> None:
    d = math.prod(latent)
    for name in ("modes", "rank"):
        v = getattr(o, name, None)
        if isinstance(v, str) and v != "auto":
            raise MolrmogError(f"--mog-{name} must be an integer or auto, got {v!r}")
    floor = getattr(o, "floor", None)
    if floor in _DIAG and "auto" in (o.modes, o.rank) and o.param_cap <= d:
        raise MolrmogError(f"--mog-param-cap {o.param_cap} leaves nothing beside the per-coordinate floor's {d} "
                           f"numbers (--mog-floor {floor} counts them); raise --mog-param-cap")
    if isinstance(o.rank, int) and o.rank > d:
        raise MolrmogError(f"rank {o.rank} exceeds the latent dimension {d} ({'x'.join(map(str, latent))}); "
                           f"lower --mog-rank / --gaussian-rank or use a larger --latent")


def _check_molr(o, latent) -> None:
    D = math.prod(latent)
    if isinstance(o.rank, str) and o.rank != "full":
        raise MolrmogError(f"--molr-rank must be an integer or full, got {o.rank!r}")
    if o.dim > D:
        raise MolrmogError(f"--molr-dim {o.dim} exceeds the latent dimension {D} ({'x'.join(map(str, latent))}); "
                           f"lower --molr-dim")
    if isinstance(o.rank, int) and o.rank > o.dim:
        raise MolrmogError(f"--molr-rank {o.rank} exceeds the subspace dimension --molr-dim {o.dim}; lower "
                           f"--molr-rank or use full")


def _molr_init(net, u: Tensor, o, seed: int) -> None:
    """PCA / K-subspaces and EM in each subspace; with floor 'match' DSM then trains the law with the floor of
    that start (the data's variance off the subspaces), matched again after training (`_molr_finish`)."""
    net.init_from_data(u, seed=seed, basis_scale=math.sqrt(net.D))
    if o.floor == "match":
        net.match_variance()


def _mixture_init(net, u: Tensor, o, seed: int) -> None:
    net.init_from_data(u, seed=seed)


def _mog_finish(net, o, u: Tensor) -> dict:
    """floor 'mode-diag': every mode's per-coordinate floor from the latents u it is responsible for (what its
    factor leaves of its second moment); 'diag': those averaged over the modes with their shares of u, one
    per-coordinate floor shared by the modes (both reported by their median and largest value); 'match': that
    averaged over the coordinates, one isotropic floor."""
    if o.floor == "none":
        return {}
    if o.floor == "learn":
        return {"floor": net.floor_value(), "variance_gap": net.variance_gap()}
    if o.floor in _DIAG:  # (idempotent, as 'match': matching a matched law changes nothing)
        gap = net.variance_gap()
        c = net.match_coordinate_variance(u) if o.floor == "diag" else net.match_mode_variance(u)
        return {"variance_gap": gap, "floor_median": float(c.median()), "floor_max": float(c.max())}
    gap = net.variance_gap()
    return {"variance_gap": gap, "floor": net.match_residual_variance(u)}


def _molr_finish(net, o, u: Tensor) -> dict:
    """floor 'match': the isotropic floor off the subspaces that fills the trained law's variance up to the
    data's (as at the start, `_molr_init`)."""
    if o.floor == "none":
        return {}
    gap = net.variance_gap()
    return {"variance_gap": gap, "floor": net.match_variance()}


def _mog_resolve(o, u: Tensor, seed: int):
    """modes / rank 'auto': the EM fit with the best held-out log-likelihood under the parameter cap."""
    if o.modes != "auto" and o.rank != "auto":
        return o, {}
    from molrmog.core.em import select_mppca

    N, d = u.shape
    modes = [o.modes] if o.modes != "auto" else [m for m in AUTO_MODES if m <= max(1, N // 4)] or [1]
    ranks = [o.rank] if o.rank != "auto" else [r for r in AUTO_RANKS if r <= d] or [1]
    # the per-coordinate floor's d (diag) or n d (mode-diag) numbers count too
    extra = {"diag": (d, 0), "mode-diag": (0, d)}.get(o.floor, (0, 0))
    choice = select_mppca(u, modes, ranks, param_cap=o.param_cap, seed=seed, extra=extra)
    return dataclasses.replace(o, modes=choice["modes"], rank=choice["rank"]), {"auto": choice}


register(ExpertKind(
    "mog", "MoG expert", MoGExpert, MoGOptions, seed_salt=1, headline=True,
    net_config=lambda latent, o, schedule, seed: {"d": math.prod(latent), "n": o.modes, "r": o.rank,
                                                  "schedule": schedule, "seed": seed,
                                                  "learn_floor": o.floor == "learn",
                                                  "diag_floor": _DIAG.get(o.floor, "none")},
    init_from_data=_mixture_init, check=_check_rank, resolve=_mog_resolve, finish=_mog_finish,
    description="a learnable mixture of low-rank Gaussians: the closed-form MoG score (this project's model)"))
register(ExpertKind(
    "molr", "MoLR-MoG expert", MoEScore, MoLROptions, seed_salt=7, default=False,
    net_config=lambda latent, o, schedule, seed: {"D": math.prod(latent), "K": o.subspaces, "d": o.dim,
                                                  "n": o.modes, "r": None if o.rank == "full" else o.rank,
                                                  "full_cov": o.rank == "full", "schedule": schedule, "seed": seed},
    init_from_data=_molr_init, check=_check_molr, finish=_molr_finish,
    description="MoLR-MoG in the latent: K learnable subspaces of dimension q, a mixture of n Gaussians in each "
                "(full covariances by default), an isotropic floor off them matched to the data's variance"))
register(ExpertKind(
    "gaussian", "Gaussian expert", GaussianExpert, GaussianOptions, seed_salt=2,
    net_config=lambda latent, o, schedule, seed: {"d": math.prod(latent), "r": o.rank, "schedule": schedule,
                                                  "seed": seed},
    init_from_data=_mixture_init, check=_check_rank,
    description="one zero-mean low-rank Gaussian (MoLRG): a linear score"))
register(ExpertKind(
    "unet", "U-Net expert", UNetScore, UNetOptions, seed_salt=3, baseline=True,
    net_config=lambda latent, o, schedule, seed: {"latent": list(latent), "width": o.width, "schedule": schedule,
                                                  "seed": seed, "precondition": True},
    description="a small diffusers UNet2DModel with EDM-style preconditioning (the baseline)"))


@dataclass(frozen=True)
class SMDUNetOptions(UNetOptions):
    latent_dim: int = option(8, "channels of the SMD latent field z_t", low=1, high=256)
    hypernet_layers: int = option(2, "hypernetwork layers per adapter", low=1, high=16)


@dataclass(frozen=True)
class MLPOptions(KindOptions):
    steps: int = option(1000, "training steps per expert", low=1, high=MAX_STEPS)
    lr: float = option(1e-3, "Adam learning rate", low=0, low_open=True, high=10.0)
    hidden: int = option(256, "hidden width", low=1, high=4096)
    depth: int = option(3, "hidden layers", low=2, high=64)


@dataclass(frozen=True)
class SMDMLPOptions(MLPOptions):
    latent_dim: int = option(16, "size of the SMD latent z_t", low=1, high=1024)
    hypernet_layers: int = option(2, "hypernetwork layers per adapter", low=1, high=16)


register(ExpertKind(
    "smd_unet", "SMD U-Net expert", SMDUNetScore, SMDUNetOptions, seed_salt=4, default=False,
    net_config=lambda latent, o, schedule, seed: {"latent": list(latent), "width": o.width, "latent_dim": o.latent_dim,
                                                  "hypernet_layers": o.hypernet_layers, "schedule": schedule,
                                                  "seed": seed},
    description="the U-Net with Soft Mixture Denoising (Li et al. 2024): a latent z_t from [x_t, eta] steers "
                "hypernetwork adapters after the first and before the last layer"))
register(ExpertKind(
    "mlp", "MLP expert", MLPScore, MLPOptions, seed_salt=5, default=False,
    net_config=lambda latent, o, schedule, seed: {"D": math.prod(latent), "hidden": o.hidden, "depth": o.depth,
                                                  "schedule": schedule, "seed": seed, "precondition": True},
    description="an unstructured, EDM-preconditioned epsilon-MLP (the plain counterpart of smd_mlp)"))
register(ExpertKind(
    "smd_mlp", "SMD MLP expert", SMDMLPScore, SMDMLPOptions, seed_salt=6, default=False,
    net_config=lambda latent, o, schedule, seed: {"D": math.prod(latent), "hidden": o.hidden, "depth": o.depth,
                                                  "latent": o.latent_dim, "hypernet_layers": o.hypernet_layers,
                                                  "schedule": schedule, "seed": seed},
    description="an epsilon-MLP with Soft Mixture Denoising (identifier MLP and hypernetwork adapters)"))
