"""Reading rows of a source's uint8 images without holding the source in the process.

A cached source is one ``.npy`` file: row ``i`` is ``row_bytes`` bytes at ``offset + i * row_bytes``.
:func:`gather` reads only the rows asked for, in file order (runs of consecutive rows in one
``preadv``), into a buffer of its own (pinned when the batch goes to a GPU), and returns them in
the order asked. The page cache holds the file once for every process; a memory map would also
work, but every page it touched would count in the process's resident set for as long as the map
lives, which makes a 5 GB source look like a 5 GB process. An in-memory source (the Python API's
tensors) is gathered by indexing.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

_HAS_PREADV = hasattr(os, "preadv")


@dataclass(frozen=True)
class MappedFile:
    """Where a source's image rows are on disk: the ``.npy`` file and its data offset."""

    path: str
    offset: int
    row_bytes: int
    inode: int = 0  # the file mapped; a cache rewritten since (a new file, same name) is not read for it


_fds: dict[tuple[int, str, int], int] = {}  # (pid, path, inode) -> fd: a forked child opens its own
_fds_lock = threading.Lock()


def _fd(file: MappedFile) -> int:
    key = (os.getpid(), file.path, file.inode)
    with _fds_lock:
        if key not in _fds:
            fd = os.open(file.path, os.O_RDONLY)
            if file.inode and os.fstat(fd).st_ino != file.inode:
                os.close(fd)
                raise OSError(f"{file.path} was replaced while this process was reading it")
            _fds[key] = fd
        return _fds[key]


def _runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end positions of the runs of consecutive values in sorted ``rows``."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return np.concatenate(([0], breaks)), np.concatenate((breaks, [len(rows)]))


def _read_sorted(file: MappedFile, rows: np.ndarray, out: torch.Tensor) -> None:
    """Rows ``rows`` (sorted) of ``file`` into ``out`` (contiguous uint8, one row per entry)."""
    fd = _fd(file)
    flat = memoryview(out.numpy().reshape(-1)).cast("B")
    starts, ends = _runs(rows)
    for s, e in zip(starts.tolist(), ends.tolist()):
        view = flat[s * file.row_bytes : e * file.row_bytes]
        pos = file.offset + int(rows[s]) * file.row_bytes
        while len(view):  # a short read (a signal, a network file system) continues where it stopped
            n = os.preadv(fd, [view], pos)
            if n <= 0:
                raise OSError(f"{file.path} ended before row {int(rows[e - 1])}: the cache file is truncated")
            view, pos = view[n:], pos + n


OWN_MAPPING = 1 << 20  # bytes from which a batch buffer is a mapping of its own


def _buffer(shape: tuple[int, ...], pin: bool) -> torch.Tensor:
    """An uninitialised uint8 buffer. A big one is an anonymous memory mapping of its own, unmapped
    when the tensor dies: from malloc, buffers allocated in the prefetch thread and freed in the
    training thread fragment glibc's heap, and a whole run's resident set grew with the number of
    batches in an epoch (+238 MiB over one epoch of a 2 GiB source, BENCHMARKS.md)."""
    n = math.prod(shape)
    if pin or n < OWN_MAPPING:
        return torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
    return torch.frombuffer(mmap.mmap(-1, n), dtype=torch.uint8).view(shape)


def gather(images: torch.Tensor, rows: torch.Tensor, file: MappedFile | None = None, pin: bool = False) -> torch.Tensor:
    """``images[rows]`` as a new contiguous uint8 tensor, in the order of ``rows``.

    With ``file`` the rows are read from disk (``images`` is its memory map, used only for the
    shape and where ``preadv`` does not exist); ``pin`` allocates the result in pinned memory.
    """
    rows = rows.cpu()
    if file is None or not _HAS_PREADV or len(rows) == 0:
        # numpy's indexing, not torch's: in the prefetch thread a torch op would start a second
        # OpenMP team beside training's
        x = torch.from_numpy(images.numpy()[rows.numpy()]) if images.device.type == "cpu" else images[rows]
        return x.pin_memory() if pin else x
    r = rows.numpy()
    in_order = bool(np.all(r[1:] >= r[:-1]))
    out = _buffer((len(r), *images.shape[1:]), pin)
    if in_order:
        _read_sorted(file, r, out)
        return out
    order = np.argsort(r, kind="stable")
    sorted_rows = _buffer(tuple(out.shape), False)
    _read_sorted(file, r[order], sorted_rows)
    # back to the order asked (the same batch as images[rows]); numpy, not torch: this runs in the
    # prefetch thread, and a torch op there would start a second OpenMP team next to training's
    out.numpy()[order] = sorted_rows.numpy()
    return out
