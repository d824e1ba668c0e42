"""Threads that follow the free cores: the measurement, the decision, where it is polled."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from convae.cli import main
from convae.utils import cores
from test_cli import SMALL

STAT = """cpu  900 0 100 1000 0 0 0 0 0 0
cpu0 400 0 50 500 7 0 0 3 0 0
cpu1 500 0 50 500 0 0 0 0 0 0
cpu2 100000 0 0 0 0 0 0 0 0 0
intr 12345
"""


def test_cpu_sample_counts_busy_time_on_our_cores_only(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    tick = cores.os.sysconf("SC_CLK_TCK")
    busy, own = cores.cpu_sample({0, 1}, str(stat))
    # cpu0: user 400 + system 50 + steal 3 (idle and iowait are free time); cpu1: 550; cpu2 is not ours
    assert busy == pytest.approx((453 + 550) / tick)
    assert own >= 0
    assert cores.cpu_sample({0}, str(tmp_path / "missing")) is None


class Machine:
    """A fake clock and /proc/stat: ``others`` cores busy besides ``ours``."""

    def __init__(self):
        self.t, self.busy, self.own = 0.0, 0.0, 0.0

    def run(self, seconds: float, ours: float, others: float):
        self.t += seconds
        self.own += ours * seconds
        self.busy += (ours + others) * seconds


def share(machine: Machine, max_threads: int = 2, cpus: int = 2) -> tuple[cores.CoreShare, list[int]]:
    calls: list[int] = []
    s = cores.CoreShare(
        every=2.0,
        max_threads=max_threads,
        cpus=set(range(cpus)),
        sample=lambda: (machine.busy, machine.own),
        clock=lambda: machine.t,
        set_threads=calls.append,
    )
    return s, calls


def test_a_busy_neighbour_takes_a_thread_and_gives_it_back():
    m = Machine()
    s, calls = share(m)
    m.run(1.0, ours=2.0, others=0.0)
    assert s.poll() == 2 and calls == []  # alone
    m.run(1.5, ours=1.4, others=0.6)  # a neighbour starts: it gets 0.6 of a core from our two threads
    assert s.poll() == 2 and calls == []  # measured over 2.5 s: 0.36 of a core elsewhere, not enough
    m.run(1.0, ours=1.3, others=0.7)
    assert s.poll() == 2, "measures only every 2 s"
    m.run(1.0, ours=1.3, others=0.7)
    assert s.poll() == 1 and calls == [1]  # 0.7 of a core elsewhere: one thread
    m.run(2.0, ours=1.0, others=1.0)
    assert s.poll() == 1 and calls == [1]  # the neighbour now has its core: stays at one
    m.run(2.0, ours=1.0, others=0.0)
    assert s.poll() == 2 and calls == [1, 2] and s.changes == 2  # it ended: both threads back


def test_threads_scale_to_physical_cores_and_never_drop_to_zero():
    assert cores.threads_for(2.0, 2, 4) == 1  # 4 logical cores, 2 threads (one per physical core), half free
    assert cores.threads_for(3.0, 2, 4) == 2
    assert cores.threads_for(-1.0, 8, 8) == 1
    assert cores.threads_for(40.0, 8, 8) == 8
    m = Machine()
    s, calls = share(m, max_threads=8, cpus=8)
    m.run(2.0, ours=5.0, others=3.0)
    assert s.poll() == 5 and calls == [5]


def test_follow_is_off_when_omp_num_threads_pins_the_count(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cores.follow() is None
    cores.poll()  # a no-op
    monkeypatch.delenv("OMP_NUM_THREADS")
    before = torch.get_num_threads()
    try:
        s = cores.follow()
        assert (s is not None) == Path("/proc/stat").exists()
        if s is not None:
            s.threads = max(before - 1, 1) if before > 1 else 2  # as if it had adapted
            s.set_threads(s.threads)
    finally:
        cores.stop_following()
    assert torch.get_num_threads() == before, "stopping gives torch its thread count back"
    assert cores._share is None


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads Linux's /proc/stat")
def test_a_real_busy_process_is_measured_as_another_core_in_use():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # started
        before, start = cores.cpu_sample(), time.monotonic()
        time.sleep(1.5)
        after, wall = cores.cpu_sample(), time.monotonic() - start
    finally:
        busy.kill()
        busy.wait()
    others = (after[0] - before[0]) - (after[1] - before[1])
    assert others / wall > 0.5, (others, wall)  # the busy loop, on one of our cores
    ours = cores.cpu_sample()[1] - after[1]
    assert ours > 0.5 * wall, "a child that was waited for counts as ours (decode workers are not neighbours)"


def test_the_command_line_follows_and_the_training_loop_polls(monkeypatch, tmp_path, image_folder, cache_dir):
    """``convae`` follows the free cores unless OMP_NUM_THREADS is set; every training step polls."""
    polls, follows = [], []
    monkeypatch.setattr(cores, "poll", lambda: polls.append(1))
    real_follow = cores.follow
    monkeypatch.setattr(cores, "follow", lambda enabled=None: follows.append(real_follow(False)))
    out = tmp_path / "run"
    assert (
        main(
            ["pretrain", "--data", str(image_folder), "--cache-dir", str(cache_dir), "--out", str(out)]
            + SMALL
            + ["--pretrain-epochs", "2", "--batch-size", "9"]
        )
        == 0
    )
    assert follows == [None]  # OMP_NUM_THREADS is set for the tests: asked, and off
    # 24 training images in batches of 9, 2 epochs: 6 steps (and the validation batches poll too)
    assert len(polls) >= 6
