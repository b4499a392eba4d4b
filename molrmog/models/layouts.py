"""VAE layouts: how a run's clusters get their encoders and decoders.

Every layout has the same small interface -- `parts(K)` (independent training tasks; `phases(K)` when some
must wait for others), `train(part, trainer)`, `is_done(run_dir, K)`, `load_one(run_dir, K, k, device)`
(cluster k's VAE: a task reads only its own) and `load(run_dir, K, device)` (one VAE per cluster) -- and the
pipeline iterates over them without knowing which is which:

    dedicated   one ConvVAE per cluster            RUN/vae/<k>/
    unified     one ConvVAE for all clusters       RUN/vae/unified/
    lora        one backbone trained on all data, then one peft LoRA adapter per cluster
                (backbone frozen; the adapters train in parallel)
                                                    RUN/vae/backbone/, RUN/vae/lora/

`trainer` is what the pipeline lends a layout: the run's data, cluster labels and config, and
`fit_vae(name, vae, images, seed, params, task, steps)`, which trains a VAE as a resumable task and saves
it to RUN/vae/<name>.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from molrmog.core.artefacts import WEIGHTS, atomic_write, is_saved, read_safetensors
from molrmog.core.errors import ArtefactError, MolrmogError
from molrmog.core.registry import Registry
from molrmog.models.vae import ConvVAE, LoRAVAE, vae_loss
from molrmog.training.train import fit

__all__ = ["VAELayout", "Dedicated", "Unified", "LoRA", "LAYOUTS", "get_layout", "ClusterView", "new_vae",
           "train_vae"]


class VAELayout:
    name = ""
    description = ""

    def dirs(self, K: int) -> list[str]:
        """The finished artefacts under RUN/vae."""
        raise NotImplementedError

    def parts(self, K: int) -> list[str]:
        """Independent training tasks (each resumable)."""
        raise NotImplementedError

    def phases(self, K: int) -> list[list[str]]:
        """The parts in the order they must run: the parts of a phase are independent tasks, and a phase starts
        once the one before it is done."""
        return [self.parts(K)]

    def train(self, part: str, trainer) -> None:
        raise NotImplementedError

    def dir_of(self, k: int) -> str:
        """The folder under RUN/vae holding cluster k's VAE."""
        raise NotImplementedError

    def load_one(self, run_dir: Path, K: int, k: int, device="cpu", shared: dict | None = None):
        """Cluster k's VAE; `shared` (a dict the caller keeps) holds what clusters share, loaded once."""
        raise NotImplementedError

    def load(self, run_dir: Path, K: int, device="cpu") -> list:
        self._check_done(run_dir, K)
        shared: dict = {}
        return [self.load_one(run_dir, K, k, device, shared) for k in range(K)]

    def is_done(self, run_dir: Path, K: int) -> bool:
        return all(is_saved(Path(run_dir) / "vae" / d) for d in self.dirs(K))

    def part_done(self, run_dir: Path, part: str) -> bool:
        """Whether a part is trained (a resumed run skips it): by default, RUN/vae/<part> is saved."""
        return is_saved(Path(run_dir) / "vae" / part)

    def _check_done(self, run_dir: Path, K: int) -> None:
        for d in self.dirs(K):
            if not is_saved(Path(run_dir) / "vae" / d):
                raise MolrmogError(f"VAE {Path(run_dir) / 'vae' / d} is missing; continue the run with "
                                   f"--resume {run_dir}")


def new_vae(cfg, image_shape, seed: int) -> ConvVAE:
    """An untrained ConvVAE with a resolved run configuration's VAE settings (latent, width, KL weight,
    residual blocks, likelihood)."""
    return ConvVAE(image_shape, cfg.latent, cfg.vae_width, cfg.vae_beta, seed=seed, blocks=cfg.vae_blocks,
                   recon=cfg.vae_recon)


