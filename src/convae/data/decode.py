"""Decoding many image files on every core, in chunks that survive a kill.

Files are cut into chunks of ``CHUNK``; worker processes decode whole chunks (Pillow, then the
same conversion as :func:`load_image`), and the chunks are put back in file order, so the result
is the same whatever the number of processes. With a ``partial`` folder every finished chunk is
saved there: a decode that was killed continues with the chunks still missing.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from ..utils.errors import first_line
from ..utils.files import atomic_torch_save
from ..utils.records import Log
from .images import load_image, printable

CHUNK = 1000  # files per task: large enough to hide the inter-process cost, small enough to resume cheaply
PARALLEL_MIN = 2000  # fewer files are decoded in this process: starting workers would cost more than it saves


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def decode_chunk(files: list[str], root: str, channels: int, height: int, width: int) -> dict:
    """Decode ``files``; returns the images that decoded (uint8 tensor), their positions in
    ``files``, "file: reason" for the others, and how many changed mode or size."""
    out = np.empty((len(files), channels, height, width), np.uint8)
    keep: list[int] = []
    skipped: list[str] = []
    n_mode = n_size = 0
    for i, f in enumerate(files):
        try:
            img, mode_changed, resized = load_image(Path(f), channels, height, width)
        except Exception as e:
            skipped.append(f"{printable(Path(f).relative_to(root))}: {printable(first_line(e, 300))}")
            continue
        out[len(keep)] = img.numpy()
        keep.append(i)
        n_mode += mode_changed
        n_size += resized
    return {
        "images": torch.from_numpy(out[: len(keep)].copy()),
        "keep": keep,
        "skipped": skipped,
        "n_mode": n_mode,
        "n_size": n_size,
    }


class Chunks:
    """Decoded images in file order, one chunk at a time: a chunk saved in the partial folder is
    read back only when iterated, so a large decode never holds every image in memory."""

    def __init__(self, parts: list, shape: tuple[int, ...]) -> None:
        self.parts = parts  # each a tensor, or a path to a saved chunk
        self.shape = shape

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self):
        for p in self.parts:
            yield p if isinstance(p, torch.Tensor) else torch.load(p, weights_only=True)["images"]

    def tensor(self) -> torch.Tensor:
        """Every image in one tensor (for small sets and tests)."""
        return torch.cat(list(self)) if self.parts else torch.empty(self.shape, dtype=torch.uint8)


def _saved(partial: Path | None, i: int, n: int, shape: tuple[int, int, int]) -> dict | None:
    """Chunk ``i`` (of ``n`` files) from an earlier, stopped decode, if it was written whole."""
    path = None if partial is None else partial / f"{i:07d}.pt"
    if path is None or not path.is_file():
        return None
    try:
        r = torch.load(path, weights_only=True)
        keep, images = r["keep"], r["images"]
        # untrusted: the positions must be distinct files of this chunk, one image each, in order
        ok = (
            isinstance(keep, list)
            and all(isinstance(k, int) for k in keep)
            and keep == sorted(set(keep))
            and all(0 <= k < n for k in keep)
            and isinstance(r["skipped"], list)
            and len(keep) + len(r["skipped"]) == n
            and isinstance(images, torch.Tensor)
            and images.dtype == torch.uint8
            and images.shape[0] == len(keep)
            and images.shape[1:] == shape
            and all(isinstance(r[k], int) for k in ("n_mode", "n_size"))
        )
        return {**r, "images": path} if ok else None  # the images are read again when written
    except Exception:
        return None


def decode_files(
    files: list[Path],
    root: Path,
    channels: int,
    height: int,
    width: int,
    log: Log,
    workers: int = 0,
    partial: Path | None = None,
) -> tuple[Chunks, list[int], list[str]]:
    """Decode ``files`` with ``workers`` processes (0 = every core); returns the images (in
    chunks: with ``partial`` each is saved there and left out of memory), the indices of the files
    they came from, and the skipped files with reasons."""
    from tqdm.auto import tqdm

    names = [str(f) for f in files]
    chunks = [names[i : i + CHUNK] for i in range(0, len(names), CHUNK)]
    results: list[dict | None] = [_saved(partial, i, len(c), (channels, height, width)) for i, c in enumerate(chunks)]
    todo = [i for i, r in enumerate(results) if r is None]
    if len(todo) < len(chunks):
        log(f"continuing a stopped decode: {len(chunks) - len(todo)} of {len(chunks)} chunks already done")
    n = min(workers or available_cores(), len(todo)) if len(names) >= PARALLEL_MIN else 1
    # disable=None: no bar when stderr is not a terminal (a log file gets no fragments), as in training
    bar = tqdm(
        total=len(names),
        initial=sum(len(chunks[i]) for i, r in enumerate(results) if r is not None),
        desc="decoding",
        unit="img",
        leave=False,
        mininterval=1.0,
        disable=None,
    )

    def finished(i: int, r: dict) -> None:
        if partial is not None:
            path = partial / f"{i:07d}.pt"
            atomic_torch_save(r, path)
            r = {**r, "images": path}
        results[i] = r
        bar.update(len(chunks[i]))

    try:
        if n <= 1:
            for i in todo:
                finished(i, decode_chunk(chunks[i], str(root), channels, height, width))
        else:
            # fork where there is one: a worker then starts in milliseconds instead of importing torch
            # again; each worker decodes with one thread (the parallelism is the processes)
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init)
            try:
                jobs = {pool.submit(decode_chunk, chunks[i], str(root), channels, height, width): i for i in todo}
                for job in as_completed(jobs):
                    # popped: a future keeps its result, and every decoded chunk would stay in memory
                    # (shared memory, from the worker) until the last one is done
                    finished(jobs.pop(job), job.result())
                    del job
            except BaseException:  # a signal or an error: no worker outlives this process
                _stop_workers(pool)
                raise
            pool.shutdown()
    finally:
        bar.close()
    done = [r for r in results if r is not None]
    images = Chunks(
        [r["images"] for r in done if r["keep"]], (sum(len(r["keep"]) for r in done), channels, height, width)
    )
    keep = [c * CHUNK + k for c, r in enumerate(done) for k in r["keep"]]
    skipped = [s for r in done for s in r["skipped"]]
    n_mode, n_size = sum(r["n_mode"] for r in done), sum(r["n_size"] for r in done)
    if n_mode or n_size:
        log(f"converted {n_mode} image(s) to {channels} channel(s), resized {n_size} to {height}x{width}")
    if skipped:
        log(f"skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
    return images, keep, skipped


def _worker_init() -> None:
    """A decode worker: one thread (the parallelism is the processes), and the default action for
    SIGINT/SIGTERM (the parent's handlers, inherited by fork, are not the worker's to run)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """End the pool's processes now (their chunks in flight are lost; the saved ones are kept)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public handle on them
    manager = getattr(pool, "_executor_manager_thread", None)
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.terminate()
    for p in processes:
        p.join(timeout=5)
    if manager is not None:
        # its end closes the pipe that concurrent.futures' exit handler writes to; closed during that
        # write (a race on a loaded machine), the exit printed an "Exception ignored" traceback
        manager.join(timeout=5)


def remove_partial(partial: Path | None) -> None:
    if partial is not None:
        shutil.rmtree(partial, ignore_errors=True)
