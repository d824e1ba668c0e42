"""CPU threads that follow the cores other processes leave free.

torch runs its CPU work on one thread per core, and every parallel region waits for its slowest
thread. When another busy process shares the cores, one of those threads keeps losing its core
for a scheduler time slice, so each region waits for it and the whole run slows down by far more
than the share of the machine it lost (measured 3-4x beside one busy process on 2 cores,
BENCHMARKS.md). :class:`CoreShare` measures, every few seconds, how much CPU time the other
processes took on the cores this process may use and sets torch's thread count to the cores left,
so the run degrades about in proportion to the cores it actually gets.

The command line follows the free cores (:func:`follow`) unless ``OMP_NUM_THREADS`` pins the
thread count; the Python API leaves a caller's thread settings alone. Linux only (it reads
``/proc/stat``); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

Sample = tuple[float, float]  # (seconds of CPU time on our cores, by anyone; seconds of it that were ours)


def _our_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def cpu_sample(cpus: set[int] | None = None, stat: str = "/proc/stat") -> Sample | None:
    """Busy CPU seconds so far on ``cpus`` (default: the cores this process may run on), from
    ``/proc/stat``, and this process's own CPU seconds (its finished children's included); None
    where there is no ``/proc/stat``."""
    cpus = _our_cpus() if cpus is None else cpus
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = 0
    try:
        with open(stat) as f:
            for line in f:
                name, *fields = line.split()
                if name == "cpu" or not name.startswith("cpu") or int(name[3:]) not in cpus:
                    continue  # the first line sums every core; ours are counted one by one
                ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                busy += sum(ticks) - ticks[3] - ticks[4]  # steal counts: the core was not ours to use
    except (OSError, ValueError, IndexError):
        return None
    own = os.times()  # with the children waited for: decode workers are ours, not a neighbour
    return busy / tick, own.user + own.system + own.children_user + own.children_system


def threads_for(free_cores: float, max_threads: int, cores: int) -> int:
    """Threads for ``free_cores`` of the ``cores`` we may use, scaled to ``max_threads`` (torch's
    default is one per physical core, fewer than logical cores with hyperthreading)."""
    return max(1, min(max_threads, round(free_cores * max_threads / max(cores, 1))))


class CoreShare:
    """Keeps torch's thread count at the cores other processes leave free; :meth:`poll` it from
    the thread that computes (an OpenMP thread count is per calling thread), as often as is cheap:
    it measures only every ``every`` seconds."""

    def __init__(
        self,
        every: float = 2.0,
        max_threads: int | None = None,
        cpus: set[int] | None = None,
        sample: Callable[[], Sample | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ) -> None:
        self.cpus = _our_cpus() if cpus is None else cpus
        self.max_threads = max_threads or torch.get_num_threads()
        self.every, self.clock, self.set_threads = every, clock, set_threads
        self.sample = sample or (lambda: cpu_sample(self.cpus))
        self.threads = self.max_threads
        self.changes = 0
        self._last = self.sample()
        self._at = clock()

    def poll(self) -> int:
        """The thread count, after a new measurement when ``every`` seconds have passed."""
        now = self.clock()
        if self._last is None or now - self._at < self.every:
            return self.threads
        current = self.sample()
        if current is None:
            return self.threads
        wall = now - self._at
        others = max((current[0] - self._last[0]) - (current[1] - self._last[1]), 0.0) / wall
        self._last, self._at = current, now
        threads = threads_for(len(self.cpus) - others, self.max_threads, len(self.cpus))
        if threads != self.threads:
            self.set_threads(threads)
            self.threads, self.changes = threads, self.changes + 1
        return self.threads


_share: CoreShare | None = None


def follow(enabled: bool | None = None) -> CoreShare | None:
    """Start following the free cores in this process (default: unless ``OMP_NUM_THREADS`` is set,
    or where there is no ``/proc/stat``); returns the :class:`CoreShare`, or None when off."""
    global _share
    if enabled is None:
        enabled = not os.environ.get("OMP_NUM_THREADS") and cpu_sample() is not None
    _share = CoreShare() if enabled else None
    return _share


def stop_following() -> None:
    """Stop adapting and give torch back the thread count it started with."""
    global _share
    if _share is not None and _share.threads != _share.max_threads:
        _share.set_threads(_share.max_threads)
    _share = None


def poll() -> None:
    """Adapt the thread count when following (cheap: a clock read between measurements)."""
    if _share is not None:
        _share.poll()
