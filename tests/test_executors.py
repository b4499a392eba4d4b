"""Executors: local (sequential / process pool) and Ray give the same results; a killed task is retried;
a task that keeps failing is reported by name and `--resume` finishes the run without redoing the rest."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from molrmog.cli import main
from molrmog.core.errors import MolrmogError
from molrmog.experiments.estimation import run_estimation
from molrmog.pipeline import stages as pipeline
from molrmog.training.executors import Executor, Task, TasksFailed, run_tasks
from tests.conftest import tiny

TINY = tiny(("mog", "gaussian"))
WEIGHTS = "diffusion_pytorch_model.safetensors"
_expert_task = pipeline.expert_task  # the real task, captured before any test replaces it


def _dies_once(marker: str, victim: str):
    """An expert task that kills its worker process the first time it runs `victim` (as a lost node would)."""
    def task(out, kind, k, progress=False):
        if f"{kind}-{k}" == victim:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os._exit(17)
            except FileExistsError:
                pass
        return _expert_task(out, kind, k, progress)
    return task


def _always_fails(victim: str):
    def task(out, kind, k, progress=False):
        if f"{kind}-{k}" == victim:
            raise RuntimeError(f"injected failure of {victim}")
        return _expert_task(out, kind, k, progress)
    return task


def _square(x):
    return x * x


def _fails_on_three(x):
    if x == 3:
        raise RuntimeError("three is bad")
    return x


def _bad_input(x, log):
    with open(log, "a") as f:
        f.write("x")
    raise MolrmogError(f"--size {x} is not a valid size")


def _dependency_error(log):
    with open(log, "a") as f:
        f.write("x")
    raise ValueError("a ValueError from inside a dependency: a bug, not bad input")


def _flaky(marker):
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return "second attempt"
    raise RuntimeError("first attempt fails")


def _weights(run: Path) -> dict:
    return {str(f.relative_to(run)): load_file(str(f))
            for f in sorted(run.glob(f"vae/*/{WEIGHTS}")) + sorted(run.glob(f"experts/*/*/{WEIGHTS}"))}


def _assert_same_weights(a: dict, b: dict, exact: bool = True):
    assert a.keys() == b.keys() and len(a) == 30
    for f in a:
        for k in a[f]:
            if exact:
                assert torch.equal(a[f][k], b[f][k]), (f, k)
            else:
                torch.testing.assert_close(a[f][k], b[f][k], rtol=1e-4, atol=1e-5)


def test_run_tasks_local_and_pool_agree_retry_and_report(tmp_path):
    tasks = [Task(f"sq-{i}", _square, (i,)) for i in range(5)]
    seq = run_tasks(tasks, Executor(), progress=False)
    assert seq == {f"sq-{i}": i * i for i in range(5)}
    assert run_tasks(tasks, Executor(workers=2), progress=False) == seq
    for ex in (Executor(), Executor(workers=2)):
        with pytest.raises(TasksFailed, match="bad-3") as err:
            run_tasks([Task(f"bad-{i}", _fails_on_three, (i,)) for i in range(5)], ex, progress=False)
        assert set(err.value.failures) == {"bad-3"} and len(err.value.results) == 4  # the rest finished
        assert "three is bad" in str(err.value) and "--resume" in str(err.value)
    # bad input (MolrmogError) is deterministic: reported naming the task, not retried; any other error
    # (a ValueError from a dependency included) is retried once and then reported as a failure
    log = tmp_path / "attempts"
    for ex in (Executor(), Executor(workers=2)):
        log.write_text("")
        with pytest.raises(MolrmogError, match="bad-1: --size 1 is not a valid size"):
            run_tasks([Task("bad-1", _bad_input, (1, str(log)))], ex, progress=False)
        assert log.read_text() == "x"
        log.write_text("")
        with pytest.raises(TasksFailed, match="a ValueError from inside a dependency"):
            run_tasks([Task("dep", _dependency_error, (str(log),))], ex, progress=False)
        assert log.read_text() == "xx"
        marker = tmp_path / f"flaky-{ex.workers}"
        assert run_tasks([Task("flaky", _flaky, (str(marker),))], ex, progress=False) == {"flaky": "second attempt"}
    with pytest.raises(ValueError, match="executor .dask. is unknown"):
        Executor("dask")
    with pytest.raises(ValueError, match="workers must be >= 1"):
        Executor(workers=0)


def _pid(i):
    return os.getpid()


def _threads():
    return torch.get_num_threads()


def test_a_call_narrower_than_the_pool_gives_its_tasks_the_idle_cpus(monkeypatch):
    # a phase of one task (a LoRA backbone, a unified VAE) on two workers: the task gets both CPUs; the count
    # follows the declared width, not the tasks left (a resumed phase trains with the threads it began with)
    cpus = os.cpu_count() or 1
    ex = Executor(workers=2)
    one = [Task("t", _threads, ())]
    assert run_tasks(one, ex, progress=False) == {"t": max(1, cpus // 2)} == {"t": ex.threads}
    assert run_tasks(one, ex, progress=False, width=1) == {"t": cpus}
    assert run_tasks(one, ex, progress=False, width=10) == {"t": max(1, cpus // 2)}
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [Executor(workers=4).threads_for(w) for w in (None, 1, 2, 3, 4, 40)] == [2, 8, 4, 2, 2, 2]
    assert Executor().threads_for(1) == Executor().threads == 8


def test_the_pool_is_started_once_and_not_reused_under_another_environment(monkeypatch):
    """Spawning a worker imports torch (seconds): the pool is reused by later calls, but not once the working
    folder or a variable the workers read ($MOLRMOG_DATA, ...) changed."""
    from molrmog.training import executors

    tasks = [Task(f"p-{i}", _pid, (i,)) for i in range(6)]
    assert os.getpid() not in set(run_tasks(tasks, Executor(workers=2), progress=False).values())
    pool = executors._POOLS[2][0]
    run_tasks(tasks, Executor(workers=2), progress=False)
    assert executors._POOLS[2][0] is pool  # the same pool, its workers already running
    monkeypatch.setenv("MOLRMOG_DATA", "/elsewhere")
    run_tasks(tasks, Executor(workers=2), progress=False)
    assert executors._POOLS[2][0] is not pool


def test_missing_ray_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ValueError, match=r"pip install 'molrmog\[ray\]'"):
        Executor("ray")
    assert main(["train", "--executor", "ray", "--out", "unused", "--no-progress"]) == 2
    assert "molrmog[ray]" in capsys.readouterr().err
    assert main(["train", "--ray-address", "auto", "--out", "unused", "--no-progress"]) == 2


def test_sweeps_do_not_depend_on_the_executor(tmp_path):
    kw = dict(Ds=[16], ns=[32, 64], mlp_Ds=[], steps=15, eval_n=200, progress=False)
    a = run_estimation(tmp_path / "a", "quick", **kw)
    b = run_estimation(tmp_path / "b", "quick", executor=Executor(workers=2), **kw)
    assert a["slopes"] == pytest.approx(b["slopes"], rel=1e-6)
    assert (tmp_path / "b" / "estimation.png").is_file()


@pytest.fixture(scope="module")
def pool_run(tmp_path_factory):
    """Reference: the local executor with a 2-process pool (1 intra-op thread per task)."""
    out = tmp_path_factory.mktemp("runs") / "pool"
    assert main(["train", "--dataset", "digits", "--out", str(out), "--workers", "2", *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    yield ray
    ray.shutdown()


def test_ray_matches_local_and_survives_a_killed_task(pool_run, ray_session, tmp_path, monkeypatch):
    # the worker running mog-3 is killed (os._exit) on its first attempt; Ray retries the task. The
    # replacement task is defined here, in the test, and shipped to Ray's workers by value.
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = tmp_path / "mog-3-died"
    monkeypatch.setattr(pipeline, "expert_task", _dies_once(str(marker), "mog-3"))
    out = tmp_path / "ray"
    assert main(["train", "--dataset", "digits", "--out", str(out), "--executor", "ray", "--workers", "2",
                 *TINY]) == 0
    assert marker.is_file(), "the injected failure did not happen"
    _assert_same_weights(_weights(pool_run), _weights(out))  # bitwise, the retried task included

    # a task that fails on every attempt: reported by name, the other 29 models are kept
    monkeypatch.setattr(pipeline, "expert_task", _always_fails("gaussian-2"))
    out2 = tmp_path / "ray-fail"  # the VAEs of the pool run (expert tasks are what fails here)
    assert main(["train", "--out", str(out2), "--vae-from", str(pool_run), "--executor", "ray", "--workers", "2",
                 *tiny(("mog", "gaussian"), vae=False)]) == 1
    assert not (out2 / "experts" / "gaussian" / "2" / WEIGHTS).exists()
    kept = {f: f.stat().st_mtime_ns for f in out2.glob(f"experts/*/*/{WEIGHTS}")}
    assert len(kept) == 19 and len(list(out2.glob(f"vae/*/{WEIGHTS}"))) == 10
    monkeypatch.setattr(pipeline, "expert_task", _expert_task)
    assert main(["train", "--resume", str(out2), "--workers", "2", "--no-progress"]) == 0
    assert all(f.stat().st_mtime_ns == t for f, t in kept.items())  # finished experts were not redone
    _assert_same_weights(_weights(pool_run), _weights(out2))


def test_sequential_and_parallel_sampling_agree(pool_run, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["sample", str(pool_run), "--n", "12", "--steps", "4", "--out", str(a), "--npy"]) == 0
    assert main(["sample", str(pool_run), "--n", "12", "--steps", "4", "--out", str(b), "--npy",
                 "--workers", "2"]) == 0
    np.testing.assert_allclose(np.load(a.with_suffix(".npy")), np.load(b.with_suffix(".npy")), atol=1e-5)
