"""The one training loop (`fit`) and denoising score matching on data (`train_score`).

Checkpoints are one safetensors file, written atomically: model, EMA and optimiser tensors, the
loop's generator and the global CPU RNG state (dropout), and the losses. A stopped run resumes
bit-for-bit. Only a state that passed the divergence check is ever written:

    at every checkpoint boundary (and every CHECK_EVERY steps without checkpoints), and at the end,
    the losses of the window since the last check must be finite, the parameters finite, and the
    median of the last 10 losses at most EXPLOSION_FACTOR x the smaller of the median of the 200
    losses before them and the first loss (the untrained model's).

Otherwise `TrainingDiverged` names the task, the step and the checkpoint that is kept (the last
good one). Losses stay on the device between checks: no host synchronisation per step.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from molrmog.core.artefacts import atomic_write
from molrmog.core.errors import ArtefactError, MolrmogError, NumericalError, TrainingDiverged
from molrmog.core.losses import T_DISTRIBUTIONS, dsm_loss
from molrmog.training.threads import Threads

__all__ = ["TrainingDiverged", "fit", "train_score", "check_train_args", "save_checkpoint", "load_checkpoint",
           "CHECKPOINT", "EXPLOSION_FACTOR", "CHECK_EVERY", "LR_SCHEDULES"]

log = logging.getLogger(__name__)
LR_SCHEDULES = ("constant", "cosine")  # fit's learning-rate schedules (the VAEs' and every expert kind's choices)

CHECKPOINT = "checkpoint.safetensors"
EXPLOSION_FACTOR = 100.0  # recent median loss / running median beyond which training has diverged
CHECK_EVERY = 50  # steps between divergence checks when no checkpoints are written
_RECENT, _HISTORY = 10, 200


def check_train_args(data: Tensor, steps: int, batch_size: int, lr: float, optimizer: str, t_dist: str,
                     ema_decay: float | None) -> None:
    if not isinstance(data, Tensor) or data.ndim != 2:
        raise MolrmogError(f"training data must be a (N, D) tensor, got {getattr(data, 'shape', type(data))}")
    if data.shape[0] == 0:
        raise MolrmogError("training data is empty (N = 0); give at least one sample")
    if not torch.isfinite(data).all():
        raise MolrmogError("training data contains NaN or Inf; clean it first")
    if int(steps) < 0 or int(batch_size) < 1:
        raise MolrmogError(f"steps must be >= 0 and batch_size >= 1, got {steps} and {batch_size}")
    if not (lr > 0 and math.isfinite(lr)):
        raise MolrmogError(f"learning rate must be a positive number, got {lr}")
    if optimizer not in ("adam", "adamw", "sgd"):
        raise MolrmogError(f"optimizer must be adam, adamw or sgd, got {optimizer!r}")
    if t_dist not in T_DISTRIBUTIONS:
        raise MolrmogError(f"t distribution must be one of {T_DISTRIBUTIONS}, got {t_dist!r}")
    if ema_decay is not None and not 0 <= ema_decay < 1:
        raise MolrmogError(f"ema_decay must lie in [0, 1), got {ema_decay}")


def save_checkpoint(path: Path, model, opt, ema, gen: torch.Generator, step: int, losses: list[float],
                    extra: dict | None = None) -> None:
    """One file, written atomically: model/EMA/optimizer tensors, RNG states, and the scalars as metadata."""
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
    tensors["rng_global"] = torch.get_rng_state()
    meta = {"step": step, "losses": losses, "opt_scalars": scalars, "param_groups": osd["param_groups"],
            "extra": extra or {}}
    atomic_write(path, lambda p: save_file(tensors, p, metadata={"state": json.dumps(meta)}))


def load_checkpoint(path: Path, model, opt, ema, gen: torch.Generator) -> tuple[int, list[float], dict]:
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # only finite states are ever written: this one was edited or damaged
            raise ValueError(f"tensor(s) {bad[:3]} hold NaN or Inf")
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
        if "rng_global" in tensors:
            torch.set_rng_state(tensors["rng_global"])
    except ArtefactError:
        raise
    except Exception as e:  # noqa: BLE001 - any damage is reported with the file name
        raise ArtefactError(f"checkpoint {path} is corrupt or does not match this model ({type(e).__name__}: {e}); "
                            f"delete it to start this stage again") from e
    return int(meta["step"]), list(meta["losses"]), dict(meta.get("extra", {}))


def _divergence(losses: list[float], new: list[float], first_step: int) -> str | None:
    """Why the window `new` (steps first_step...) is not good, or None."""
    for i, v in enumerate(new):
        if not math.isfinite(v):
            return f"the loss became {v} at step {first_step + i}"
    every = losses + new
    for i in range(len(new)):
        end = len(losses) + i + 1
        if end < _RECENT:
            continue
        recent = sorted(every[end - _RECENT:end])[_RECENT // 2]
        hist = sorted(every[max(0, end - _RECENT - _HISTORY):max(1, end - _RECENT)])
        ref = min(hist[len(hist) // 2], every[0])  # the running median, or the untrained model's loss
        if ref > 0 and recent > EXPLOSION_FACTOR * ref:
            return (f"the loss exploded at step {first_step + i}: its recent median {recent:.4g} is more than "
                    f"{EXPLOSION_FACTOR:g}x the reference {ref:.4g} (the running median or the first loss)")
    return None


def _params_finite(model) -> bool:
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def fit(model, loss_fn, *, steps: int, lr: float, optimizer: str = "adam", weight_decay: float = 0.0,
        ema_decay: float | None = None, seed: int = 0, lr_schedule: str = "constant", progress: bool = True,
        desc: str = "train", checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
        params=None, global_seed: int | None = None, time_budget: float | None = None,
        snapshot_times: tuple[float, ...] = (), on_snapshot=None, time_offset: float = 0.0,
        threads: int | Threads | None = None, clock: Callable[[], float] = time.perf_counter) -> dict:
    """The one training loop: `loss_fn(model, generator) -> loss`, Adam/AdamW/SGD, optional EMA and
    cosine LR. With `checkpoint_dir`, a checkpoint is written atomically every `checkpoint_every`
    steps and at the end, and an existing one is resumed: the run continues bit-for-bit as if it had
    never stopped. Divergence (module docstring) raises `TrainingDiverged` and keeps the last good
    checkpoint. `params` (default: every parameter that requires grad) are the ones optimised.
    The global CPU RNG (dropout, an SMD model's latent draws) is forked: the caller's state is left as
    it was; `global_seed` seeds the fork at a fresh start (a resume restores its saved state).

    `time_budget` (seconds; `steps` is then a cap) stops training when the elapsed time -- `time_offset`
    (work done before, e.g. a closed-form start) plus the loop's wall clock, carried across resumes in the
    checkpoint -- reaches it; the cosine schedule then follows the elapsed fraction. Whenever the elapsed
    time passes one of `snapshot_times` (ascending), `on_snapshot(index, step, elapsed, model)` receives the
    weights in use (the EMA ones with EMA) after a divergence check; snapshots left at the end are given the
    final weights. A resumed run does not repeat the snapshots it already took.

    `threads` (default: torch's current setting, untouched): an intra-op thread count, or a `molrmog.training.threads.
    Threads` that chooses one at the start and again at every checkpoint from the load other processes put on
    the machine. The count in force is recorded in each checkpoint and a resumed run continues with it (the
    count changes float rounding, so this keeps resume bit for bit); the caller's setting is restored on
    return. `clock` (seconds, monotonic) is what the budget and the timings read: injectable (tests)."""
    if snapshot_times and list(snapshot_times) != sorted(snapshot_times):
        raise MolrmogError("snapshot_times must be ascending")
    if lr_schedule not in LR_SCHEDULES:
        raise MolrmogError(f"lr_schedule must be constant or cosine, got {lr_schedule!r}")
    caller_threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            if global_seed is not None:
                torch.manual_seed(global_seed)
            return _fit(model, loss_fn, steps=int(steps), lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                        ema_decay=ema_decay or None, seed=seed, lr_schedule=lr_schedule, progress=progress, desc=desc,
                        checkpoint_dir=checkpoint_dir, checkpoint_every=int(checkpoint_every or 0), params=params,
                        time_budget=time_budget, snapshot_times=tuple(snapshot_times), on_snapshot=on_snapshot,
                        time_offset=time_offset, threads=threads, clock=clock)
    finally:
        torch.set_num_threads(caller_threads)


def _diverged(desc: str, why: str, ckpt, last_good: int, lr: float) -> TrainingDiverged:
    if ckpt is None:
        kept = "nothing was saved"
    elif last_good:
        kept = f"the last good checkpoint (step {last_good}) stays in {ckpt}"
    else:
        kept = f"no checkpoint was good enough to keep ({ckpt} was not written)"
    return TrainingDiverged(f"{desc}: {why}; {kept}. Lower the learning rate (now {lr:g}) or check the data, "
                            f"then train again")


def _check_window(model, losses: list, window: list, step_end: int) -> str | None:
    """Why training diverged in the window of losses since the last check (None: it did not); a good window
    joins `losses` and is emptied."""
    new = torch.stack(window).double().cpu().tolist() if window else []
    why = _divergence(losses, new, step_end - len(new))
    if why is None and not _params_finite(model):
        why = f"the parameters stopped being finite by step {step_end}"
    if why is None:
        losses.extend(new)
        window.clear()
    return why


def _optimiser(model, params, optimizer: str, lr: float, weight_decay: float, ema_decay: float):
    """(optimiser, EMA copy or None, (EMA params, model params) or None)."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    # foreach: one kernel per op over all parameters (torch's default on CPU is a per-parameter loop;
    # the results are bit-identical, the small models here train up to 25% faster)
    opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer](
        params, lr=lr, weight_decay=weight_decay, foreach=True)
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
    ema_pairs = None if ema is None else list(zip(*[(pe, pm) for pe, pm in zip(ema.parameters(), model.parameters(),
                                                                               strict=True)], strict=True))
    return opt, ema, ema_pairs


def _first_threads(extra: dict, governor, threads) -> int:
    """The intra-op threads of the first window: a resume continues with the count its checkpoint recorded."""
    if "threads" in extra:
        return int(extra["threads"])
    if governor is not None:
        return governor.start()
    return int(threads or torch.get_num_threads())


def _cosine_lr(opt, lr: float, frac: float) -> None:
    for group in opt.param_groups:
        group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * frac))


def _train_step(model, loss_fn, gen, opt, ema_pairs, ema_decay: float) -> Tensor:
    """One optimiser step (and the EMA update); returns the loss."""
    loss = loss_fn(model, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if ema_pairs is not None:
        with torch.no_grad():
            torch._foreach_lerp_(list(ema_pairs[0]), list(ema_pairs[1]), 1 - ema_decay)
    return loss


def _fit(model, loss_fn, *, steps, lr, optimizer, weight_decay, ema_decay, seed, lr_schedule, progress, desc,
         checkpoint_dir, checkpoint_every, params, time_budget, snapshot_times, on_snapshot, time_offset, threads,
         clock):
    device = next(iter(model.parameters()), torch.empty(0)).device
    gen = torch.Generator(device=device).manual_seed(seed)  # random numbers where training runs
    opt, ema, ema_pairs = _optimiser(model, params, optimizer, lr, weight_decay, ema_decay)
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    start, losses, extra = 0, [], {}
    if ckpt is not None and ckpt.exists():  # a folder or other damage there is refused, naming the path
        start, losses, extra = load_checkpoint(ckpt, model, opt, ema, gen)
    elapsed0, snaps = float(extra.get("elapsed", time_offset)), int(extra.get("snapshots", 0))
    governor = threads if isinstance(threads, Threads) else None
    n_threads = _first_threads(extra, governor, threads)
    torch.set_num_threads(n_threads)
    every = checkpoint_every if ckpt is not None and checkpoint_every else CHECK_EVERY
    last_good = start
    window: list[Tensor] = []
    t0 = clock()
    cuda = device.type == "cuda"

    def elapsed() -> float:
        if cuda:
            torch.cuda.synchronize(device)  # (a timed run waits for its kernels)
        return elapsed0 + clock() - t0

    bar = tqdm(total=None if time_budget else steps, initial=start, desc=desc, disable=not progress, leave=False)

    def diverged(why: str) -> TrainingDiverged:
        return _diverged(desc, why, ckpt, last_good, lr)

    def check(step_end: int) -> None:
        why = _check_window(model, losses, window, step_end)
        if why is not None:
            raise diverged(why)

    def snapshot(step: int, now: float) -> None:
        nonlocal snaps
        check(step)
        on_snapshot(snaps, step, now, ema if ema is not None else model)
        snaps += 1

    step = start
    while step < steps:
        now = elapsed() if time_budget is not None or snapshot_times else 0.0
        while snaps < len(snapshot_times) and now >= snapshot_times[snaps]:
            snapshot(step, now)
        if time_budget is not None and now >= time_budget:
            break
        if lr_schedule == "cosine":  # closed form (of the step, or of the elapsed fraction): no scheduler state
            _cosine_lr(opt, lr, min(now / time_budget, 1.0) if time_budget else step / steps)
        try:
            loss = _train_step(model, loss_fn, gen, opt, ema_pairs, ema_decay)
        except NumericalError as e:  # the model's own parameters broke the closed form: divergence
            raise diverged(f"the closed-form maths broke down at step {step} ({e})") from None
        window.append(loss.detach())
        step += 1
        bar.update()
        if progress and step % 20 == 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % every == 0:
            check(step)
            if governor is not None:  # the count for the next window, recorded with the checkpoint
                n_threads = governor.next()
                torch.set_num_threads(n_threads)
            if ckpt is not None:
                save_checkpoint(ckpt, model, opt, ema, gen, step, losses,
                                {"elapsed": elapsed(), "snapshots": snaps, "threads": n_threads})
                last_good = step  # noqa: F841 (read by diverged())
    bar.close()
    check(step)
    while snaps < len(snapshot_times):  # points the loop did not reach (the budget's end, a step cap)
        snapshot(step, elapsed())
    if ckpt is not None and last_good != step:
        save_checkpoint(ckpt, model, opt, ema, gen, step, losses,
                        {"elapsed": elapsed(), "snapshots": snaps, "threads": n_threads})
    if ema is not None:
        model.load_state_dict(ema.state_dict())
    seconds = clock() - t0
    log.debug("%s: %d steps in %.1f s", desc, step - start, seconds)
    return {"loss": losses, "seconds": seconds, "steps": step, "elapsed": elapsed0 + seconds}


def _width(model) -> int | None:
    """The dimension a score model takes (its D or d, a latent expert's standardisation size), if it says."""
    for name in ("D", "d"):
        v = getattr(model, name, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    shift = getattr(model, "shift", None)
    return int(shift.numel()) if isinstance(shift, Tensor) else None


def train_score(model, data: Tensor, *, steps: int = 1000, batch_size: int = 256, lr: float = 1e-2,
                optimizer: str = "adam", weight_decay: float = 0.0, ema_decay: float | None = None,
                seed: int = 0, t_dist: str = "uniform", t_min: float | None = None,
                t_max: float | None = None, progress: bool = True, checkpoint_dir: str | Path | None = None,
                checkpoint_every: int = 0, desc: str = "train", lr_schedule: str = "constant", **budget) -> dict:
    """Denoising score matching on `data` (N, D) with `fit`; returns the loss history and timing. `budget`:
    fit's time_budget, snapshot_times, on_snapshot, time_offset, threads, clock."""
    check_train_args(data, steps, batch_size, lr, optimizer, t_dist, ema_decay)
    width = _width(model)
    if width is not None and data.shape[1] != width:
        raise MolrmogError(f"training data has {data.shape[1]} columns but the model scores {width}-dim points; "
                           f"give data of shape (N, {width})")
    data = data.to(next(model.parameters()).dtype)
    N = data.shape[0]

    def loss_fn(m, gen):
        idx = torch.randint(0, N, (batch_size,), generator=gen, device=gen.device)  # with replacement
        return dsm_loss(m, data[idx.to(data.device)], m.schedule, generator=gen, t_dist=t_dist, t_min=t_min,
                        t_max=t_max)

    return fit(model, loss_fn, steps=steps, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
               ema_decay=ema_decay, seed=seed, lr_schedule=lr_schedule, progress=progress, desc=desc,
               checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, global_seed=seed, **budget)
