"""glibc's heap kept between training steps.

A training step on the CPU allocates the activations it saves for the backward pass, frees them
after it, and allocates them again in the next step. glibc maps each allocation above its mmap
threshold with a fresh ``mmap`` (unmapped on free) and hands freed memory at the top of its heap
back to the kernel once it exceeds its trim threshold; either way the next step faults every page
in again. The patch network's fine-tuning step (32 saved maps of 9 MiB for 256 images) took
40,000-64,000 minor page faults a step that way and ran 1.17-1.42x faster without them on a
2-core AMD EPYC (BENCHMARKS.md, "The `patch` architecture against the limit").

The command line raises both thresholds (:func:`keep_freed_memory`): allocations up to 32 MiB come
from the heap, and up to 1 GiB of freed memory stays with the process for the next step. A
user's own ``MALLOC_*`` settings are left alone, and so is the process of a Python API caller.
Linux with glibc only; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on a 64-bit system
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a glibc system
        return False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when both were set."""
    if not glibc() or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
