"""A run directory as one object: `Run.load(path)`, loaded lazily, each piece once.

Modelled on a diffusers pipeline: `Run.load(path)` validates `config.json` once and nothing else; the
training data, the cluster labels, each cluster's VAE and each (kind, cluster) expert are read when first
used, and only then. The verbs users reach for are methods:

    from molrmog.pipeline.run import Run

    run = Run.load("runs/demo/dedicated")
    kind = run.mixture_kind()                  # the first trained kind whose law is a mixture (MoG)
    images, clusters = run.sample(16, kind, cluster=3, sampler="exact", steps=1)
    z = run.encode(images, cluster=3)          # posterior means, (16, C*H*W of the latent)
    again = run.decode(z, cluster=3)           # images in [0, 1]

Evaluation, compare, editing, watermarks, the analyses and the generalisation experiment take a `Run`.
Tasks that run elsewhere (a process pool, Ray) carry only the run's path and their unit of work; in each
process `Run.open(path)` returns the one `Run` of that path (while its config.json is unchanged), so a
process reads the data and each VAE at most once however many tasks it runs.
"""

from __future__ import annotations

import collections
import functools
import os
import threading
from pathlib import Path

import torch
from torch import Tensor

from molrmog.core.artefacts import WEIGHTS, is_saved, read_json, read_safetensors
from molrmog.core.errors import ArtefactError, MolrmogError
from molrmog.core.samplers import generate
from molrmog.core.schedules import make_grid
from molrmog.models.kinds import LatentExpert, get_kind
from molrmog.models.layouts import get_layout
from molrmog.pipeline.config import RunConfig, config_from_json
from molrmog.pipeline.data import ImageData, load_dataset, split_spec

__all__ = ["Run", "load_config", "run_labels", "load_run_data", "encode_images", "cluster_seed", "expert_done",
           "draw_clusters", "assemble", "sample_expert"]

OPEN_RUNS = 2  # Run objects one process keeps for Run.open (each holds its data, VAEs and experts)


def load_config(run: str | Path) -> RunConfig:
    path = Path(run) / "config.json"
    if not Path(run).is_dir() or not path.is_file():
        raise MolrmogError(f"{run} is not a run directory (no config.json); train one with molrmog train --out {run}")
    return config_from_json(read_json(path, "run configuration"), str(path))


_OPEN_LOCK = threading.Lock()
DATA_CACHE = 2  # splits one process keeps (Fashion-MNIST's train split is 188 MB as float32)
_DATA: collections.OrderedDict = collections.OrderedDict()


def _files_stamp(cfg: RunConfig) -> tuple:
    """What changes when the files a run's data is read from change: every file under the dataset's PATH and
    --data-dir (name, size, mtime), and $MOLRMOG_DATA."""
    out: list = [os.environ.get("MOLRMOG_DATA")]
    for root in (split_spec(cfg.dataset)[1], cfg.data_dir):
        if not root:
            continue
        for d, _, files in sorted(os.walk(root)):
            for f in sorted(files):
                try:
                    st = os.stat(os.path.join(d, f))
                except OSError:
                    continue
                out.append((d, f, st.st_size, st.st_mtime_ns))
    return tuple(out)


def load_run_data(cfg: RunConfig, split: str = "train") -> ImageData:
    """A run's training (or test) split, read once per process while its files are unchanged (the images are
    shared: callers do not modify them)."""
    limit = cfg.limit if split == "train" else None
    key = (cfg.dataset, cfg.data_dir, limit, cfg.size, cfg.channels, cfg.skip_bad, split, _files_stamp(cfg))
    with _OPEN_LOCK:
        hit = _DATA.get(key)
    if hit is None:
        hit = load_dataset(cfg.dataset, data_dir=cfg.data_dir, limit=limit, size=cfg.size, channels=cfg.channels,
                           skip_bad=cfg.skip_bad, split=split)
        with _OPEN_LOCK:
            _DATA[key] = hit
            while len(_DATA) > DATA_CACHE:
                _DATA.popitem(last=False)
    return hit


