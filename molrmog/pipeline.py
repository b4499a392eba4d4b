"""The image pipeline: clusters -> one VAE per cluster -> one small latent expert per cluster.

A run is a directory:

    config.json                 the run's settings (what `--resume` continues)
    clusters.safetensors        cluster index of every training image, cluster weights
    vae/<k>/ or vae/unified/    VAEs (config.json + model.safetensors)
    experts/<kind>/<k>/         latent experts with their standardisation statistics
    checkpoints/<task>/         resumable training state of every stage
    losses.csv, loss_curves.png, samples_<kind>.png, samples_data.png, report.md, report.json
                                (written by `molrmog.report`)

Every stage is a task with its own seed and checkpoint; finished tasks are skipped on resume.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data import ImageData, load_dataset
from .experts import LatentExpert
from .io import atomic_write, load_module
from .samplers import generate
from .schedules import make_grid
from .train import fit, train_score
from .vae import ConvVAE, LoRAVAE, check_latent_shape, vae_loss

__all__ = ["RunConfig", "train_run", "load_run", "sample_run", "VAE_MODES"]

VAE_MODES = ("dedicated", "unified", "lora")
DEFAULT_LATENT = {"digits": (2, 4, 4), "fashion-mnist": (4, 7, 7)}


@dataclass
class RunConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    limit: int | None = None
    size: int = 28
    channels: int = 1
    skip_bad: bool = False
    clusters: int | None = None  # None: use the labels; K: k-means on unified-VAE features
    experts: list[str] = field(default_factory=lambda: ["mog", "gaussian", "unet"])
    vae: str = "dedicated"
    latent: list[int] | None = None
    vae_width: int = 32
    vae_beta: float = 0.1
    vae_steps: int = 400
    vae_lr: float = 2e-3
    lora_rank: int = 4
    expert_steps: int = 400
    unet_steps: int | None = 300
    expert_lr: float = 1e-2
    unet_lr: float = 3e-3
    unet_width: int = 16
    batch: int = 128
    modes: int = 10
    rank: int = 4
    ema_decay: float | None = 0.99
    schedule: str = "vp"
    sampler: str = "heun"
    sample_steps: int = 30
    samples_per_class: int = 8
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "cpu"

    def validate(self, image_shape=None) -> None:
        bad = [e for e in self.experts if e not in LatentExpert.KINDS]
        if bad or not self.experts:
            raise ValueError(f"unknown expert kind(s) {bad or self.experts}; choose from mog, gaussian, unet")
        if self.vae not in VAE_MODES:
            raise ValueError(f"unknown --vae {self.vae!r}; choose from {', '.join(VAE_MODES)}")
        for name in ("vae_steps", "expert_steps", "batch", "modes", "rank", "samples_per_class",
                     "sample_steps", "vae_width", "unet_width", "lora_rank"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.clusters is not None and self.clusters < 1:
            raise ValueError(f"--clusters must be >= 1, got {self.clusters}")
        if self.latent is not None and image_shape is not None:
            check_latent_shape(image_shape, self.latent)
            if self.rank > math.prod(self.latent):
                raise ValueError(f"--rank {self.rank} exceeds the latent dimension {math.prod(self.latent)}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu")


def _task_done(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


class Run:
    """A run directory and its stages."""

    def __init__(self, out: Path, cfg: RunConfig, data: ImageData, progress: bool = True):
        self.out, self.cfg, self.data, self.progress = out, cfg, data, progress
        self.device = torch.device(cfg.device)
        self.histories: dict[str, list[float]] = {}
        self.times: dict[str, float] = {}

    # --- stages ---------------------------------------------------------------------------
    def _fit_task(self, name: str, model, loss_fn, steps: int, lr: float, seed: int, final_dir: Path,
                  ema: float | None = None) -> None:
        if _task_done(final_dir):
            return
        t0 = time.perf_counter()
        hist = fit(model, loss_fn, steps=steps, lr=lr, seed=seed, progress=self.progress, desc=name,
                   checkpoint_dir=self.out / "checkpoints" / name, checkpoint_every=self.cfg.checkpoint_every,
                   ema_decay=ema)
        model.save_pretrained(final_dir)
        self._log(name, hist["loss"], time.perf_counter() - t0)

    def _log(self, name: str, losses: list[float], seconds: float) -> None:
        logs = self.out / "logs"
        logs.mkdir(exist_ok=True)
        atomic_write(logs / f"{name}.json", lambda p: Path(p).write_text(
            json.dumps({"loss": losses, "seconds": seconds})))

    def _vae_loss(self, images: torch.Tensor):
        B = self.cfg.batch

        def loss_fn(vae, gen):
            idx = torch.randint(0, images.shape[0], (B,), generator=gen)
            return vae_loss(vae, images[idx].to(self.device), gen)

        return loss_fn

    def train_vae_unified(self, images, name="unified") -> ConvVAE:
        c = self.cfg
        final = self.out / "vae" / name
        vae = ConvVAE(self.data.shape, c.latent, c.vae_width, c.vae_beta, seed=c.seed).to(self.device)
        self._fit_task(f"vae-{name}", vae, self._vae_loss(images), c.vae_steps, c.vae_lr, c.seed, final)
        return load_module(final, "VAE").to(self.device)

    def train_vaes(self, labels: torch.Tensor, K: int) -> list:
        """Per-cluster VAEs (dedicated), one VAE for all (unified) or backbone + adapters (lora)."""
        c, imgs = self.cfg, self.data.images
        if c.vae == "unified":
            vae = self.train_vae_unified(imgs)
            return [vae] * K
        if c.vae == "dedicated":
            vaes = []
            for k in range(K):
                final = self.out / "vae" / str(k)
                vae = ConvVAE(self.data.shape, c.latent, c.vae_width, c.vae_beta, seed=c.seed + 1 + k)
                vae = vae.to(self.device)
                self._fit_task(f"vae-{k}", vae, self._vae_loss(imgs[labels == k]), c.vae_steps, c.vae_lr,
                               c.seed + 1 + k, final)
                vaes.append(load_module(final, "VAE").to(self.device))
            return vaes
        # lora: backbone on all data, then one adapter per cluster with the backbone frozen
        backbone = self.train_vae_unified(imgs, "backbone")
        vae = LoRAVAE(self.data.shape, c.latent, c.vae_width, c.vae_beta, seed=c.seed, clusters=K,
                      rank=c.lora_rank)
        vae.load_state_dict(_lora_state_from(backbone, vae), strict=True)
        vae = vae.to(self.device)
        for k in range(K):
            final = self.out / "vae" / f"lora-{k}"
            if k > 0:
                vae = load_module(self.out / "vae" / f"lora-{k - 1}", "VAE").to(self.device)
            vae.set_cluster(k)
            for p in vae.backbone_parameters():
                p.requires_grad_(False)
            self._fit_task(f"vae-lora-{k}", vae, self._vae_loss(imgs[labels == k]), c.vae_steps, c.vae_lr,
                           c.seed + 1 + k, final)
        last = load_module(self.out / "vae" / f"lora-{K - 1}", "VAE").to(self.device)
        return [_LoRAView(last, k) for k in range(K)]

    @torch.no_grad()
    def encode(self, vae, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([vae.encode(b.to(self.device))[0].flatten(1).cpu() for b in images.split(512)])

    def train_expert(self, kind: str, k: int, z: torch.Tensor) -> LatentExpert:
        c = self.cfg
        final = self.out / "experts" / kind / str(k)
        seed = c.seed + 1000 * (1 + LatentExpert.KINDS.index(kind)) + k
        if _task_done(final):
            return load_module(final, "expert").to(self.device)
        e = LatentExpert(kind, c.latent, c.modes, c.rank, c.unet_width, c.schedule, seed=seed)
        e.shift.copy_(z.mean(0))
        e.scale.copy_(z.std(0).clamp_min(1e-3))
        u = e.standardise(z)
        if kind in ("mog", "gaussian"):
            e.net.init_from_data(u, seed=seed)
        e = e.to(self.device)
        steps = c.unet_steps if kind == "unet" and c.unet_steps else c.expert_steps
        lr = c.unet_lr if kind == "unet" else c.expert_lr
        t0 = time.perf_counter()
        hist = train_score(e, u.to(self.device), steps=steps, batch_size=c.batch, lr=lr, seed=seed,
                           ema_decay=c.ema_decay, progress=self.progress, desc=f"{kind}-{k}",
                           checkpoint_dir=self.out / "checkpoints" / f"{kind}-{k}",
                           checkpoint_every=c.checkpoint_every)
        e.save_pretrained(final)
        self._log(f"{kind}-{k}", hist["loss"], time.perf_counter() - t0)
        return e


class _LoRAView(torch.nn.Module):
    """The shared LoRA VAE seen through one cluster's adapter."""

    def __init__(self, vae: LoRAVAE, k: int):
        super().__init__()
        self.vae, self.k = vae, k

    def encode(self, x):
        return self.vae.set_cluster(self.k).encode(x)

    def decode(self, z):
        return self.vae.set_cluster(self.k).decode(z)


