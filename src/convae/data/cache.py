"""The decoded-source cache: one folder per source, opened as a memory map.

``tensors/KEY/`` holds ``images.npy`` (uint8 N x C x H x W), ``labels.npy`` (int64, when
labelled) and ``meta.json`` (format version, shape, classes, file names, skipped files), written
in that order, each whole or not at all: ``meta.json`` is the mark that the rest is complete.
Opening maps ``images.npy`` instead of reading it, so it takes about the same time for 10,000
or 1,000,000 images, and on the CPU the page cache holds the images once for every process;
batches read their rows from the file (``rows.gather``), so no process holds the whole source.
A folder of another format version is decoded again, with a log line; it is never misread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..errors import clip, first_line
from ..files import atomic_write, atomic_write_text
from ..records import Log
from .rows import MappedFile

CACHE_VERSION = 4  # 4: memory-mapped .npy folder; 3: EXIF orientation, escaped names (a .pt file)


def read_cache(folder: Path, log: Log) -> dict | None:
    """The cached source in ``folder``, images memory-mapped (copy-on-write); None when absent,
    of another format version, or damaged (each said in the log)."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != CACHE_VERSION:
            log(f"the cache {folder} is format {meta.get('version')}, this convae reads {CACHE_VERSION}: decoding again")
            return None
        # "c": copy-on-write pages, so the tensor is writable without copying the file into memory
        images = np.load(folder / "images.npy", mmap_mode="c")
        labels = torch.from_numpy(np.load(folder / "labels.npy")) if meta["labelled"] else None
        if list(images.shape) != meta["shape"] or images.dtype != np.uint8 or (
                labels is not None and labels.shape[0] != images.shape[0]):
            raise ValueError("the arrays do not match meta.json")
        row_bytes = int(np.prod(images.shape[1:], dtype=np.int64))
        path = (folder / "images.npy").resolve()
        file = MappedFile(str(path), int(images.offset), row_bytes, path.stat().st_ino)
        return {"images": torch.from_numpy(images), "labels": labels, "classes": meta["classes"],
                "files": meta["files"], "skipped": meta["skipped"], "file": file}
    except Exception as e:  # noqa: BLE001 - a damaged cache is decoded again, never trusted
        log(f"the cache {folder} is unreadable ({clip(first_line(e), 80)}); decoding again")
        return None


def write_cache(folder: Path, images: torch.Tensor | Iterable[torch.Tensor], labels: torch.Tensor | None,
                classes: list[str], files: list[str], skipped: list[str]) -> None:
    """Write a decoded source into ``folder``; ``meta.json`` last, as the completion mark.

    ``images`` is one uint8 tensor or chunks of one in order (with a ``shape``), written one at a time.
    """
    (folder / "meta.json").unlink(missing_ok=True)  # incomplete until the new mark is written
    shape = tuple(images.shape)
    chunks = [images] if isinstance(images, torch.Tensor) else images

    def write(f) -> None:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        n = 0
        for c in chunks:
            f.write(c.contiguous().numpy().tobytes())
            n += c.shape[0]
        if n != shape[0]:
            raise ValueError(f"{n} images written for a shape of {shape}")

    atomic_write(folder / "images.npy", write)
    if labels is not None:
        atomic_write(folder / "labels.npy", lambda f: np.save(f, labels.numpy(), allow_pickle=False))
    meta = {"version": CACHE_VERSION, "shape": list(images.shape), "labelled": labels is not None,
            "classes": classes, "files": files, "skipped": skipped}
    atomic_write_text(folder / "meta.json", json.dumps(meta))