def run_labels(out: Path) -> tuple[Tensor, Tensor, list[str]]:
    """Cluster labels (N,), cluster weights (K,) and names of a run, checked against each other."""
    out = Path(out)
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


def expert_done(out: Path, kind: str, k: int) -> bool:
    return is_saved(Path(out) / "experts" / kind / str(k))


@torch.no_grad()
def encode_images(vae, images: Tensor, device) -> Tensor:
    """Posterior-mean latents (N, d) on the CPU, encoded in batches of 512 on `device`."""
    if images.shape[0] == 0:
        raise MolrmogError("no images to encode (an empty cluster)")
    return torch.cat([vae.encode(b.to(device))[0].flatten(1).cpu() for b in images.split(512)])


def cluster_seed(seed: int, k: int) -> int:
    """Seed of cluster k's sampling noise: clusters are sampled independently (in any order, anywhere)."""
    return 1_000_003 * int(seed) + int(k) + 1


def draw_clusters(weights: Tensor, n: int, cluster: int | None, seed: int) -> Tensor:
    """The cluster of each of n images: drawn by weight (seeded), or all `cluster`."""
    K = weights.numel()
    if not 1 <= n <= 10**6:
        raise MolrmogError(f"n must lie in [1, 1000000], got {n}", param="n")
    if cluster is not None and not 0 <= cluster < K:
        raise MolrmogError(f"cluster must lie in 0..{K - 1}, got {cluster}", param="cluster")
    g = torch.Generator().manual_seed(seed)
    return torch.full((n,), cluster) if cluster is not None else torch.multinomial(weights, n, True, generator=g)


def assemble(ks: Tensor, per_cluster: dict) -> Tensor:
    """Images per cluster {k: (n_k, ...)} back in the order of ks."""
    out = [None] * ks.numel()
    for k, imgs in per_cluster.items():
        for j, i in enumerate((ks == k).nonzero().flatten().tolist()):
            out[i] = imgs[j]
    return torch.stack(out)


@torch.no_grad()
def sample_expert(expert, vae, n: int, sampler: str, steps: int, generator, device, progress: bool = False) -> Tensor:
    """n images of one cluster: latents from `expert` (Karras grid), decoded by `vae`; on the CPU, in [0, 1]."""
    sched = expert.schedule
    u = generate(expert, n, expert.shift.numel(), sched, make_grid(sched, steps, "karras"), sampler,
                 generator=generator, dtype=torch.float32, device=device, progress=progress)
    return torch.sigmoid(vae.decode(expert.unstandardise(u))).cpu()