def _lora_state_from(backbone: ConvVAE, lora: LoRAVAE) -> dict:
    """Map a plain VAE's weights into the LoRA VAE (conv weights move under `.base`)."""
    state = lora.state_dict()
    src = backbone.state_dict()
    for key in state:
        plain = key.replace(".base.", ".")
        if plain in src:
            state[key] = src[plain]
    return state


def _write_config(out: Path, cfg: RunConfig, resume: bool) -> None:
    path = out / "config.json"
    if path.is_file():
        if not resume:
            raise ValueError(f"{out} already holds a run; use --resume {out} to continue it or choose "
                             f"another --out")
        return
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(asdict(cfg), indent=2)))


def load_config(run: str | Path) -> RunConfig:
    path = Path(run) / "config.json"
    if not path.is_file():
        raise ValueError(f"{run} is not a run directory (no config.json)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    known = {f.name for f in fields(RunConfig)}
    return RunConfig(**{k: v for k, v in raw.items() if k in known})


def train_run(out: str | Path, cfg: RunConfig | None = None, resume: bool = False,
              progress: bool = True) -> dict:
    """Train (or resume) a full run: clusters, VAEs, experts, samples and the report."""
    out = Path(out)
    if resume:
        cfg = load_config(out)
    cfg.latent = list(cfg.latent or DEFAULT_LATENT.get(cfg.dataset, (4, cfg.size // 4, cfg.size // 4)))
    cfg.validate()
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, limit=cfg.limit, size=cfg.size,
                        channels=cfg.channels, skip_bad=cfg.skip_bad)
    cfg.validate(data.shape)
    out.mkdir(parents=True, exist_ok=True)
    _write_config(out, cfg, resume)
    torch.manual_seed(cfg.seed)
    run = Run(out, cfg, data, progress)

    labels, K, names = _clusters(run)
    vaes = run.train_vaes(labels, K)
    latents = [run.encode(vaes[k], data.images[labels == k]) for k in range(K)]
    for kind in cfg.experts:
        for k in range(K):
            run.train_expert(kind, k, latents[k])
    from .report import finish_run

    return finish_run(out)


def _clusters(run: Run):
    """Cluster index per image: the labels, or k-means on unified-VAE features."""
    path = run.out / "clusters.safetensors"
    if path.is_file():
        t = load_file(str(path))
        names = json.loads((run.out / "clusters.json").read_text())
        return t["labels"], int(t["weights"].numel()), names
    data, cfg = run.data, run.cfg
    if cfg.clusters is None and data.labels is not None:
        labels = data.labels.clone()
        K = int(labels.max()) + 1
        names = data.classes or [str(k) for k in range(K)]
    else:
        from sklearn.cluster import KMeans

        K = cfg.clusters or 10
        vae = run.train_vae_unified(data.images, "features")
        feats = run.encode(vae, data.images).numpy()
        km = KMeans(K, n_init=4, random_state=cfg.seed).fit(feats)
        labels = torch.as_tensor(km.labels_, dtype=torch.int64)
        names = [f"cluster {k}" for k in range(K)]
    counts = torch.bincount(labels, minlength=K)
    if (counts == 0).any():
        raise ValueError(f"cluster(s) {(counts == 0).nonzero().flatten().tolist()} have no images; "
                         f"use fewer --clusters or more data")
    weights = counts.double() / counts.sum()
    atomic_write(run.out / "clusters.json", lambda p: Path(p).write_text(json.dumps(names)))
    atomic_write(path, lambda p: save_file({"labels": labels, "weights": weights}, p))
    return labels, K, names


# --- loading and sampling ----------------------------------------------------------------


def load_run(run: str | Path, kind: str, device: str = "cpu"):
    """(config, cluster weights, class names, VAEs per cluster, experts per cluster) of a finished run."""
    run = Path(run)
    cfg = load_config(run)
    if kind not in cfg.experts:
        raise ValueError(f"run {run} has no '{kind}' experts (it trained {', '.join(cfg.experts)})")
    clusters = run / "clusters.safetensors"
    if not clusters.is_file():
        raise ValueError(f"run {run} is not finished (no clusters.safetensors); continue it with --resume")
    weights = load_file(str(clusters))["weights"]
    names = json.loads((run / "clusters.json").read_text())
    K = weights.numel()
    if cfg.vae == "unified":
        vaes = [load_module(run / "vae" / "unified", "VAE").to(device)] * K
    elif cfg.vae == "dedicated":
        vaes = [load_module(run / "vae" / str(k), "VAE").to(device) for k in range(K)]
    else:
        last = load_module(run / "vae" / f"lora-{K - 1}", "VAE").to(device)
        vaes = [_LoRAView(last, k) for k in range(K)]
    experts = []
    for k in range(K):
        d = run / "experts" / kind / str(k)
        if not _task_done(d):
            raise ValueError(f"expert {d} is missing; continue the run with --resume {run}")
        experts.append(load_module(d, "expert").to(device))
    return cfg, weights, names, vaes, experts


@torch.no_grad()
def sample_run(run: str | Path, kind: str, n: int, cls: int | None = None, sampler: str | None = None,
               steps: int | None = None, seed: int = 0, device: str = "cpu",
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, C, H, W) in [0, 1] and their cluster indices; clusters drawn by weight or fixed."""
    cfg, weights, _, vaes, experts = load_run(run, kind, device)
    return sample_loaded(weights, vaes, experts, n, cls, sampler or cfg.sampler, steps or cfg.sample_steps,
                         seed, device, progress)


@torch.no_grad()
def sample_loaded(weights, vaes, experts, n: int, cls: int | None, sampler: str, steps: int, seed: int,
                  device: str = "cpu", progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    K = weights.numel()
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if cls is not None and not 0 <= cls < K:
        raise ValueError(f"--class must lie in 0..{K - 1}, got {cls}")
    g = torch.Generator().manual_seed(seed)
    ks = torch.full((n,), cls) if cls is not None else torch.multinomial(weights, n, True, generator=g)
    out = [None] * n
    for k in ks.unique().tolist():
        idx = (ks == k).nonzero().flatten()
        imgs = _sample_expert(experts[k], vaes[k], len(idx), sampler, steps, g, device, progress)
        for j, i in enumerate(idx.tolist()):
            out[i] = imgs[j]
    return torch.stack(out), ks


def _sample_expert(expert: LatentExpert, vae, n: int, sampler: str, steps: int, g, device, progress):
    sched = expert.schedule
    ts = make_grid(sched, steps, "karras")
    d = expert.shift.numel()

    def score(u, t):
        return expert(u, t)

    u = generate(score, n, d, sched, ts, sampler, generator=g, dtype=torch.float32, device=device,
                 progress=progress)
    z = expert.unstandardise(u)
    return torch.sigmoid(vae.decode(z)).cpu()
