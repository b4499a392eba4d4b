"""Intra-op threads that behave beside other work.

On a small machine, intra-op threads that outnumber the free cores slow training several-fold to 20x:
every parallel region waits for the thread that another process has pushed off its core (measured by
`benchmarks/bench_threads.py`: beside one busy process, a U-Net step with two threads is 3x slower than
with one, and 20x slower with longer OpenMP spinning). So a training loop takes the cores that other
processes leave free (`choose_threads`, read from the kernel's CPU counters), at most its share `limit`
(the executor's), at least one, and looks again at every checkpoint (`Threads.next`, from what other
processes did since the last look). The count in force is recorded in each checkpoint, so a resumed
run continues with the same counts and stays bit for bit (the count changes float rounding in the last
bits). MOLRMOG_THREADS=N fixes the count for every task and command: bit-identical runs whatever the load.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator

import torch

from molrmog.core.errors import MolrmogError

__all__ = ["ENV", "fixed_threads", "cpu_times", "busy_elsewhere", "free_threads", "choose_threads", "Threads",
           "usable_cpus", "using_threads"]

ENV = "MOLRMOG_THREADS"
Sample = tuple[int, int, int, int]  # (busy ticks of all CPUs, all ticks, this process's ticks, CPUs)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; os.cpu_count() where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def fixed_threads(environ=os.environ) -> int | None:
    """The thread count MOLRMOG_THREADS fixes, or None when it is unset."""
    v = environ.get(ENV, "").strip()
    if not v:
        return None
    if not v.isdigit() or int(v) < 1:
        raise MolrmogError(f"{ENV} must be a positive integer (intra-op threads), got {v!r}; unset it to let "
                           f"molrmog choose")
    return int(v)


def cpu_times(proc_stat: str = "/proc/stat", self_stat: str = "/proc/self/stat") -> Sample | None:
    """Linux's CPU counters: (busy ticks of every CPU together, all ticks, ticks of this process, number of
    CPUs), or None where they cannot be read."""
    try:
        with open(proc_stat) as f:
            lines = f.read().splitlines()
        with open(self_stat) as f:
            mine = f.read()
        v = [int(x) for x in lines[0].split()[1:9]]
        cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        fields = mine[mine.rindex(")") + 2:].split()  # after "pid (comm) "
        own = int(fields[11]) + int(fields[12])  # utime + stime of every thread of this process
    except (OSError, ValueError, IndexError):
        return None
    idle = v[3] + v[4]  # idle + iowait
    return sum(v) - idle, sum(v), own, max(cpus, 1)


def busy_between(a: Sample | None, b: Sample | None) -> float | None:
    """CPUs' worth of work that other processes did between two samples (None if unknown)."""
    if a is None or b is None or b[1] <= a[1]:
        return None
    busy, total, own = b[0] - a[0], b[1] - a[1], b[2] - a[2]
    return max(0.0, (busy - own) / total * b[3])


_RECENT: dict = {}  # the last sample this process took, and when: (monotonic seconds, Sample)


def busy_elsewhere(sample: Callable[[], Sample | None] = cpu_times, sleep: Callable[[float], None] = time.sleep,
                   interval: float = 0.1, clock: Callable[[], float] = time.monotonic) -> float | None:
    """CPUs' worth of work other processes did over the last `interval` seconds or more: since this process's
    previous sample when that is between `interval` and 10 s old (no waiting; tasks that follow each other
    measure over the one before), else over the next `interval` seconds. sample, sleep and clock: injectable."""
    now = clock()
    last = _RECENT.get(sample)
    if last is None or not interval <= now - last[0] <= 10.0:
        last = (now, sample())
        sleep(interval)
        now = clock()
    b = sample()
    _RECENT[sample] = (now, b)
    return busy_between(last[1], b)


def free_threads(others: float | None, limit: int, cpus: int | None = None) -> int:
    """Threads for `cpus` CPUs of which other processes use `others` (a CPU counts as taken once another
    process uses a third of it), between 1 and `limit`; `limit` when the load is unknown."""
    if others is None:
        return max(1, limit)
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, min(limit, cpus - math.ceil(others - 1 / 3)))


def choose_threads(limit: int | None = None, measure: Callable[[], float | None] = busy_elsewhere,
                   environ=os.environ, cpus: int | None = None) -> int:
    """Intra-op threads for work starting now: MOLRMOG_THREADS if set, else `free_threads` of the load
    measured over 0.1 s, at most `limit` (default: every usable CPU)."""
    fixed = fixed_threads(environ)
    if fixed is not None:
        return fixed
    limit = max(1, int(limit or usable_cpus()))
    return 1 if limit == 1 else free_threads(measure(), limit, cpus)


class Threads:
    """The thread count of a training loop: `start()` when it begins, `next()` at every checkpoint (from what
    other processes did since the last call; no waiting). `sample` and `cpus` are injectable (tests)."""

    def __init__(self, limit: int, sample: Callable[[], Sample | None] = cpu_times, environ=os.environ,
                 cpus: int | None = None):
        self.limit, self.fixed, self._sample, self.cpus = max(1, int(limit)), fixed_threads(environ), sample, cpus
        self._last: Sample | None = None
        self._start: int | None = None

    def start(self) -> int:
        """The count to begin with (measured once; later calls return the same)."""
        if self.fixed is not None:
            return self.fixed
        if self._start is None:
            self._start = choose_threads(self.limit, lambda: busy_elsewhere(self._sample), environ={}, cpus=self.cpus)
            self._last = self._sample()
        return self._start

    def next(self) -> int:
        if self.fixed is not None:
            return self.fixed
        now = self._sample()
        n = free_threads(busy_between(self._last, now), self.limit, self.cpus)
        self._last = now
        return n


@contextlib.contextmanager
def using_threads(threads: int) -> Iterator[int]:
    """torch's intra-op thread count set to `threads` inside the block, the caller's restored after it."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield threads
    finally:
        torch.set_num_threads(old)
