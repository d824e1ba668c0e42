"""The decoded-source cache: one folder per source, opened as a memory map.

``tensors/KEY/`` holds ``images.npy`` (uint8 N x C x H x W), ``labels.npy`` (int64, when
labelled) and ``meta.json`` (format version, shape, classes, file names, skipped files), written
in that order, each whole or not at all: ``meta.json`` is the mark that the rest is complete.
Opening maps ``images.npy`` instead of reading it, so it takes about the same time for 10,000
or 1,000,000 images, and on the CPU the page cache holds the images once for every process;
batches read their rows from the file (``rows.gather``), so no process holds the whole source.
A folder of another format version, or one that fails its checks, is decoded again with a log
line; it is never misread.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..utils.errors import clip, first_line
from ..utils.files import atomic_write, atomic_write_text
from ..utils.records import Log
from .rows import MappedFile

CACHE_VERSION = 5  # 5: checksums of the arrays; 4: memory-mapped .npy folder; 3: a .pt file


def _stamp(path: Path) -> list[int]:
    """What changes whenever a file is replaced or written to (its ctime cannot be set back)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**24):
            h.update(block)
    return h.hexdigest()


META_FIELDS = ("shape", "labelled", "classes", "files", "skipped")


def _meta_digest(meta: dict) -> str:
    """The checksum of what meta.json says about the images (classes, file list, shape)."""
    return hashlib.sha256(json.dumps([meta.get(k) for k in META_FIELDS]).encode()).hexdigest()


def _check_meta(meta: object) -> dict:
    """meta.json as untrusted input: every field of the type and size the arrays need."""
    if not isinstance(meta, dict):
        raise ValueError("meta.json is not a mapping")
    shape, classes, files, skipped = meta.get("shape"), meta.get("classes"), meta.get("files"), meta.get("skipped")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise ValueError("its shape is not N x C x H x W")
    if (
        not isinstance(meta.get("labelled"), bool)
        or not isinstance(classes, list)
        or not all(isinstance(c, str) for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise ValueError("its classes are not a list of distinct names")
    if meta["labelled"] and not classes:
        raise ValueError("it is labelled without classes")
    if not isinstance(files, list) or len(files) not in (0, shape[0]) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"its file list does not name the {shape[0]} images")
    if not isinstance(skipped, list) or not all(isinstance(f, str) for f in skipped):
        raise ValueError("its skipped list is not a list of lines")
    if not isinstance(meta.get("sha256"), dict) or not isinstance(meta.get("stamp"), list):
        raise ValueError("it has no checksums")
    if meta["sha256"].get("meta") != _meta_digest(meta):
        raise ValueError("meta.json does not match its checksum (it was edited)")
    return meta


def _check_arrays(folder: Path, meta: dict, images: np.ndarray, labels: torch.Tensor | None) -> None:
    if list(images.shape) != meta["shape"] or images.dtype != np.uint8:
        raise ValueError("images.npy does not match meta.json")
    if meta["stamp"] != _stamp(folder / "images.npy") and _sha256(folder / "images.npy") != meta["sha256"].get(
        "images"
    ):
        raise ValueError("images.npy does not match its checksum (it was changed or replaced)")
    if labels is None:
        return
    if _sha256(folder / "labels.npy") != meta["sha256"].get("labels"):
        raise ValueError("labels.npy does not match its checksum")
    if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        raise ValueError("labels.npy is not one int64 label per image")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(meta["classes"])):
        raise ValueError(f"labels.npy holds labels outside the {len(meta['classes'])} classes")


@contextmanager
def writer_lock(path: Path, log: Log) -> Iterator[None]:
    """One writer per cache key at a time (``flock`` on ``path``): two processes decoding the same
    source into one cache both succeed, the second reading what the first wrote."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                yield  # a file system without locks: as before
                return
            log(f"another process is decoding this source into {path.parent}; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_cache(folder: Path, log: Log) -> dict | None:
    """The cached source in ``folder``, images memory-mapped (copy-on-write); None when absent,
    of another format version, or damaged (each said in the log).

    Every part is untrusted: meta.json's fields are checked against each other and the arrays,
    the labels against the classes, and the arrays against the checksums written with them
    (``images.npy`` is hashed again only when the file is not the one written: its size, times
    or inode changed)."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
            version = meta.get("version") if isinstance(meta, dict) else None
            log(f"the cache {folder} is format {version}, this convae reads {CACHE_VERSION}: decoding again")
            return None
        meta = _check_meta(meta)
        # "c": copy-on-write pages, so the tensor is writable without copying the file into memory
        images = np.load(folder / "images.npy", mmap_mode="c", allow_pickle=False)
        labels = torch.from_numpy(np.load(folder / "labels.npy", allow_pickle=False)) if meta["labelled"] else None
        _check_arrays(folder, meta, images, labels)
        row_bytes = int(np.prod(images.shape[1:], dtype=np.int64))
        path = (folder / "images.npy").resolve()
        file = MappedFile(str(path), int(images.offset), row_bytes, path.stat().st_ino)
        return {
            "images": torch.from_numpy(images),
            "labels": labels,
            "classes": meta["classes"],
            "files": meta["files"],
            "skipped": meta["skipped"],
            "file": file,
        }
    except Exception as e:
        log(f"the cache {folder} is unreadable ({clip(first_line(e), 100)}); decoding again")
        return None


def write_cache(
    folder: Path,
    images: torch.Tensor | Iterable[torch.Tensor],
    labels: torch.Tensor | None,
    classes: list[str],
    files: list[str],
    skipped: list[str],
) -> None:
    """Write a decoded source into ``folder``; ``meta.json`` last, as the completion mark, with
    the arrays' checksums.

    ``images`` is one uint8 tensor or chunks of one in order (with a ``shape``), written one at a time.
    """
    (folder / "meta.json").unlink(missing_ok=True)  # incomplete until the new mark is written
    shape = tuple(images.shape)
    chunks = [images] if isinstance(images, torch.Tensor) else images
    digests = {}

    def write(f) -> None:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
        h = hashlib.sha256(header.getvalue())
        f.write(header.getvalue())
        n = 0
        for c in chunks:
            block = c.contiguous().numpy().tobytes()
            h.update(block)
            f.write(block)
            n += c.shape[0]
        if n != shape[0]:
            raise ValueError(f"{n} images written for a shape of {shape}")
        digests["images"] = h.hexdigest()

    atomic_write(folder / "images.npy", write)
    if labels is not None:
        atomic_write(folder / "labels.npy", lambda f: np.save(f, labels.numpy(), allow_pickle=False))
        digests["labels"] = _sha256(folder / "labels.npy")
    meta = {
        "version": CACHE_VERSION,
        "shape": list(images.shape),
        "labelled": labels is not None,
        "classes": classes,
        "files": files,
        "skipped": skipped,
        "sha256": digests,
        "stamp": _stamp(folder / "images.npy"),
    }
    digests["meta"] = _meta_digest(meta)
    atomic_write_text(folder / "meta.json", json.dumps(meta))