def _stamp(path: Path) -> tuple | None:
    """What changes when a file is written again (atomic writes replace the inode); None when it is missing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


_OPEN: collections.OrderedDict = collections.OrderedDict()


class Run:
    """A run directory (see the module docstring). Build it with `Run.load(path)` (a finished run: clusters
    written), `Run.open(path)` (the process's shared object; also a run still training) or, while training,
    `Run(path, cfg, data=...)`."""

    def __init__(self, path: str | Path, cfg: RunConfig, *, data: ImageData | None = None,
                 device: str | None = None):
        self.path = Path(path)
        self.cfg = cfg
        self.device = torch.device(device or cfg.device)
        self._data = data
        # each cache entry keeps the stamp of the file it was read from: a file written again is read again
        self._clusters: tuple | None = None
        self._vaes: dict[int, tuple] = {}
        self._shared: dict = {}  # what a layout shares between clusters (the unified VAE, the LoRA VAE)
        self._experts: dict[tuple[str, int], tuple] = {}
        self._latents: dict[int, tuple] = {}

    # --- opening ------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None) -> Run:
        """A trained run: config.json validated (once), clusters present; everything else loads when used."""
        run = cls.open(path, device=device)
        if not (run.path / "clusters.safetensors").is_file():
            raise MolrmogError(f"run {path} is not finished (no clusters.safetensors); continue it with "
                               f"--resume {path}")
        return run

    @classmethod
    def open(cls, path: str | Path, *, device: str | None = None, data: ImageData | None = None) -> Run:
        """This process's `Run` of `path` on `device` (default: the run's): the same object for every caller
        while config.json is unchanged, so tasks share its data, VAEs and experts. Also a run still training.
        `data` (the run's training split, already read) is used when the object is new."""
        path = Path(path)
        if not Path(path).is_dir() or not (path / "config.json").is_file():
            load_config(path)  # the error that says what a run directory is
        base = (str(path.resolve()), _stamp(path / "config.json"))
        with _OPEN_LOCK:
            same = [r for key, r in _OPEN.items() if key[:2] == base]
            cfg = same[0].cfg if same else load_config(path)
            key = (*base, str(device or cfg.device))
            run = _OPEN.get(key)
            if run is None:
                run = cls(path, cfg, data=data if data is not None or not same else same[0]._data, device=device)
                _OPEN[key] = run
                while len(_OPEN) > OPEN_RUNS:
                    _OPEN.popitem(last=False)
            _OPEN.move_to_end(key)
        return run

    @classmethod
    def coerce(cls, run: Run | str | Path, device: str | None = None) -> Run:
        """A `Run` from a `Run` (as it is, or on `device` when that is another) or a path (`Run.load`)."""
        if isinstance(run, Run):
            if device is None or torch.device(device) == run.device:
                return run
            run = run.path
        return cls.load(run, device=device)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, dataset={self.cfg.dataset!r}, experts={','.join(self.cfg.experts)})"

    # --- data and clusters ----------------------------------------------------------------------------

    @property
    def data(self) -> ImageData:
        """The training split (read once)."""
        if self._data is None:
            self._data = load_run_data(self.cfg)
        return self._data

    @functools.cached_property
    def test(self) -> ImageData:
        """The test split (read once)."""
        return load_run_data(self.cfg, split="test")

    @property
    def images(self) -> Tensor:
        return self.data.images

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.data.shape

    def _cluster_files(self):
        stamp = _stamp(self.path / "clusters.safetensors"), _stamp(self.path / "clusters.json")
        if self._clusters is None or self._clusters[0] != stamp:
            labels, weights, names = run_labels(self.path)
            if labels.shape[0] != self.images.shape[0]:
                raise MolrmogError(f"run {self.path}: {labels.shape[0]} cluster labels but {self.images.shape[0]} "
                                   f"training images; the dataset changed since the run was trained")
            self._clusters = (stamp, (labels, weights, names))
        return self._clusters[1]

    @property
    def labels(self) -> Tensor:
        """Cluster index of every training image."""
        return self._cluster_files()[0]

    @property
    def weights(self) -> Tensor:
        """Cluster weights (K,)."""
        return self._cluster_files()[1]

    @property
    def names(self) -> list[str]:
        return self._cluster_files()[2]

    @property
    def K(self) -> int:
        return self.weights.numel()

    @property
    def class_conditional(self) -> bool:
        """Clusters are the dataset's classes (not k-means clusters)."""
        return self.cfg.clusters is None and self.data.labels is not None

    def cluster_images(self, k: int) -> Tensor:
        return self.images[self.labels == k]

    # --- models -------------------------------------------------------------------------------------------

    def vae(self, k: int):
        """Cluster k's VAE (its view of a shared one for the unified and LoRA layouts), loaded once."""
        self._check_cluster(k)
        layout = get_layout(self.cfg.vae)
        stamp = _stamp(self.path / "vae" / layout.dir_of(k) / WEIGHTS)
        hit = self._vaes.get(k)
        if hit is None or hit[0] != stamp or stamp is None:
            self._vaes[k] = (stamp, layout.load_one(self.path, self.K, k, self.device, self._shared))
        return self._vaes[k][1]

    def vaes(self) -> list:
        return [self.vae(k) for k in range(self.K)]

    def expert(self, kind: str, k: int) -> LatentExpert:
        """The trained expert of `kind` for cluster k, loaded once and checked against the run."""
        self._check_kind(kind)
        self._check_cluster(k)
        d = self.path / "experts" / kind / str(k)
        stamp = _stamp(d / WEIGHTS)
        hit = self._experts.get((kind, k))
        if hit is None or hit[0] != stamp or stamp is None:
            if not expert_done(self.path, kind, k):
                raise MolrmogError(f"expert {d} is missing; continue the run with --resume {self.path}")
            e = LatentExpert.load(d, "expert", self.device)
            if e.kind != kind or list(e.latent) != list(self.cfg.latent):
                raise ArtefactError(f"{d}/config.json describes a {e.kind} expert on latent {e.latent}, not the "
                                    f"run's {kind} expert on {tuple(self.cfg.latent)}")
            self._experts[(kind, k)] = (stamp, e.eval())
        return self._experts[(kind, k)][1]

    def experts(self, kind: str) -> list[LatentExpert]:
        return [self.expert(kind, k) for k in range(self.K)]

    def check_kinds(self, kinds) -> list[str]:
        """The kinds asked for (default: every trained kind), each trained by the run; every artefact is read
        and checked before any work."""
        kinds = list(kinds or self.cfg.experts)
        for kind in kinds:
            self.experts(kind)
        self.vaes()
        return kinds

    def mixture_kind(self) -> str:
        """The first trained kind whose learned law is a closed-form mixture (MoG, Gaussian: the exact sampler,
        editing and watermarks in closed form), else the first trained kind."""
        for kind in self.cfg.experts:
            if hasattr(get_kind(kind).net_class, "mixture_for"):
                return kind
        return self.cfg.experts[0]

    def _check_kind(self, kind: str) -> None:
        get_kind(kind)
        if kind not in self.cfg.experts:
            raise MolrmogError(f"run {self.path} has no '{kind}' experts (it trained {', '.join(self.cfg.experts)})")

    def _check_cluster(self, k: int) -> None:
        if not 0 <= int(k) < self.K:
            raise MolrmogError(f"cluster must lie in 0..{self.K - 1}, got {k}", param="cluster")

    # --- verbs ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: Tensor, cluster: int) -> Tensor:
        """Posterior-mean latents (N, d) of images with cluster `cluster`'s VAE (on the CPU)."""
        return encode_images(self.vae(cluster), images, self.device)

    @torch.no_grad()
    def decode(self, z: Tensor, cluster: int) -> Tensor:
        """Images in [0, 1] (on the CPU) of latents z (N, d) or (N, c, h, w) with cluster `cluster`'s VAE."""
        z = z.to(self.device, torch.float32).reshape(-1, *self.cfg.latent)
        return torch.cat([torch.sigmoid(self.vae(cluster).decode(b)).cpu() for b in z.split(512)])

    def latents(self, k: int) -> Tensor:
        """Posterior-mean latents of cluster k's training images (encoded once per VAE)."""
        vae = self.vae(k)
        hit = self._latents.get(k)
        if hit is None or hit[0] is not vae:
            self._latents[k] = (vae, self.encode(self.cluster_images(k), k))
        return self._latents[k][1]

    @torch.no_grad()
    def reconstructions(self) -> Tensor:
        """Every training image decoded from its latent mean by its cluster's VAE (cluster order)."""
        return torch.cat([self.decode(self.latents(k), k) for k in range(self.K)])

    @torch.no_grad()
    def sample(self, n: int, kind: str | None = None, *, cluster: int | None = None, sampler: str | None = None,
               steps: int | None = None, seed: int = 0, experts: list | None = None,
               progress: bool = False) -> tuple[Tensor, Tensor]:
        """n images (n, C, H, W) in [0, 1] and their clusters; clusters drawn by weight (seeded) or fixed.
        Cluster k's noise comes from `cluster_seed(seed, k)`: two kinds sampled with one seed see the same
        noise. `kind` defaults to the run's first; `experts` replaces the run's experts of `kind` (e.g. the
        memorisation baseline)."""
        kind = kind or self.cfg.experts[0]
        sampler, steps = sampler or self.cfg.sampler, steps or self.cfg.sample_steps
        ks = draw_clusters(self.weights, n, cluster, seed)
        per = {}
        for k in ks.unique().tolist():
            g = torch.Generator().manual_seed(cluster_seed(seed, k))
            e = experts[k] if experts is not None else self.expert(kind, k)
            per[k] = sample_expert(e, self.vae(k), int((ks == k).sum()), sampler, steps, g, self.device, progress)
        return assemble(ks, per), ks
