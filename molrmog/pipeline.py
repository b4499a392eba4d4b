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

__all__ = ["RunConfig", "train_run", "load_run", "sample_run", "open_run", "vae_task", "expert_task", "VAE_MODES"]

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
            return [self.train_dedicated_vae(labels, k) for k in range(K)]
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

    def train_dedicated_vae(self, labels: torch.Tensor, k: int):
        c = self.cfg
        final = self.out / "vae" / str(k)
        vae = ConvVAE(self.data.shape, c.latent, c.vae_width, c.vae_beta, seed=c.seed + 1 + k).to(self.device)
        self._fit_task(f"vae-{k}", vae, self._vae_loss(self.data.images[labels == k]), c.vae_steps, c.vae_lr,
                       c.seed + 1 + k, final)
        return load_module(final, "VAE").to(self.device)

    def vae_for(self, k: int, K: int):
        """The finished VAE that encodes / decodes cluster k."""
        return _load_vaes(self.out, self.cfg, K, self.device)[k]

    @torch.no_grad()
    def encode(self, vae, images: torch.Tensor) -> torch.Tensor:
        return encode_images(vae, images, self.device)

    def train_expert(self, kind: str, k: int, z: torch.Tensor) -> LatentExpert:
        c = self.cfg
        final = self.out / "experts" / kind / str(k)
        seed = c.seed + 1000 * (1 + LatentExpert.KINDS.index(kind)) + k
        if _task_done(final):
            return load_module(final, "expert").to(self.device)
        e = LatentExpert(kind, c.latent, c.modes, c.rank, c.unet_width, c.schedule, seed=seed, precondition=True)
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


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, device) -> torch.Tensor:
    """Posterior-mean latents (N, d) on the CPU, encoded in batches of 512 on `device`."""
    return torch.cat([vae.encode(b.to(device))[0].flatten(1).cpu() for b in images.split(512)])


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


def open_run(out: str | Path, progress: bool = False) -> Run:
    """A run directory with its saved config and training data (what every task starts from)."""
    out = Path(out)
    cfg = load_config(out)
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, limit=cfg.limit, size=cfg.size,
                        channels=cfg.channels, skip_bad=cfg.skip_bad)
    return Run(out, cfg, data, progress)


def _run_labels(run: Run) -> tuple[torch.Tensor, int]:
    labels = load_file(str(run.out / "clusters.safetensors"))["labels"]
    return labels, int(labels.max()) + 1


def vae_task(out: str, which: str, progress: bool = False) -> None:
    """Train one cluster's dedicated VAE (which = cluster index), the unified VAE, or the LoRA chain."""
    run = open_run(out, progress)
    labels, K = _run_labels(run)
    if which in ("unified", "lora"):
        run.train_vaes(labels, K)
    else:
        run.train_dedicated_vae(labels, int(which))


def expert_task(out: str, kind: str, k: int, progress: bool = False) -> None:
    """Train the latent expert of one (kind, cluster) on the cluster's VAE latents."""
    run = open_run(out, progress)
    labels, K = _run_labels(run)
    vae = run.vae_for(k, K)
    run.train_expert(kind, k, run.encode(vae, run.data.images[labels == k]))


def train_run(out: str | Path, cfg: RunConfig | None = None, resume: bool = False,
              progress: bool = True, executor=None) -> dict:
    """Train (or resume) a full run: clusters, VAEs, experts, samples and the report.

    VAEs and experts are independent tasks (see `molrmog.executors`): sequential by default, or on a
    process pool / Ray with `executor`. Finished tasks are skipped, so `resume` continues a stopped
    run, whichever executor trained its first part.
    """
    from .executors import Executor, Task, run_tasks

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
    ex = executor or Executor(device=cfg.device)
    sub_progress = progress and not ex.parallel  # per-task bars only when tasks run here, one at a time

    _, K, _ = _clusters(run)
    if cfg.vae == "dedicated":
        vaes = [Task(f"vae-{k}", vae_task, (str(out), str(k), sub_progress)) for k in range(K)
                if not _task_done(out / "vae" / str(k))]
    else:
        last = out / "vae" / ("unified" if cfg.vae == "unified" else f"lora-{K - 1}")
        vaes = [] if _task_done(last) else [Task(f"vae-{cfg.vae}", vae_task, (str(out), cfg.vae, sub_progress))]
    run_tasks(vaes, ex, progress=progress, desc="VAEs")
    experts = [Task(f"{kind}-{k}", expert_task, (str(out), kind, k, sub_progress))
               for kind in cfg.experts for k in range(K) if not _task_done(out / "experts" / kind / str(k))]
    run_tasks(experts, ex, progress=progress, desc="experts")
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
    vaes = _load_vaes(run, cfg, K, device)
    experts = []
    for k in range(K):
        d = run / "experts" / kind / str(k)
        if not _task_done(d):
            raise ValueError(f"expert {d} is missing; continue the run with --resume {run}")
        experts.append(load_module(d, "expert").to(device))
    return cfg, weights, names, vaes, experts