def train_vae(vae, images: torch.Tensor, cfg, *, seed: int, steps: int | None = None, **fit_args) -> dict:
    """Train `vae` on `images` (on the VAE's device) with a resolved run configuration's VAE settings (batch,
    steps -- or `steps` --, learning rate and schedule, cycle term); `fit_args` go to `molrmog.training.train.fit`
    (progress, desc, checkpoint_dir, checkpoint_every, params, threads). Returns fit's history.

    The convolutions run in channels-last memory format while training (`benchmarks/bench_vae_step.py`: 1.3x
    faster steps for the 28x28 VAE on one CPU thread, 1.1x for digits' 8x8 one); the VAE is handed back in the
    default format (safetensors stores contiguous tensors). The values are the same up to float rounding."""
    images = images.contiguous(memory_format=torch.channels_last)
    B = cfg.vae_batch
    vae.to(memory_format=torch.channels_last)

    def loss_fn(m, gen):
        idx = torch.randint(0, images.shape[0], (B,), generator=gen, device=gen.device)
        return vae_loss(m, images[idx], gen, cycle=cfg.vae_cycle)

    try:
        return fit(vae, loss_fn, steps=cfg.vae_steps if steps is None else steps, lr=cfg.vae_lr,
                   lr_schedule=cfg.vae_lr_schedule, seed=seed, **fit_args)
    finally:
        vae.to(memory_format=torch.contiguous_format)


def _new_vae(trainer, seed: int) -> ConvVAE:
    return new_vae(trainer.cfg, trainer.image_shape, seed)


class Dedicated(VAELayout):
    name = "dedicated"
    description = "one VAE per cluster"

    def dirs(self, K):
        return [str(k) for k in range(K)]

    def parts(self, K):
        return self.dirs(K)

    def train(self, part, trainer):
        k = int(part)
        trainer.fit_vae(part, _new_vae(trainer, trainer.cfg.seed + 1 + k), trainer.cluster_images(k),
                        seed=trainer.cfg.seed + 1 + k)

    def dir_of(self, k):
        return str(k)

    def load_one(self, run_dir, K, k, device="cpu", shared=None):
        return ConvVAE.load(_vae_dir(run_dir, str(k)), "VAE", device)


class Unified(VAELayout):
    name = "unified"
    description = "one VAE for all clusters"

    def dirs(self, K):
        return ["unified"]

    def parts(self, K):
        return ["unified"]

    def train(self, part, trainer):
        trainer.fit_vae("unified", _new_vae(trainer, trainer.cfg.seed), trainer.images, seed=trainer.cfg.seed)

    def dir_of(self, k):
        return "unified"

    def load_one(self, run_dir, K, k, device="cpu", shared=None):
        return _shared_model(shared, _vae_dir(run_dir, "unified"), device,
                             lambda d: ConvVAE.load(d, "VAE", device))


class ClusterView(torch.nn.Module):
    """The shared LoRA VAE seen through one cluster's adapter."""

    def __init__(self, vae: LoRAVAE, k: int):
        super().__init__()
        self.vae, self.k = vae, k

    def encode(self, x):
        return self.vae.set_cluster(self.k).encode(x)

    def decode(self, z):
        return self.vae.set_cluster(self.k).decode(z)


