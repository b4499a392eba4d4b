"""The image pipeline: clusters -> VAEs (a layout) -> one small latent expert per (kind, cluster).

A run is a directory:

    config.json                 the run's settings (`molrmog.pipeline.config.RunConfig`; what --resume continues)
    .lock                       held by the process that trains the run (one writer per run)
    clusters.safetensors        cluster index of every training image, cluster weights; clusters.json: names
    vae/...                     the VAEs of the layout (`molrmog.models.layouts`), diffusers model folders
    experts/<kind>/<k>/         latent experts (`molrmog.models.kinds.LatentExpert`) with their standardisation
    checkpoints/<task>/         resumable training state of every stage
    logs/<task>.json            losses and wall time of every finished stage
    losses.csv, loss_curves.png, samples_<kind>.png, samples_data.png, report.md/json  (`molrmog.pipeline.report`)

Every stage is a task with its own seed and checkpoint; finished tasks are skipped on resume.
"""

from __future__ import annotations

import contextlib
import copy
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

from molrmog.core.artefacts import atomic_write, clean_stale_tmp, is_saved, write_json
from molrmog.core.errors import MolrmogError
from molrmog.core.schedules import get_schedule
from molrmog.models.kinds import MAX_STEPS, LatentExpert, expert_seed, get_kind
from molrmog.models.layouts import get_layout, new_vae, train_vae
from molrmog.pipeline.config import BUDGET_POINTS, VAE_FIELDS, RunConfig, check_config, config_to_json, resolve_config
from molrmog.pipeline.data import ImageData
from molrmog.pipeline.run import (
    Run,
    assemble,
    cluster_seed,
    draw_clusters,
    encode_images,
    expert_done,
    load_config,
    load_run_data,
    run_labels,
    sample_expert,
)
from molrmog.training.executors import Executor, Task, run_tasks
from molrmog.training.threads import Threads, using_threads
from molrmog.training.train import train_score

__all__ = ["RunConfig", "Run", "Trainer", "train_run", "sample_run", "vae_task", "expert_task", "load_config",
           "run_lock", "encode_images", "cluster_seed", "expert_done", "load_run_data", "run_labels", "check_clusters",
           "prepare_run", "Prepared"]

log = logging.getLogger(__name__)


# --- the run directory --------------------------------------------------------------------------


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


class Trainer:
    """What the training stages lend: a `Run` (its data and clusters, read once per process) and the training
    of its VAEs and experts, which write into the run directory. `cfg` may differ from the run's file in
    resume-safe settings (the device of this process)."""

    def __init__(self, run: Run, progress: bool = True, cfg: RunConfig | None = None):
        self.run, self.progress = run, progress
        self.cfg = cfg or run.cfg
        self.out = run.path
        self.device = torch.device(self.cfg.device)

    # what a VAE layout needs (`molrmog.models.layouts`)
    @property
    def data(self) -> ImageData:
        return self.run.data

    @property
    def images(self) -> torch.Tensor:
        return self.run.images

    @property
    def image_shape(self):
        return self.run.image_shape

    @property
    def labels(self) -> torch.Tensor:
        return self.run.labels

    @property
    def K(self) -> int:
        return self.run.K

    def cluster_images(self, k: int) -> torch.Tensor:
        return self.run.cluster_images(k)

    def fit_vae(self, name: str | None, vae, images: torch.Tensor, seed: int, params=None, task: str | None = None,
                steps: int | None = None):
        """Train a VAE (resumable; `steps` default: the run's vae_steps); with a name, save it to RUN/vae/<name>
        (skipped when already there)."""
        task = task or f"vae-{name}"
        final = self.out / "vae" / name if name else None
        if final is not None and is_saved(final):
            return
        vae = vae.to(self.device)
        images = images.to(self.device)  # resident on the device for the whole task
        hist = train_vae(vae, images, self.cfg, seed=seed, steps=steps, progress=self.progress, desc=task,
                         checkpoint_dir=self.out / "checkpoints" / task, checkpoint_every=self.cfg.checkpoint_every,
                         params=params, threads=Threads(torch.get_num_threads()))
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
                      "on_snapshot": lambda i, step, now, model: _save_snapshot(self.out, kind, k, i, step, now,
                                                                                model, opts, u)}
            info["budget_share"] = share
        hist = train_score(e, u.to(self.device), steps=MAX_STEPS if c.budget else opts.steps, batch_size=opts.batch,
                           lr=opts.lr, seed=seed, ema_decay=opts.ema_decay, lr_schedule=opts.lr_schedule,
                           progress=self.progress, desc=task,
                           checkpoint_dir=self.out / "checkpoints" / task, checkpoint_every=c.checkpoint_every,
                           threads=threads, **budget)
        if c.budget is not None:
            info["elapsed"], info["steps"] = hist["elapsed"], hist["steps"]
        info.update(get_kind(kind).finished(e, opts, u.to(self.device)))
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