def _load_vaes(run: Path, cfg: RunConfig, K: int, device) -> list:
    for d in (["unified"] if cfg.vae == "unified" else [str(k) for k in range(K)] if cfg.vae == "dedicated"
              else [f"lora-{K - 1}"]):
        if not _task_done(run / "vae" / d):
            raise ValueError(f"VAE {run / 'vae' / d} is missing; continue the run with --resume {run}")
    if cfg.vae == "unified":
        return [load_module(run / "vae" / "unified", "VAE").to(device)] * K
    if cfg.vae == "dedicated":
        return [load_module(run / "vae" / str(k), "VAE").to(device) for k in range(K)]
    last = load_module(run / "vae" / f"lora-{K - 1}", "VAE").to(device)
    return [_LoRAView(last, k) for k in range(K)]


def cluster_seed(seed: int, k: int) -> int:
    """Seed of cluster k's sampling noise: clusters are sampled independently (in any order, anywhere)."""
    return 1_000_003 * int(seed) + int(k) + 1


def sample_run(run: str | Path, kind: str, n: int, cls: int | None = None, sampler: str | None = None,
               steps: int | None = None, seed: int = 0, device: str = "cpu", progress: bool = False,
               executor=None) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, C, H, W) in [0, 1] and their cluster indices; clusters drawn by weight or fixed.
    With a parallel `executor`, every cluster's images are one task."""
    from .executors import Executor, Task, run_tasks

    cfg, weights, _, vaes, experts = load_run(run, kind, "cpu")
    sampler, steps = sampler or cfg.sampler, steps or cfg.sample_steps
    ks = _draw_clusters(weights, n, cls, seed)
    ex = executor or Executor(device=device)
    if not ex.parallel:
        vaes, experts = [v.to(device) for v in vaes], [e.to(device) for e in experts]
        return sample_loaded(weights, vaes, experts, n, cls, sampler, steps, seed, device, progress)
    counts = torch.bincount(ks, minlength=weights.numel())
    tasks = [Task(f"sample-{kind}-{k}", sample_task, (str(run), kind, k, int(counts[k]), sampler, steps, seed,
                                                      device)) for k in range(weights.numel()) if counts[k]]
    res = run_tasks(tasks, ex, progress=progress, desc="sampling")
    return _assemble(ks, {k: res[f"sample-{kind}-{k}"] for k in range(weights.numel()) if counts[k]}), ks


def sample_task(run: str, kind: str, k: int, n: int, sampler: str, steps: int, seed: int, device: str):
    """n images of cluster k (a task: loads what it needs)."""
    _, _, _, vaes, experts = load_run(run, kind, device)
    g = torch.Generator().manual_seed(cluster_seed(seed, k))
    with torch.no_grad():
        return _sample_expert(experts[k], vaes[k], n, sampler, steps, g, device, False)


def _draw_clusters(weights, n: int, cls: int | None, seed: int) -> torch.Tensor:
    K = weights.numel()
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if cls is not None and not 0 <= cls < K:
        raise ValueError(f"--class must lie in 0..{K - 1}, got {cls}")
    g = torch.Generator().manual_seed(seed)
    return torch.full((n,), cls) if cls is not None else torch.multinomial(weights, n, True, generator=g)


def _assemble(ks: torch.Tensor, per_cluster: dict) -> torch.Tensor:
    out = [None] * ks.numel()
    for k, imgs in per_cluster.items():
        for j, i in enumerate((ks == k).nonzero().flatten().tolist()):
            out[i] = imgs[j]
    return torch.stack(out)


@torch.no_grad()
def sample_loaded(weights, vaes, experts, n: int, cls: int | None, sampler: str, steps: int, seed: int,
                  device: str = "cpu", progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    ks = _draw_clusters(weights, n, cls, seed)
    per = {}
    for k in ks.unique().tolist():
        g = torch.Generator().manual_seed(cluster_seed(seed, k))
        per[k] = _sample_expert(experts[k], vaes[k], int((ks == k).sum()), sampler, steps, g, device, progress)
    return _assemble(ks, per), ks


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
