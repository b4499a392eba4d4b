"""Training loops for score models: DSM with Adam/AdamW, optional EMA, seeds, safe checkpoints."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .losses import T_DISTRIBUTIONS, dsm_loss

__all__ = ["TrainingDiverged", "train_score", "check_train_args"]


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


def train_score(model, data: Tensor, *, steps: int = 1000, batch_size: int = 256, lr: float = 1e-2,
                optimizer: str = "adam", weight_decay: float = 0.0, ema_decay: float | None = None,
                seed: int = 0, t_dist: str = "uniform", t_min: float | None = None,
                t_max: float | None = None, progress: bool = True, checkpoint_dir: str | Path | None = None,
                checkpoint_every: int = 0, desc: str = "train", lr_schedule: str = "constant") -> dict:
    """Denoising score matching on `data` (N, D). Returns the loss history and timing.

    `lr_schedule` is "constant" or "cosine" (decay to 0 over the run). With `ema_decay`, an
    exponential moving average of the weights is kept and copied into the
    model at the end. A NaN/Inf loss raises `TrainingDiverged` before any checkpoint is overwritten.
    """
    check_train_args(data, steps, batch_size, lr, optimizer, t_dist, ema_decay)
    sched = model.schedule
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer](
        params, lr=lr, weight_decay=weight_decay)
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be constant or cosine, got {lr_schedule!r}")
    sched_lr = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, int(steps))
                if lr_schedule == "cosine" else None)
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
    data = data.to(next(model.parameters()).dtype)
    N = data.shape[0]
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(int(steps)), desc=desc, disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, N, (batch_size,), generator=g)  # with replacement: fresh noise per draw
        loss = dsm_loss(model, data[idx], sched, generator=g, t_dist=t_dist, t_min=t_min, t_max=t_max)
        if not torch.isfinite(loss):
            where = f"; the last good checkpoint stays in {checkpoint_dir}" if checkpoint_dir else ""
            raise TrainingDiverged(
                f"loss became {loss.item()} at step {step}{where}; lower the learning rate "
                f"(now {lr:g}) or raise t_min")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched_lr is not None:
            sched_lr.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                    pe.lerp_(pm, 1 - ema_decay)
        losses.append(loss.item())
        if progress and step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if checkpoint_dir and checkpoint_every and (step + 1) % checkpoint_every == 0:
            model.save_pretrained(checkpoint_dir)
    if ema is not None:
        model.load_state_dict(ema.state_dict())
    if checkpoint_dir:
        model.save_pretrained(checkpoint_dir)
    return {"loss": losses, "seconds": time.perf_counter() - t0, "steps": int(steps)}
