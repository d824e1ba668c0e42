"""glibc's heap kept between training steps: freed activations are reused, not faulted in again."""

import os
import subprocess
import sys

import pytest

from convae import cli
from convae.utils import heap

STEPS = """
import ctypes, importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("heap", sys.argv[2])  # the module alone: no torch to import
heap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heap)
kept = heap.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

def step():  # a training step's saved maps (torch's CPU tensors come from glibc's malloc): written, freed
    maps = [libc.malloc(9 << 20) for _ in range(20)]
    for m in maps:
        libc.memset(m, 1, 9 << 20)
    for m in maps:
        libc.free(m)

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
EVERY_PAGE_AGAIN = 3 * 20 * (9 << 20) // 4096 // 2  # half the pages the 3 timed steps write: glibc's defaults


def _faults(arm: str, env: dict) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", STEPS, arm, heap.__file__], capture_output=True, text=True, env=env, check=True
    )
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not heap.glibc(), reason="needs glibc")
def test_freed_maps_are_reused_instead_of_faulted_in_again():
    env = {k: v for k, v in os.environ.items() if k not in heap.USER_SETTINGS}
    kept, default = _faults("default", env)
    assert kept == "False" and default > EVERY_PAGE_AGAIN
    kept, reused = _faults("keep", env)
    assert kept == "True" and reused < default // 20


@pytest.mark.skipif(not heap.glibc(), reason="needs glibc")
def test_a_users_own_malloc_settings_are_left_alone():
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"}
    kept, faults = _faults("keep", env)
    assert kept == "False" and faults > EVERY_PAGE_AGAIN


def test_the_command_keeps_freed_memory_before_it_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "keep_freed_memory", lambda: calls.append("kept") or True)
    monkeypatch.setattr(cli, "main", lambda argv=None: calls.append("main") or 0)
    with pytest.raises(SystemExit) as stop:
        cli.entry()
    assert stop.value.code == 0 and calls == ["kept", "main"]
