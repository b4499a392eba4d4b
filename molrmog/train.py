"""Training loops for score models: DSM with Adam/AdamW, optional EMA, seeds, safe checkpoints."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from .io import atomic_write
from .losses import T_DISTRIBUTIONS, dsm_loss

__all__ = ["TrainingDiverged", "fit", "train_score", "check_train_args", "save_checkpoint", "load_checkpoint"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint (if any) is kept."""


def check_train_args(data: Tensor, steps: int, batch_size: int, lr: float, optimizer: str, t_dist: str,
                     ema_decay: float | None) -> None:
    if not isinstance(data, Tensor) or data.ndim != 2:
        raise ValueError(f"training data must be a (N, D) tensor, got {getattr(data, 'shape', type(data))}")
    if data.shape[0] == 0:
        raise ValueError("training data is empty (N = 0); give at least one sample")
    if not torch.isfinite(data).all():
        raise ValueError("training data contains NaN or Inf; clean it first")
    if int(steps) < 1 or int(batch_size) < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"learning rate must be a positive number, got {lr}")
    if optimizer not in ("adam", "adamw", "sgd"):
        raise ValueError(f"optimizer must be adam, adamw or sgd, got {optimizer!r}")
    if t_dist not in T_DISTRIBUTIONS:
        raise ValueError(f"t distribution must be one of {T_DISTRIBUTIONS}, got {t_dist!r}")
    if ema_decay is not None and not 0 < ema_decay < 1:
        raise ValueError(f"ema_decay must lie in (0, 1), got {ema_decay}")


CHECKPOINT = "checkpoint.safetensors"


def save_checkpoint(path: Path, model, opt, ema, gen: torch.Generator, step: int,
                    losses: list[float]) -> None:
    """One file, written atomically: model/EMA/optimizer tensors, RNG state, and the scalars as metadata."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().contiguous().cpu() for k, v in ema.state_dict().items()})
    osd = opt.state_dict()
    scalars = {}
    for i, st in osd["state"].items():
        for name, v in st.items():
            if isinstance(v, Tensor) and v.ndim > 0:
                tensors[f"opt.{i}.{name}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{i}.{name}"] = float(v)
    tensors["rng"] = gen.get_state()
    meta = {"step": step, "losses": losses, "opt_scalars": scalars, "param_groups": osd["param_groups"]}
    atomic_write(path, lambda p: save_file(tensors, p, metadata={"state": json.dumps(meta)}))


def load_checkpoint(path: Path, model, opt, ema, gen: torch.Generator) -> tuple[int, list[float]]:
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if ema is not None:
            ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        for key, v in meta["opt_scalars"].items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = torch.tensor(v)
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        gen.set_state(tensors["rng"])
    except Exception as e:  # noqa: BLE001 - any damage is reported with the file name
        raise ValueError(f"checkpoint {path} is corrupt or does not match this model ({e}); "
                         f"delete it to start this stage again") from e
    return int(meta["step"]), list(meta["losses"])


def fit(model, loss_fn, *, steps: int, lr: float, optimizer: str = "adam", weight_decay: float = 0.0,
        ema_decay: float | None = None, seed: int = 0, lr_schedule: str = "constant", progress: bool = True,
        desc: str = "train", checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0) -> dict:
    """The one training loop: `loss_fn(model, generator) -> loss`, Adam/AdamW/SGD, optional EMA and
    cosine LR. With `checkpoint_dir`, a checkpoint is written atomically every `checkpoint_every`
    steps and at the end, and an existing one is resumed: the run continues bit-for-bit as if it had
    never stopped. A NaN/Inf loss raises `TrainingDiverged` and leaves the last checkpoint alone."""
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be constant or cosine, got {lr_schedule!r}")
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer](
        params, lr=lr, weight_decay=weight_decay)
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    start, losses = 0, []
    if ckpt is not None and ckpt.is_file():
        start, losses = load_checkpoint(ckpt, model, opt, ema, gen)
    t0 = time.perf_counter()
    bar = tqdm(range(start, int(steps)), desc=desc, disable=not progress, leave=False,
               initial=start, total=int(steps))
    for step in bar:
        if lr_schedule == "cosine":  # closed form, so a resumed run needs no scheduler state
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / int(steps)))
        loss = loss_fn(model, gen)
        if not torch.isfinite(loss):
            where = f"; the last good checkpoint stays in {checkpoint_dir}" if checkpoint_dir else ""
            raise TrainingDiverged(
                f"{desc}: loss became {loss.item()} at step {step}{where}; lower the learning rate "
                f"(now {lr:g}) or check the data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                    pe.lerp_(pm, 1 - ema_decay)
        losses.append(loss.item())
        if progress and step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if ckpt is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            save_checkpoint(ckpt, model, opt, ema, gen, step + 1, losses)
    if ckpt is not None:
        save_checkpoint(ckpt, model, opt, ema, gen, int(steps), losses)
    if ema is not None:
        model.load_state_dict(ema.state_dict())
    return {"loss": losses, "seconds": time.perf_counter() - t0, "steps": int(steps)}


def train_score(model, data: Tensor, *, steps: int = 1000, batch_size: int = 256, lr: float = 1e-2,
                optimizer: str = "adam", weight_decay: float = 0.0, ema_decay: float | None = None,
                seed: int = 0, t_dist: str = "uniform", t_min: float | None = None,
                t_max: float | None = None, progress: bool = True, checkpoint_dir: str | Path | None = None,
                checkpoint_every: int = 0, desc: str = "train", lr_schedule: str = "constant") -> dict:
    """Denoising score matching on `data` (N, D) with `fit`; returns the loss history and timing."""
    check_train_args(data, steps, batch_size, lr, optimizer, t_dist, ema_decay)
    data = data.to(next(model.parameters()).dtype)
    N = data.shape[0]

    def loss_fn(m, gen):
        idx = torch.randint(0, N, (batch_size,), generator=gen)  # with replacement: fresh noise per draw
        return dsm_loss(m, data[idx], m.schedule, generator=gen, t_dist=t_dist, t_min=t_min, t_max=t_max)

    hist = fit(model, loss_fn, steps=steps, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
               ema_decay=ema_decay, seed=seed, lr_schedule=lr_schedule, progress=progress, desc=desc,
               checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
    if checkpoint_dir:
        model.save_pretrained(checkpoint_dir)
    return hist
