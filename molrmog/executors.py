"""Where independent tasks run: in this process, in a local process pool, or as Ray tasks.

The mixture-of-experts structure makes the work embarrassingly parallel: every cluster's VAE,
every (expert kind, cluster) pair and every point of a theory sweep is a `Task` -- a module-level
function with its arguments, which reads what it needs from disk and writes its result
(checkpoint, model) to disk or returns a small picklable value. Seeds belong to the task, so the
weights do not depend on the executor:

    local, --workers 1   sequential, in this process (default)
    local, --workers N   concurrent.futures.ProcessPoolExecutor (spawn), N processes
    ray                  one Ray task per Task (num_cpus=1, num_gpus=1 with --device cuda);
                         --ray-address joins a running cluster, else a local runtime with
                         --workers CPUs is started. `pip install molrmog[ray]`.

Every task runs with the same number of intra-op threads, max(1, cpus // workers), set inside
the task, so a given --workers gives bit-identical weights under either executor. A failing task
is retried once (Ray: `max_retries` / `retry_exceptions`; local: resubmitted) -- except on bad
input (ValueError), which is deterministic and raised as a ValueError naming the task; tasks that
fail twice are reported by name in `TasksFailed` after every other task has finished, so their
checkpoints and results stay and `--resume` skips them.

Testing hook: MOLRMOG_FAIL_TASK=<task name> makes that task die once (MOLRMOG_FAIL_MODE=once,
the default, with the marker file MOLRMOG_FAIL_MARKER recording the first death) or on every
attempt (MOLRMOG_FAIL_MODE=always). On Ray the worker process is killed (os._exit), as a lost
node would; locally the task raises.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

__all__ = ["Task", "Executor", "TasksFailed", "run_tasks", "EXECUTORS"]

EXECUTORS = ("local", "ray")
FAULT_VARS = ("MOLRMOG_FAIL_TASK", "MOLRMOG_FAIL_MODE", "MOLRMOG_FAIL_MARKER")


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
            raise ValueError(f"unknown --executor {self.kind!r}; choose local or ray")
        if int(self.workers) < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.kind == "ray":
            _import_ray()

    @property
    def threads(self) -> int:
        return max(1, (os.cpu_count() or 1) // int(self.workers))

    @property
    def parallel(self) -> bool:
        return self.kind == "ray" or self.workers > 1


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray, which is an optional extra: pip install 'molrmog[ray]' "
                         "(or pip install ray); use --executor local otherwise") from None
    return ray


def _fault_spec() -> dict:
    return {k: os.environ[k] for k in FAULT_VARS if k in os.environ}


def _maybe_fail(name: str, spec: dict, hard: bool) -> None:
    if spec.get("MOLRMOG_FAIL_TASK") != name:
        return
    if spec.get("MOLRMOG_FAIL_MODE", "once") == "once":
        marker = spec.get("MOLRMOG_FAIL_MARKER")
        if not marker:
            raise ValueError("MOLRMOG_FAIL_MODE=once needs MOLRMOG_FAIL_MARKER (a file path)")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # died once already: run normally
        os.close(fd)
    if hard:
        os._exit(17)  # the worker process dies mid-task, as on a lost node
    raise RuntimeError(f"injected failure of task {name} (MOLRMOG_FAIL_TASK)")


class _BadInput(NamedTuple):
    """A task stopped on bad input (ValueError): deterministic, so it is reported, not retried."""

    message: str


def _invoke(name: str, fn: Callable, args: tuple, kwargs: dict, threads: int, spec: dict, hard: bool):
    torch.set_num_threads(threads)
    _maybe_fail(name, spec, hard)
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        return _BadInput(str(e))


def run_tasks(tasks: list[Task], ex: Executor | None = None, *, progress: bool = True,
              desc: str = "tasks") -> dict[str, Any]:
    """Run every task; returns {name: result}. Raises `TasksFailed` once all have been tried."""
    ex = ex or Executor()
    if not tasks:
        return {}
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    spec = _fault_spec()
    if ex.kind == "ray":
        results, failures = _run_ray(tasks, ex, spec, progress, desc)
    elif ex.workers > 1:
        results, failures = _run_pool(tasks, ex, spec, progress, desc)
    else:
        results, failures = _run_here(tasks, ex, spec, progress, desc)
    bad = {k: v.message for k, v in results.items() if isinstance(v, _BadInput)}
    if bad:  # bad input: the CLI's one-line error, exit 2 (finished tasks are kept all the same)
        raise ValueError("; ".join(f"{k}: {v}" for k, v in bad.items()))
    if failures:
        raise TasksFailed(failures, results)
    return results


def _run_here(tasks, ex, spec, progress, desc):
    results, failures = {}, {}
    old = torch.get_num_threads()
    try:
        for t in tqdm(tasks, desc=desc, disable=not progress or len(tasks) < 2, leave=False):
            for attempt in range(ex.retries + 1):
                try:
                    results[t.name] = _invoke(t.name, t.fn, t.args, t.kwargs, ex.threads, spec, False)
                    break
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - retried, then reported by task name
                    if attempt == ex.retries:
                        failures[t.name] = f"{type(e).__name__}: {e}"
    finally:
        torch.set_num_threads(old)
    return results, failures


def _run_pool(tasks, ex, spec, progress, desc):
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    results, failures = {}, {}
    by_name = {t.name: t for t in tasks}
    attempts = dict.fromkeys(by_name, 0)
    with ProcessPoolExecutor(max_workers=ex.workers, mp_context=mp.get_context("spawn")) as pool:
        def submit(t):
            attempts[t.name] += 1
            return pool.submit(_invoke, t.name, t.fn, t.args, t.kwargs, ex.threads, spec, False)

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
    return results, failures


def _run_ray(tasks, ex, spec, progress, desc):
    ray = _import_ray()
    if not ray.is_initialized():
        kw = {"address": ex.ray_address} if ex.ray_address else {"num_cpus": int(ex.workers)}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kw)
    gpus = 1 if str(ex.device).startswith("cuda") else 0
    remote = ray.remote(_invoke).options(num_cpus=1, num_gpus=gpus, max_retries=ex.retries,
                                         retry_exceptions=True)
    refs = {remote.remote(t.name, t.fn, t.args, t.kwargs, ex.threads, spec, True): t.name for t in tasks}
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
