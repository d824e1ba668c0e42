"""What the cache folder holds, and removing what no run can use (``convae cache list|clean``).

``CACHE/tensors/KEY/`` are decoded sources (current or older format), ``KEY.partial/`` the chunks
of a decode that stopped, ``CACHE/extracted/`` archives extracted once, ``CACHE/cifar10/`` the
download, ``CACHE/models/`` autoencoders the Python API saved by content.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..utils.files import pid_alive
from .cache import CACHE_VERSION


@dataclass(frozen=True)
class Entry:
    path: Path
    kind: str  # "decoded", "partial decode", "extracted archive", "CIFAR-10 download", "saved model"
    state: str  # "current", "older format N", "incomplete", or "" where it does not apply
    bytes: int
    images: int | None = None

    @property
    def stale(self) -> bool:
        """No run reads it again: an older format, an incomplete decode."""
        return self.state.startswith("older") or self.state == "incomplete"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _decoded(path: Path) -> Entry:
    try:
        meta = json.loads((path / "meta.json").read_text())
        version = meta.get("version") if isinstance(meta, dict) else None
        images = meta["shape"][0] if version == CACHE_VERSION else None
        state = "current" if version == CACHE_VERSION else f"older format {version}"
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        state, images = "incomplete", None
    return Entry(path, "decoded", state, _size(path), images)


def entries(cache: Path) -> list[Entry]:
    """Everything convae keeps under ``cache``, largest first."""
    found: list[Entry] = []
    tensors = cache / "tensors"
    for p in sorted(tensors.iterdir()) if tensors.is_dir() else []:
        if p.is_symlink() or not p.is_dir():
            continue  # the per-key locks, and nothing convae made
        found.append(Entry(p, "partial decode", "incomplete", _size(p)) if p.name.endswith(".partial") else _decoded(p))
    for sub, kind in (("extracted", "extracted archive"), ("models", "saved model")):
        folder = cache / sub
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            state = "incomplete" if p.name.startswith(".tmp-") else ""
            found.append(Entry(p, kind, state, _size(p)))
    if (cache / "cifar10").is_dir():
        found.append(Entry(cache / "cifar10", "CIFAR-10 download", "", _size(cache / "cifar10")))
    return sorted(found, key=lambda e: -e.bytes)


def in_use(entry: Entry) -> bool:
    """Whether a process is writing this entry now: decoding into its key (it holds the key's lock), or
    extracting an archive into it (a ``.tmp-<pid>-`` folder of a process that is alive)."""
    if entry.kind == "extracted archive" and entry.path.name.startswith(".tmp-"):
        pid = entry.path.name[len(".tmp-") :].split("-", 1)[0]
        return pid.isdigit() and pid_alive(int(pid))
    if entry.kind not in ("decoded", "partial decode"):
        return False
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return False
    lock = entry.path.parent / (entry.path.name.removesuffix(".partial") + ".lock")
    if not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)


def remove(entry: Entry) -> bool:
    """Remove the entry; False when another process (a second ``convae cache clean``) removed it first,
    or went on removing it while this one walked it."""
    for _ in range(3):
        try:
            if entry.path.is_dir() and not entry.path.is_symlink():
                shutil.rmtree(entry.path)
            else:
                entry.path.unlink()
            return True
        except FileNotFoundError:  # a file or the folder went while this walk was under way
            if not os.path.lexists(entry.path):
                return False
    return not os.path.lexists(entry.path)


def human(n: float) -> str:
    """A size in bytes as people read it: 812 B, 4.2 MiB, 1.3 GiB."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"