def _save_snapshot(out: Path, kind: str, k: int, index: int, step: int, elapsed: float, model, opts, u) -> None:
    """One point of a budgeted run's curve: cluster k's expert of `kind` at snapshot `index`, finished as the
    final expert will be (a copy: training goes on with the model as it is); a point taken before an
    interruption, after the last checkpoint, is kept: a resumed run does not take it again."""
    if snapshot_done(out, kind, index, k):
        return
    d = out / "snapshots" / kind / str(index) / str(k)
    entry = get_kind(kind)
    if entry.finish is not None:
        model = copy.deepcopy(model)
        entry.finished(model, opts, u)
    model.save(d)
    write_json(d / "snapshot.json", {"index": index, "step": step, "elapsed": elapsed})


def snapshot_done(out: Path, kind: str, index: int, k: int) -> bool:
    d = Path(out) / "snapshots" / kind / str(index) / str(k)
    return is_saved(d) and (d / "snapshot.json").is_file()


def vae_task(out: str, part: str, progress: bool = False) -> None:
    """Train one part of the run's VAE layout (a task: the process's `Run` of `out` gives the data)."""
    run = Run.open(out)
    get_layout(run.cfg.vae).train(part, Trainer(run, progress))


def expert_task(out: str, kind: str, k: int, progress: bool = False) -> None:
    """Train the latent expert of one (kind, cluster) on the cluster's VAE latents (only that VAE is read)."""
    run = Run.open(out)
    Trainer(run, progress).train_expert(kind, k, run.latents(k))


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
            raise MolrmogError("vae_from names the run itself; give another run", param="vae_from")
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
    experts are independent tasks (see `molrmog.training.executors`): sequential by default, or on a process pool /
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
        run = Trainer(Run.open(out, data=p.data), progress, cfg)
        ex = executor or Executor(device=cfg.device)
        sub_progress = progress and not ex.parallel  # per-task bars only when tasks run here, one at a time
        t0 = time.perf_counter()
        K = _clusters(run)
        layout = get_layout(cfg.vae)
        vaes = []
        for phase in layout.phases(K):  # the tasks of a phase are independent; a phase waits for the one before
            todo = [Task(f"vae-{p}", vae_task, (str(out), p, sub_progress)) for p in phase if not
                    layout.part_done(out, p)]
            run_tasks(todo, ex, progress=progress, desc="VAEs", width=len(phase))  # a lone backbone: every CPU
            vaes += todo
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
        raise MolrmogError(f"vae_from {source}: its VAEs are not all trained; finish it first (--resume {source})",
                           param="vae_from")
    try:
        layout.load(source, weights.numel(), "cpu")
    except MolrmogError as e:
        raise MolrmogError(f"vae_from {source}: {e}", param="vae_from") from None


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


def _clusters(run: Trainer) -> int:
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

        K = cfg.clusters or 10
        if K > data.images.shape[0]:
            raise MolrmogError(f"clusters {K} exceeds the {data.images.shape[0]} training images", param="clusters")
        vae = new_vae(cfg, data.shape, cfg.seed)
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


def sample_run(run: str | Path | Run, kind: str, n: int, cls: int | None = None, sampler: str | None = None,
               steps: int | None = None, seed: int = 0, device: str = "cpu", progress: bool = False,
               executor: Executor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, C, H, W) in [0, 1] and their cluster indices; clusters drawn by weight or fixed
    (`Run.sample`). With a parallel `executor`, every cluster's images are one task."""
    ex = executor or Executor(device=device)
    r = Run.coerce(run, None if ex.parallel else device)
    r.check_kinds([kind])  # every artefact of the kind is read and checked before any work
    if not ex.parallel:
        return r.sample(n, kind, cluster=cls, sampler=sampler, steps=steps, seed=seed, progress=progress)
    sampler, steps = sampler or r.cfg.sampler, steps or r.cfg.sample_steps
    ks = draw_clusters(r.weights, n, cls, seed)
    counts = torch.bincount(ks, minlength=r.K)
    tasks = [Task(f"sample-{kind}-{k}", sample_task, (str(r.path), kind, k, int(counts[k]), sampler, steps, seed,
                                                      device)) for k in range(r.K) if counts[k]]
    res = run_tasks(tasks, ex, progress=progress, desc="sampling")
    return assemble(ks, {k: res[f"sample-{kind}-{k}"] for k in range(r.K) if counts[k]}), ks


def sample_task(run: str, kind: str, k: int, n: int, sampler: str, steps: int, seed: int, device: str):
    """n images of cluster k (a task: reads cluster k's expert and VAE only)."""
    r = Run.open(run, device=device)
    g = torch.Generator().manual_seed(cluster_seed(seed, k))
    return sample_expert(r.expert(kind, k), r.vae(k), n, sampler, steps, g, device, False)