class LoRA(VAELayout):
    """Three phases: the backbone on all images (RUN/vae/backbone); then adapter k on cluster k's images with
    everything else frozen, one task per cluster (`lora_steps` each), each finished adapter kept in
    RUN/vae/lora-adapters/<k>.safetensors; then the adapters assembled into RUN/vae/lora."""

    name = "lora"
    description = "a shared backbone with one LoRA adapter (peft) per cluster"

    def dirs(self, K):
        return ["backbone", "lora"]

    def parts(self, K):
        return [p for phase in self.phases(K) for p in phase]

    def phases(self, K):
        return [["backbone"], [f"adapter-{k}" for k in range(K)], ["lora"]]

    def part_done(self, run_dir, part):
        vae = Path(run_dir) / "vae"
        if part.startswith("adapter-"):
            return is_saved(vae / "lora") or (vae / "lora-adapters" / f"{part[8:]}.safetensors").is_file()
        return super().part_done(run_dir, part)

    def train(self, part, trainer):
        """"backbone", "adapter-<k>" or "lora" (which also trains whatever of the two before it is missing)."""
        c, out = trainer.cfg, trainer.out / "vae"
        trainer.fit_vae("backbone", _new_vae(trainer, c.seed), trainer.images, seed=c.seed)
        if part == "backbone" or is_saved(out / "lora"):
            return
        vae = LoRAVAE(trainer.image_shape, c.latent, c.vae_width, c.vae_beta, seed=c.seed, clusters=trainer.K,
                      rank=c.lora_rank, blocks=c.vae_blocks, recon=c.vae_recon)
        vae.load_state_dict(_lora_state_from(ConvVAE.load(out / "backbone", "VAE backbone"), vae), strict=True)
        todo = [int(part[8:])] if part.startswith("adapter-") else range(trainer.K)
        for k in todo:
            path = out / "lora-adapters" / f"{k}.safetensors"
            if not path.is_file():
                self._train_adapter(vae, k, path, trainer)
        if part == "lora":
            for k in range(trainer.K):
                vae.load_state_dict(read_safetensors(out / "lora-adapters" / f"{k}.safetensors",
                                                     f"LoRA adapter of cluster {k}"), strict=False)
            vae.set_cluster(0)
            vae.save(out / "lora")

    @staticmethod
    def _train_adapter(vae: LoRAVAE, k: int, path: Path, trainer) -> None:
        c = trainer.cfg
        vae.set_cluster(k)
        for p in vae.parameters():
            p.requires_grad_(False)
        params = vae.adapter_parameters(k)
        for p in params:
            p.requires_grad_(True)
        trainer.fit_vae(None, vae, trainer.cluster_images(k), seed=c.seed + 1 + k, params=params,
                        task=f"vae-lora-{k}", steps=c.lora_steps)
        state = {n: p.detach().contiguous().cpu() for n, p in vae.state_dict().items() if f".{vae.adapter(k)}." in n}
        atomic_write(path, lambda p, s=state: save_file(s, p))

    def dir_of(self, k):
        return "lora"

    def load_one(self, run_dir, K, k, device="cpu", shared=None):
        def load(d):
            vae = LoRAVAE.load(d, "LoRA VAE", device)
            if vae.clusters != K:
                raise ArtefactError(f"{d} has {vae.clusters} adapters but the run has {K} clusters")
            return vae

        return ClusterView(_shared_model(shared, _vae_dir(run_dir, "lora"), device, load), k)


def _vae_dir(run_dir, name: str) -> Path:
    d = Path(run_dir) / "vae" / name
    if not is_saved(d):
        raise MolrmogError(f"VAE {d} is missing; continue the run with --resume {run_dir}")
    return d


def _shared_model(shared: dict | None, d: Path, device, load):
    """`load(d)`, once per version of its weights file in `shared` (a caller's dict; None: no sharing)."""
    if shared is None:
        return load(d)
    st = (d / WEIGHTS).stat()
    key = (str(d), str(device), st.st_ino, st.st_mtime_ns, st.st_size)
    if key not in shared:
        shared[key] = load(d)
    return shared[key]


def _lora_state_from(backbone: ConvVAE, lora: LoRAVAE) -> dict:
    """The LoRA VAE's state with the backbone's weights (peft moves adapted layers under `.base_layer`)."""
    state = lora.state_dict()
    src = backbone.state_dict()
    for key in state:
        plain = key.replace(".base_layer.", ".")
        if ".lora_" not in key and plain in src:
            state[key] = src[plain]
    return state


LAYOUTS: Registry[VAELayout] = Registry("VAE layout")
for _layout in (Dedicated(), Unified(), LoRA()):
    LAYOUTS.register(_layout.name, _layout)


def get_layout(name: str) -> VAELayout:
    return LAYOUTS.get(name)
