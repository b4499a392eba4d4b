"""The image pipeline: clusters -> VAEs (a layout) -> one small latent expert per (kind, cluster).

A run is a directory:

    config.json                 the run's settings (`molrmog.config.RunConfig`; what --resume continues)
    .lock                       held by the process that trains the run (one writer per run)
    clusters.safetensors        cluster index of every training image, cluster weights; clusters.json: names
    vae/...                     the VAEs of the layout (`molrmog.layouts`), diffusers model folders
    experts/<kind>/<k>/         latent experts (`molrmog.kinds.LatentExpert`) with their standardisation
    checkpoints/<task>/         resumable training state of every stage
    logs/<task>.json            losses and wall time of every finished stage
    losses.csv, loss_curves.png, samples_<kind>.png, samples_data.png, report.md/json  (`molrmog.report`)

Every stage is a task with its own seed and checkpoint; finished tasks are skipped on resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .artefacts import atomic_write, clean_stale_tmp, is_saved, read_json, read_safetensors, write_json
from .config import BUDGET_POINTS, VAE_FIELDS, RunConfig, check_config, config_from_json, config_to_json, resolve_config
from .data import ImageData, load_dataset
from .errors import ArtefactError, MolrmogError
from .executors import Executor, Task, run_tasks
from .kinds import MAX_STEPS, LatentExpert, expert_seed, get_kind
from .layouts import get_layout
from .samplers import generate
from .schedules import get_schedule, make_grid
from .threads import Threads, using_threads
from .train import fit, train_score
from .vae import vae_loss

__all__ = ["RunConfig", "train_run", "load_run", "sample_run", "open_run", "vae_task", "expert_task",
           "load_config", "run_lock", "encode_images", "sample_loaded", "cluster_seed", "expert_done",
           "load_run_data", "run_labels", "check_clusters", "prepare_run", "Prepared"]

log = logging.getLogger(__name__)


# --- the run directory --------------------------------------------------------------------------


def load_config(run: str | Path) -> RunConfig:
    path = Path(run) / "config.json"
    if not Path(run).is_dir() or not path.is_file():
        raise MolrmogError(f"{run} is not a run directory (no config.json); train one with molrmog train --out {run}")
    return config_from_json(read_json(path, "run configuration"), str(path))


def _create_config(out: Path, cfg: RunConfig) -> None:
    """Write config.json exclusively: complete content, and never over an existing run."""
    path = out / "config.json"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".config.json.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(config_to_json(cfg), indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.link(tmp, path)  # fails if the file exists: atomic and exclusive
    except FileExistsError:
        raise _already_a_run(out) from None
    finally:
        os.unlink(tmp)


def _already_a_run(out: Path) -> MolrmogError:
    return MolrmogError(f"{out} already holds a run; use --resume {out} to continue it or choose another --out")


@contextlib.contextmanager
def run_lock(out: str | Path):
    """An OS file lock on RUN/.lock for as long as this process trains the run; a second process is
    refused with the holder's pid. The lock goes with the process (also when it is killed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise MolrmogError(f"run {out} is being trained by process {holder} (lock {path}); wait for it to "
                               f"finish or stop it, then --resume {out}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def load_run_data(cfg: RunConfig, split: str = "train") -> ImageData:
    return load_dataset(cfg.dataset, data_dir=cfg.data_dir, limit=cfg.limit if split == "train" else None,
                        size=cfg.size, channels=cfg.channels, skip_bad=cfg.skip_bad, split=split)


