"""Where independent tasks run: in this process, in a local process pool, or as Ray tasks.

The mixture-of-experts structure makes the work embarrassingly parallel: every cluster's VAE,
every (expert kind, cluster) pair and every point of a theory sweep is a `Task` -- a module-level
function with its arguments, which reads what it needs from disk and writes its result
(checkpoint, model) to disk or returns a small picklable value. Seeds belong to the task, so the
weights do not depend on the executor:

    local, --workers 1   sequential, in this process (default)
    local, --workers N   concurrent.futures.ProcessPoolExecutor (spawn), N processes, started once per
                         process and reused by every later call (with `molrmog.pipeline.run.Run.open`, a worker
                         reads a run's data and each VAE once however many tasks it runs)
    ray                  one Ray task per Task (num_cpus=1, num_gpus=1 with --device cuda);
                         --ray-address joins a running cluster, else a local runtime with
                         --workers CPUs is started. `pip install molrmog[ray]`.

Every task of a call runs with the same number of intra-op threads, set inside the task: max(1, cpus //
workers), or, for a call whose caller declares it `width` tasks wide (a phase of fewer tasks than workers,
e.g. one VAE backbone), max(1, cpus // min(workers, width)), so no CPU idles while one task trains. The count
depends only on the machine, --workers and the declared width (not on how many tasks are left after a
resume), so a given --workers gives bit-identical weights under either executor. A failing task
is retried once (Ray: `max_retries` / `retry_exceptions`; local: resubmitted) -- except on bad
input (`MolrmogError`), which is deterministic and raised again naming the task; tasks that fail
twice are reported by name in `TasksFailed` after every other task has finished, so their
checkpoints and results stay and `--resume` skips them. Divergence (`TrainingDiverged`) is not
retried either: the same seed diverges again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from molrmog.core.errors import MolrmogError, TrainingDiverged
from molrmog.training.threads import ENV, fixed_threads, usable_cpus

__all__ = ["Task", "Executor", "TasksFailed", "run_tasks", "EXECUTORS"]

log = logging.getLogger(__name__)
EXECUTORS = ("local", "ray")


@dataclass
class Task:
    name: str
    fn: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


class TasksFailed(RuntimeError):
    """Some tasks failed twice; `failures` maps task name -> error text, `results` holds the rest."""

    def __init__(self, failures: dict[str, str], results: dict[str, Any]):
        self.failures, self.results = failures, results
        names = ", ".join(failures)
        first = next(iter(failures.values())).strip().splitlines()[-1][:300]
        super().__init__(f"{len(failures)} task(s) failed after a retry: {names} (first error: {first}); "
                         f"{len(results)} finished task(s) are kept -- fix the cause and rerun with --resume")


@dataclass
class Executor:
    kind: str = "local"
    workers: int = 1
    ray_address: str | None = None
    device: str = "cpu"
    retries: int = 1

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise MolrmogError(f"executor {self.kind!r} is unknown; choose local or ray", param="executor")
        if int(self.workers) < 1:
            raise MolrmogError(f"workers must be >= 1, got {self.workers}", param="workers")
        if self.kind == "ray":
            _import_ray()
        fixed, cpus = fixed_threads(), usable_cpus()
        if self.kind == "local" and fixed and fixed * int(self.workers) > cpus:
            log.warning("%s=%d with --workers %d asks for %d threads on %d CPUs: the workers' threads will wait for "
                        "each other, several-fold slower; set %s=%d or unset it", ENV, fixed, self.workers,
                        fixed * int(self.workers), cpus, ENV, max(1, cpus // int(self.workers)))

    @property
    def threads(self) -> int:
        return self.threads_for(None)

    def threads_for(self, width: int | None) -> int:
        """Intra-op threads per task of a call that runs `width` tasks side by side (None: `workers`)."""
        n = int(self.workers) if width is None else max(1, min(int(self.workers), int(width)))
        return max(1, (os.cpu_count() or 1) // n)

    @property
    def parallel(self) -> bool:
        return self.kind == "ray" or self.workers > 1


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MolrmogError("--executor ray needs Ray, which is an optional extra: pip install 'molrmog[ray]' "
                         "(or pip install ray); use --executor local otherwise") from None
    return ray


class _Final(NamedTuple):
    """A task stopped on bad input or diverged: deterministic, so it is reported, not retried."""

    kind: str  # "input" or "diverged"
    message: str


def _invoke(name: str, fn: Callable, args: tuple, kwargs: dict, threads: int):
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
    except MolrmogError as e:
        return _Final("input", str(e))
    except TrainingDiverged as e:
        return _Final("diverged", str(e))
    log.debug("task %s done in %.1f s", name, time.perf_counter() - t0)
    return result


def run_tasks(tasks: list[Task], ex: Executor | None = None, *, progress: bool = True,
              desc: str = "tasks", width: int | None = None) -> dict[str, Any]:
    """Run every task; returns {name: result}. Raises `TasksFailed` once all have been tried. `width`: how many
    tasks the caller's unit of work has in all (a resume may pass fewer), when fewer than the workers: each
    task then gets the threads of the idle workers (module docstring)."""
    ex = ex or Executor()
    if not tasks:
        return {}
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise MolrmogError(f"task names must be unique, got {names}")
    threads = ex.threads_for(width)
    if ex.kind == "ray":
        results, failures = _run_ray(tasks, ex, progress, desc, threads)
    elif ex.workers > 1:
        results, failures = _run_pool(tasks, ex, progress, desc, threads)
    else:
        results, failures = _run_here(tasks, ex, progress, desc, threads)
    final = {k: v for k, v in results.items() if isinstance(v, _Final)}
    bad = {k: v.message for k, v in final.items() if v.kind == "input"}
    if bad:  # bad input: the CLI's one-line error, exit 2 (finished tasks are kept all the same)
        raise MolrmogError("; ".join(f"{k}: {v}" for k, v in bad.items()))
    diverged = [v.message for v in final.values() if v.kind == "diverged"]
    if diverged:
        raise TrainingDiverged("; ".join(diverged))
    if failures:
        raise TasksFailed(failures, results)
    return results


def _run_here(tasks, ex, progress, desc, threads):
    results, failures = {}, {}
    old = torch.get_num_threads()
    try:
        for t in tqdm(tasks, desc=desc, disable=not progress or len(tasks) < 2, leave=False):
            for attempt in range(ex.retries + 1):
                try:
                    results[t.name] = _invoke(t.name, t.fn, t.args, t.kwargs, threads)
                    break
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - retried, then reported by task name
                    if attempt == ex.retries:
                        failures[t.name] = f"{type(e).__name__}: {e}"
    finally:
        torch.set_num_threads(old)
    return results, failures


_WORKER_ENV = ("MOLRMOG_", "OMP_", "MKL_", "CUDA_", "TORCH", "HF_", "HOME", "XDG_", "TMPDIR", "PYTHON")
_POOLS: dict = {}  # workers -> (this process's pool, where it started): spawned once, reused by later calls


def _pool(workers: int):
    """The process pool of `workers` processes, started once per process (spawning a worker imports torch: a few
    seconds each) and reused by later calls; a broken pool (a worker that died) is replaced."""
    import atexit
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # a worker keeps the working folder and environment it was started with: a pool started under others is
    # not reused (relative paths, $MOLRMOG_DATA, $MOLRMOG_THREADS read in the worker mean what they mean here)
    key = (os.getcwd(), tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_WORKER_ENV))))
    pool, started = _POOLS.get(workers, (None, None))
    if pool is None or started != key or getattr(pool, "_broken", False):
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if not _POOLS:
            atexit.register(_close_pools)
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        _POOLS[workers] = (pool, key)
    return pool


def _close_pools(cancel: bool = False) -> None:
    for pool, _ in _POOLS.values():
        pool.shutdown(wait=not cancel, cancel_futures=True)
    _POOLS.clear()


def _run_pool(tasks, ex, progress, desc, threads):
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    results, failures = {}, {}
    by_name = {t.name: t for t in tasks}
    attempts = dict.fromkeys(by_name, 0)

    def submit(t):
        attempts[t.name] += 1
        try:
            return _pool(ex.workers).submit(_invoke, t.name, t.fn, t.args, t.kwargs, threads)
        except BrokenProcessPool:  # a worker died since the pool was checked: a new pool
            _POOLS.pop(ex.workers, None)
            return _pool(ex.workers).submit(_invoke, t.name, t.fn, t.args, t.kwargs, threads)

    try:
        pending = {submit(t): t.name for t in tasks}
        bar = tqdm(total=len(tasks), desc=desc, disable=not progress, leave=False)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                name = pending.pop(fut)
                try:
                    results[name] = fut.result()
                    bar.update()
                except Exception as e:  # noqa: BLE001
                    if attempts[name] <= ex.retries:
                        pending[submit(by_name[name])] = name
                    else:
                        failures[name] = f"{type(e).__name__}: {e}"
                        bar.update()
        bar.close()
    except BaseException:  # interrupted: the workers stop with this call, not later
        _close_pools(cancel=True)
        raise
    return results, failures


def _run_ray(tasks, ex, progress, desc, threads):
    ray = _import_ray()
    if not ray.is_initialized():
        kw = {"address": ex.ray_address} if ex.ray_address else {"num_cpus": int(ex.workers)}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kw)
    gpus = 1 if str(ex.device).startswith("cuda") else 0
    remote = ray.remote(_invoke).options(num_cpus=1, num_gpus=gpus, max_retries=ex.retries,
                                         retry_exceptions=True)
    refs = {remote.remote(t.name, t.fn, t.args, t.kwargs, threads): t.name for t in tasks}
    results, failures = {}, {}
    bar = tqdm(total=len(tasks), desc=desc, disable=not progress, leave=False)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            name = refs[ref]
            try:
                results[name] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - RayTaskError, WorkerCrashedError after the retry
                failures[name] = f"{type(e).__name__}: {e}"
            bar.update()
    bar.close()
    return results, failures
