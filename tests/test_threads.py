"""Intra-op threads chosen from the load other processes put on the machine (molrmog.training.threads)."""

import json

import pytest
import torch
from safetensors import safe_open

from molrmog.core.errors import MolrmogError
from molrmog.training.threads import (
    Threads,
    busy_between,
    choose_threads,
    cpu_times,
    fixed_threads,
    free_threads,
    usable_cpus,
)
from molrmog.training.train import fit


def test_cpu_counters_are_read_on_linux():
    s = cpu_times()
    if s is None:
        pytest.skip("no /proc/stat here")
    busy, total, own, cpus = s
    assert 0 <= busy <= total and own >= 0 and cpus >= 1


def test_a_cpu_counts_as_taken_once_another_process_uses_a_third_of_it():
    assert free_threads(0.0, limit=4, cpus=4) == 4
    assert free_threads(0.3, limit=4, cpus=4) == 4
    assert free_threads(0.4, limit=4, cpus=4) == 3
    assert free_threads(1.0, limit=4, cpus=4) == 3
    assert free_threads(1.9, limit=2, cpus=2) == 1
    assert free_threads(7.0, limit=2, cpus=2) == 1  # never fewer than one
    assert free_threads(0.0, limit=2, cpus=8) == 2  # never more than the executor's share
    assert free_threads(None, limit=3, cpus=8) == 3  # unknown load: the share


def test_other_processes_work_excludes_our_own():
    # 2 CPUs, 100 ticks each over the window: 150 busy ticks, 60 of them ours -> 90 ticks = 0.9 CPUs elsewhere
    a, b = (1000, 5000, 300, 2), (1150, 5200, 360, 2)
    assert busy_between(a, b) == pytest.approx(0.9)
    assert busy_between(a, None) is None and busy_between(b, a) is None


def test_molrmog_threads_fixes_the_count_and_is_checked():
    assert fixed_threads({}) is None
    assert fixed_threads({"MOLRMOG_THREADS": "3"}) == 3
    assert choose_threads(2, measure=lambda: 5.0, environ={"MOLRMOG_THREADS": "2"}) == 2
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(MolrmogError, match="MOLRMOG_THREADS must be a positive integer"):
            fixed_threads({"MOLRMOG_THREADS": bad})


def test_fixed_threads_times_workers_beyond_the_cpus_is_warned_about(monkeypatch, caplog):
    import molrmog.training.executors as ex

    monkeypatch.setattr(ex, "usable_cpus", lambda: 2)
    for threads, workers, warned in (("2", 2, True), ("1", 2, False), ("2", 1, False), (None, 4, False)):
        if threads is None:
            monkeypatch.delenv("MOLRMOG_THREADS", raising=False)
        else:
            monkeypatch.setenv("MOLRMOG_THREADS", threads)
        caplog.clear()
        with caplog.at_level("WARNING", logger="molrmog"):
            ex.Executor("local", workers)
        said = " ".join(r.getMessage() for r in caplog.records)
        assert ("asks for 4 threads on 2 CPUs" in said and "MOLRMOG_THREADS=1 or unset it" in said) == warned, said


def test_a_busy_machine_gets_one_thread_an_idle_one_the_share():
    assert choose_threads(2, measure=lambda: 1.0, environ={}, cpus=2) == 1
    assert choose_threads(2, measure=lambda: 0.0, environ={}) == min(2, usable_cpus())
    assert choose_threads(1, measure=lambda: 0.0, environ={}) == 1


class _Load:
    """Fake CPU counters on 2 CPUs: each window another process adds `others` CPUs of work."""

    def __init__(self, others):
        self.others, self.t = list(others), [0, 0, 0, 2]

    def __call__(self):
        o = self.others[0] if len(self.others) == 1 else self.others.pop(0)
        b, tot, own, c = self.t
        self.t = [b + int(100 * o), tot + 200, own, c]
        return tuple(self.t)


def test_a_training_loop_follows_the_load_and_records_it_in_each_checkpoint(tmp_path):
    """Busy at the start (1 thread), idle later (2 threads): the count in force is in the checkpoint, and a
    resume continues with the recorded count (so it stays bit for bit) before it looks again."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 1)
    data = torch.randn(64, 4)

    def loss_fn(m, gen):
        return m(data).square().mean()

    seen = []

    class Recording(Threads):
        def next(self):
            n = super().next()
            seen.append(n)
            return n

    gov = Recording(2, sample=_Load([1.0, 1.0, 1.0, 1.0, 0.0]), environ={}, cpus=2)
    with torch.random.fork_rng():
        fit(lin, loss_fn, steps=30, lr=1e-2, progress=False, checkpoint_dir=tmp_path, checkpoint_every=10, threads=gov)
    with safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as f:
        extra = json.loads(f.metadata()["state"])["extra"]
    assert seen[0] == 1 and seen[-1] == 2 and extra["threads"] == 2
    caller = torch.get_num_threads()
    fit(lin, loss_fn, steps=30, lr=1e-2, progress=False, checkpoint_dir=tmp_path, checkpoint_every=10,
        threads=Threads(2, sample=lambda: None, environ={}))
    assert torch.get_num_threads() == caller  # the caller's setting is restored