def run_labels(out: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Cluster labels (N,), cluster weights (K,) and names of a run, checked against each other."""
    t = read_safetensors(out / "clusters.safetensors", "cluster assignment")
    names = read_json(out / "clusters.json", "cluster names")
    labels, weights = t.get("labels"), t.get("weights")
    if labels is None or weights is None or labels.ndim != 1 or weights.ndim != 1 or labels.dtype != torch.int64:
        raise ArtefactError(f"{out / 'clusters.safetensors'} does not hold int64 labels (N,) and weights (K,); "
                            f"delete it (and the run's vae/ and experts/) to cluster again")
    K = weights.numel()
    if not isinstance(names, list) or len(names) != K:
        raise ArtefactError(f"{out}: clusters.json ({len(names) if isinstance(names, list) else '?'} names) and "
                            f"clusters.safetensors ({K} clusters) do not agree; the files were damaged")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= K):
        raise ArtefactError(f"{out / 'clusters.safetensors'}: labels outside 0..{K - 1}")
    if (not weights.is_floating_point() or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any())
            or not float(weights.sum()) > 0):
        raise ArtefactError(f"{out / 'clusters.safetensors'}: cluster weights must be finite, non-negative and not "
                            f"all zero, got {weights.tolist()[:10]}; the file was damaged: restore it or delete it "
                            f"(and the run's vae/ and experts/) to cluster again")
    return labels, weights, names


class Run:
    """A run directory with its config and training data; the stages write into it."""

    def __init__(self, out: Path, cfg: RunConfig, data: ImageData, progress: bool = True):
        self.out, self.cfg, self.data, self.progress = Path(out), cfg, data, progress
        self.device = torch.device(cfg.device)
        self._labels = None

    # what a VAE layout needs (`molrmog.layouts`)
    @property
    def images(self) -> torch.Tensor:
        return self.data.images

    @property
    def image_shape(self):
        return self.data.shape

    @property
    def labels(self) -> torch.Tensor:
        if self._labels is None:
            self._labels = run_labels(self.out)[0]
            if self._labels.shape[0] != self.images.shape[0]:
                raise MolrmogError(f"run {self.out}: {self._labels.shape[0]} cluster labels but "
                                   f"{self.images.shape[0]} training images; the dataset changed since the run began")
        return self._labels

    @property
    def K(self) -> int:
        return int(self.labels.max()) + 1

    def cluster_images(self, k: int) -> torch.Tensor:
        return self.images[self.labels == k]

    def fit_vae(self, name: str | None, vae, images: torch.Tensor, seed: int, params=None, task: str | None = None):
        """Train a VAE (resumable); with a name, save it to RUN/vae/<name> (skipped when already there)."""
        task = task or f"vae-{name}"
        final = self.out / "vae" / name if name else None
        if final is not None and is_saved(final):
            return
        vae = vae.to(self.device)
        images = images.to(self.device)  # resident on the device for the whole task
        B = self.cfg.vae_batch

        def loss_fn(m, gen):
            idx = torch.randint(0, images.shape[0], (B,), generator=gen, device=gen.device)
            return vae_loss(m, images[idx], gen, cycle=self.cfg.vae_cycle)

        hist = fit(vae, loss_fn, steps=self.cfg.vae_steps, lr=self.cfg.vae_lr, lr_schedule=self.cfg.vae_lr_schedule,
                   seed=seed, progress=self.progress,
                   desc=task, checkpoint_dir=self.out / "checkpoints" / task,
                   checkpoint_every=self.cfg.checkpoint_every, params=params,
                   threads=Threads(torch.get_num_threads()))
        if final is not None:
            vae.save(final)
        self._log(task, hist)

    def _log(self, task: str, hist: dict, info: dict | None = None) -> None:
        write_json(self.out / "logs" / f"{task}.json", {"loss": hist["loss"], "seconds": hist["seconds"],
                                                        **({"info": info} if info else {})})
        log.info("%s: %d steps in %.1f s (final loss %.4g)", task, hist["steps"], hist["seconds"],
                 hist["loss"][-1] if hist["loss"] else float("nan"))

    @torch.no_grad()
    def encode(self, vae, images: torch.Tensor) -> torch.Tensor:
        return encode_images(vae, images, self.device)

    def train_expert(self, kind: str, k: int, z: torch.Tensor) -> LatentExpert:
        c = self.cfg
        opts = c.options_of(kind)
        final = self.out / "experts" / kind / str(k)
        if expert_done(self.out, kind, k):
            return LatentExpert.load(final, "expert", self.device)
        seed = expert_seed(c.seed, kind, k)
        shift = z.mean(0)
        scale = z.std(0).clamp_min(1e-3) if z.shape[0] > 1 else torch.ones_like(z[0])
        u = (z.flatten(1) - shift) / scale
        t0 = time.perf_counter()
        threads = Threads(torch.get_num_threads())  # this task's share of the cores other processes leave free
        with using_threads(threads.start()):
            e, opts, info = self._start_expert(kind, opts, u, seed, shift, scale)
        info["init_seconds"] = time.perf_counter() - t0
        e = e.to(self.device)
        task = f"{kind}-{k}"
        budget = {}
        if c.budget is not None:  # an equal share of the kind's budget; snapshots along it (`BUDGET_POINTS`)
            share = c.budget / self.K
            budget = {"time_budget": share, "time_offset": info["init_seconds"],
                      "snapshot_times": tuple(f * share for f in BUDGET_POINTS),
                      "on_snapshot": lambda i, step, now, model: _save_snapshot(self.out, kind, k, i, step, now, model)}
            info["budget_share"] = share
        hist = train_score(e, u.to(self.device), steps=MAX_STEPS if c.budget else opts.steps, batch_size=opts.batch,
                           lr=opts.lr, seed=seed, ema_decay=opts.ema_decay, progress=self.progress, desc=task,
                           checkpoint_dir=self.out / "checkpoints" / task, checkpoint_every=c.checkpoint_every,
                           threads=threads, **budget)
        if c.budget is not None:
            info["elapsed"], info["steps"] = hist["elapsed"], hist["steps"]
        e.save(final)
        self._log(task, {**hist, "seconds": info.get("elapsed", hist["seconds"] + info["init_seconds"])}, info)
        return e

    def _start_expert(self, kind: str, opts, u: torch.Tensor, seed: int, shift, scale):
        """The expert before DSM: options resolved from the data ('auto'), built, standardisation stored, and
        its closed-form start (EM) where the kind has one. Returns (expert, options, info)."""
        c, entry, info = self.cfg, get_kind(kind), {}
        schedule = get_schedule(c.schedule).config()
        if entry.resolve is not None:  # data-driven options ('auto'), chosen per cluster
            opts, info = entry.resolve(opts, u, seed)
        e = LatentExpert.wrap(kind, c.latent, entry.build(c.latent, opts, schedule, seed))
        e.shift.copy_(shift)
        e.scale.copy_(scale)
        if entry.init_from_data is not None:
            entry.init_from_data(e.net, u, opts, seed)
            info.update({"init": getattr(e.net, "em_info", {})})
        return e, opts, info


def _save_snapshot(out: Path, kind: str, k: int, index: int, step: int, elapsed: float, model) -> None:
    """One point of a budgeted run's curve: cluster k's expert of `kind` at snapshot `index` (a point taken before
    an interruption, after the last checkpoint, is kept: a resumed run does not take it again)."""
    if snapshot_done(out, kind, index, k):
        return
    d = out / "snapshots" / kind / str(index) / str(k)
    model.save(d)
    write_json(d / "snapshot.json", {"index": index, "step": step, "elapsed": elapsed})


def snapshot_done(out: Path, kind: str, index: int, k: int) -> bool:
    d = Path(out) / "snapshots" / kind / str(index) / str(k)
    return is_saved(d) and (d / "snapshot.json").is_file()


def expert_done(out: Path, kind: str, k: int) -> bool:
    return is_saved(Path(out) / "experts" / kind / str(k))


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, device) -> torch.Tensor:
    """Posterior-mean latents (N, d) on the CPU, encoded in batches of 512 on `device`."""
    if images.shape[0] == 0:
        raise MolrmogError("no images to encode (an empty cluster)")
    return torch.cat([vae.encode(b.to(device))[0].flatten(1).cpu() for b in images.split(512)])


def open_run(out: str | Path, progress: bool = False) -> Run:
    """A run directory with its saved config and training data (what every task starts from)."""
    cfg = load_config(out)
    return Run(Path(out), cfg, load_run_data(cfg), progress)


def vae_task(out: str, part: str, progress: bool = False) -> None:
    """Train one part of the run's VAE layout (a task: loads what it needs)."""
    run = open_run(out, progress)
    get_layout(run.cfg.vae).train(part, run)


def expert_task(out: str, kind: str, k: int, progress: bool = False) -> None:
    """Train the latent expert of one (kind, cluster) on the cluster's VAE latents."""
    run = open_run(out, progress)
    vae = get_layout(run.cfg.vae).load(run.out, run.K, run.device)[k]
    run.train_expert(kind, k, run.encode(vae, run.cluster_images(k)))


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A run checked and ready to train (nothing written yet): its resolved config, its training data and
    the run whose VAEs it reuses (--vae-from)."""
    cfg: RunConfig
    data: ImageData
    source: Path | None
    resume: bool


def prepare_run(out: str | Path, cfg: RunConfig | None = None, resume: bool = False,
                device: str | None = None) -> Prepared:
    """Every check `train_run` makes before it writes a file: the config, the data, the clusters the data can
    make and the --vae-from run (its files loaded, checked). Writes nothing."""
    out = Path(out)
    if resume:
        cfg = load_config(out)
        if device is not None:
            cfg = dataclasses.replace(cfg, device=device)
    elif cfg is None:
        raise MolrmogError("train_run needs a RunConfig (or resume=True)")
    elif (out / "config.json").exists():  # refused before the lock is taken: its file keeps the holder's pid
        raise _already_a_run(out)
    check_config(cfg)
    source = None
    if cfg.vae_from is not None and not resume:  # the data, clusters and VAEs of another run
        source = Path(cfg.vae_from)
        if source.resolve() == out.resolve():
            raise MolrmogError("--vae-from names the run itself; give another run")
        src = load_config(source)
        cfg = dataclasses.replace(cfg, **{f: getattr(src, f) for f in VAE_FIELDS})
        _check_source(source, src)
    data = load_run_data(cfg)
    cfg = resolve_config(cfg, data.shape)
    if not (out / "clusters.safetensors").is_file():
        check_clusters(cfg, data)
    return Prepared(cfg, data, source, resume)


def train_run(out: str | Path, cfg: RunConfig | None = None, resume: bool = False, progress: bool = True,
              executor: Executor | None = None, device: str | None = None, after=None,
              prepared: Prepared | None = None) -> dict:
    """Train (or resume) a run: clusters, VAEs, experts. The caller's `cfg` is not changed.

    Everything is validated before the first file is written (`prepare_run`; pass its result as `prepared`
    when it was already called); the run directory is locked while this process trains it. VAEs and
    experts are independent tasks (see `molrmog.executors`): sequential by default, or on a process pool /
    Ray with `executor`. Finished tasks are skipped, so `resume` continues a stopped run, whichever
    executor trained its first part. `device` (with `resume`) runs the rest of the run on another device
    than the one it started on.
    `after(out)` (optional) runs inside the lock once training is done; its result is returned as 'after'."""
    out = Path(out)
    p = prepared or prepare_run(out, cfg, resume, device)
    cfg = p.cfg
    with run_lock(out):
        if p.resume:
            removed = clean_stale_tmp(out)
            if removed:
                log.info("removed %d unfinished temporary file(s) of an interrupted write", len(removed))
        else:
            _create_config(out, cfg)
            if p.source is not None:
                _adopt_vaes(p.source, out, cfg)
        run = Run(out, cfg, p.data, progress)
        ex = executor or Executor(device=cfg.device)
        sub_progress = progress and not ex.parallel  # per-task bars only when tasks run here, one at a time
        t0 = time.perf_counter()
        K = _clusters(run)
        layout = get_layout(cfg.vae)
        vaes = [Task(f"vae-{part}", vae_task, (str(out), part, sub_progress)) for part in layout.missing(out, K)]
        run_tasks(vaes, ex, progress=progress, desc="VAEs")
        experts = [Task(f"{kind}-{k}", expert_task, (str(out), kind, k, sub_progress))
                   for kind in cfg.experts for k in range(K) if not expert_done(out, kind, k)]
        run_tasks(experts, ex, progress=progress, desc="experts")
        log.info("run %s trained (%d VAE and %d expert tasks) in %.1f s", out, len(vaes), len(experts),
                 time.perf_counter() - t0)
        done = {"run": str(out), "clusters": K, "vae_tasks": len(vaes), "expert_tasks": len(experts)}
        if after is not None:  # e.g. the report, written while the run is still locked
            done["after"] = after(out)
    return done


MIN_CLUSTER_IMAGES = 2  # a data-driven expert start needs a mean and a covariance


def check_clusters(cfg: RunConfig, data: ImageData) -> None:
    """Refuse, before anything is written, data that cannot give every cluster its images: a class with
    fewer than MIN_CLUSTER_IMAGES training images, or fewer images than k-means needs."""
    N = data.images.shape[0]
    if cfg.clusters is None and data.labels is not None:
        names = list(data.classes) or [str(k) for k in range(int(data.labels.max()) + 1)]
        counts = torch.bincount(data.labels, minlength=len(names)).tolist()
        few = [f"{names[k]!r} ({c})" for k, c in enumerate(counts) if c < MIN_CLUSTER_IMAGES]
        limit = cfg.limit is not None
        if few:
            raise MolrmogError(f"{data.name}: class(es) {', '.join(few[:5])} have fewer than {MIN_CLUSTER_IMAGES} "
                               f"training images (after the test hold-out{' and --limit' if limit else ''}); each "
                               f"class is a cluster and needs at least {MIN_CLUSTER_IMAGES}: add images"
                               + (" or raise --limit" if limit else ""))
    else:
        K = cfg.clusters or 10
        if N < MIN_CLUSTER_IMAGES * K:
            raise MolrmogError(f"{data.name}: {N} training images cannot make {K} clusters of at least "
                               f"{MIN_CLUSTER_IMAGES} images; use --clusters {max(1, N // MIN_CLUSTER_IMAGES)} or "
                               f"fewer, or add images")


def _check_source(source: Path, src: RunConfig) -> None:
    """Every VAE of the --vae-from run is trained and loads (checked), so a damaged source is refused before
    the new run exists, naming the source's file."""
    labels, weights, _ = run_labels(source)
    layout = get_layout(src.vae)
    if not layout.is_done(source, weights.numel()):
        raise MolrmogError(f"--vae-from {source}: its VAEs are not all trained; finish it first (--resume {source})")
    try:
        layout.load(source, weights.numel(), "cpu")
    except MolrmogError as e:
        raise MolrmogError(f"--vae-from {source}: {e}") from None


def _adopt_vaes(source: Path, out: Path, cfg: RunConfig) -> None:
    """Hard-link (or copy) the source run's clusters, VAEs and VAE logs into a new run: nothing is trained again."""
    import shutil

    def link(src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    K = run_labels(source)[1].numel()
    for name in ("clusters.safetensors", "clusters.json"):
        link(source / name, out / name)
    for d in get_layout(cfg.vae).dirs(K):
        for f in (source / "vae" / d).iterdir():
            if f.is_file():
                link(f, out / "vae" / d / f.name)
    for f in (source / "logs").glob("vae-*.json"):
        link(f, out / "logs" / f.name)
    log.info("VAEs and clusters of %s reused (%d clusters, %s layout)", source, K, cfg.vae)


def _clusters(run: Run) -> int:
    """Cluster index per image (the labels, or k-means on unified-VAE features), written once."""
    path = run.out / "clusters.safetensors"
    if path.is_file() and (run.out / "clusters.json").is_file():
        return run.K
    data, cfg = run.data, run.cfg
    t0 = time.perf_counter()
    if cfg.clusters is None and data.labels is not None:
        labels = data.labels.clone()
        K = len(data.classes) if data.classes else int(labels.max()) + 1
        names = list(data.classes) or [str(k) for k in range(K)]
    else:
        from sklearn.cluster import KMeans

        from .vae import ConvVAE

        K = cfg.clusters or 10
        if K > data.images.shape[0]:
            raise MolrmogError(f"--clusters {K} exceeds the {data.images.shape[0]} training images")
        vae = ConvVAE(data.shape, cfg.latent, cfg.vae_width, cfg.vae_beta, seed=cfg.seed, blocks=cfg.vae_blocks)
        run.fit_vae("features", vae, data.images, seed=cfg.seed)
        feats = run.encode(vae.to(run.device), data.images).numpy()
        labels = torch.as_tensor(KMeans(K, n_init=4, random_state=cfg.seed).fit(feats).labels_, dtype=torch.int64)
        names = [f"cluster {k}" for k in range(K)]
    counts = torch.bincount(labels, minlength=K)
    if (counts < MIN_CLUSTER_IMAGES).any():  # k-means only: labelled clusters were checked before the run began
        raise MolrmogError(f"k-means left cluster(s) {(counts < MIN_CLUSTER_IMAGES).nonzero().flatten().tolist()} "
                           f"with fewer than {MIN_CLUSTER_IMAGES} training images; remove {run.out} and train "
                           f"again with fewer --clusters or more data")
    weights = counts.double() / counts.sum()
    write_json(run.out / "clusters.json", names)
    atomic_write(path, lambda p: save_file({"labels": labels, "weights": weights}, p))
    log.info("clusters: %d (%s) in %.1f s", K, "labels" if cfg.clusters is None and data.labels is not None
             else "k-means on unified-VAE features", time.perf_counter() - t0)
    return K


# --- loading and sampling ----------------------------------------------------------------


def load_run(run: str | Path, kind: str, device: str = "cpu"):
    """(config, cluster weights, class names, VAEs per cluster, experts per cluster) of a trained run."""
    run = Path(run)
    cfg = load_config(run)
    get_kind(kind)
    if kind not in cfg.experts:
        raise MolrmogError(f"run {run} has no '{kind}' experts (it trained {', '.join(cfg.experts)})")
    if not (run / "clusters.safetensors").is_file():
        raise MolrmogError(f"run {run} is not finished (no clusters.safetensors); continue it with --resume {run}")
    _, weights, names = run_labels(run)
    K = weights.numel()
    vaes = get_layout(cfg.vae).load(run, K, device)
    experts = []
    for k in range(K):
        d = run / "experts" / kind / str(k)
        if not expert_done(run, kind, k):
            raise MolrmogError(f"expert {d} is missing; continue the run with --resume {run}")
        e = LatentExpert.load(d, "expert", device)
        if e.kind != kind or list(e.latent) != list(cfg.latent):
            raise ArtefactError(f"{d}/config.json describes a {e.kind} expert on latent {e.latent}, not the run's "
                                f"{kind} expert on {tuple(cfg.latent)}")
        experts.append(e.eval())
    return cfg, weights, names, vaes, experts


def cluster_seed(seed: int, k: int) -> int:
    """Seed of cluster k's sampling noise: clusters are sampled independently (in any order, anywhere)."""
    return 1_000_003 * int(seed) + int(k) + 1


def sample_run(run: str | Path, kind: str, n: int, cls: int | None = None, sampler: str | None = None,
               steps: int | None = None, seed: int = 0, device: str = "cpu", progress: bool = False,
               executor: Executor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, C, H, W) in [0, 1] and their cluster indices; clusters drawn by weight or fixed.
    With a parallel `executor`, every cluster's images are one task."""
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
    if not 1 <= n <= 10**6:
        raise MolrmogError(f"--n must lie in [1, 1000000], got {n}")
    if cls is not None and not 0 <= cls < K:
        raise MolrmogError(f"--class must lie in 0..{K - 1}, got {cls}")
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


def _sample_expert(expert, vae, n: int, sampler: str, steps: int, g, device, progress):
    sched = expert.schedule
    ts = make_grid(sched, steps, "karras")
    u = generate(expert, n, expert.shift.numel(), sched, ts, sampler, generator=g, dtype=torch.float32,
                 device=device, progress=progress)
    z = expert.unstandardise(u)
    return torch.sigmoid(vae.decode(z)).cpu()

