"""Files written whole or not at all, and temporaries that never outlive their process."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ConvaeError

UMASK = os.umask(0o022)  # read once (the call sets it), and put back at once
os.umask(UMASK)


def write_failure(path: Path, e: BaseException) -> ConvaeError | None:
    """The one-line error for a failed write of ``path``, or None when ``e`` is not a write failure."""
    if not isinstance(e, OSError):
        return None
    reason = e.strerror or type(e).__name__
    return ConvaeError(f"could not write {path}: {reason}; the previous file, if any, is intact")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or not a pid at all: leave its files alone
    return True


def remove_stale(folder: Path, prefix: str) -> None:
    """Delete ``folder/<prefix><pid>.*`` temporaries whose process is gone (a kill -9 mid-write)."""
    try:
        entries = list(Path(folder).glob(f"{prefix}*"))
    except OSError:
        return
    for p in entries:
        pid = p.name[len(prefix) :].split(".", 1)[0].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def refuse_links(root: Path, path: Path) -> Path:
    """``path``, after checking that no component of it below ``root`` (the file included) is a
    symbolic link: convae never reads or writes a run folder's files through a link, which could
    point anywhere (a user's other files, a secret)."""
    root, path = Path(root), Path(path)
    try:
        rel = path.relative_to(root)
    except ValueError:
        return path
    here = root
    for part in rel.parts:
        here = here / part
        if here.is_symlink():
            raise ConvaeError(
                f"{here} is a symbolic link; convae does not read or write a run folder's files through links",
                advice="remove the link (or use another --out)",
            )
    return path


def read_file(path: Path, root: Path | None = None) -> bytes:
    """A file's bytes, never through a link below ``root`` (the file itself never a link)."""
    path = Path(path)
    refuse_links(root if root is not None else path.parent, path)
    fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def append_line(path: Path, line: str) -> None:
    """``line`` appended to ``path`` (created if absent), never through a link."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o666)
    with os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace") as f:
        f.write(line)


def make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvaeError(f"could not create the folder {path.parent}: {e.strerror or type(e).__name__}") from None


def publish(tmp: Path, path: Path, exclusive: bool) -> None:
    """Put the finished file ``tmp`` under its name: renamed over ``path``, or, ``exclusive``, linked
    to it only if no file has that name yet (another process writing the same output at the same
    time is refused, never overwritten)."""
    if not exclusive:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise ConvaeError(
            f"{path} already exists (another process wrote it meanwhile); nothing is overwritten",
            advice="choose a new --out file",
        ) from None
    except OSError:  # a file system without hard links: the check and the rename are not one step there
        if os.path.lexists(path):
            raise ConvaeError(
                f"{path} already exists; nothing is overwritten", advice="choose a new --out file"
            ) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def atomic_write(path: Path, write: Callable[[BinaryIO], None], exclusive: bool = False) -> Path:
    """Call ``write`` on a temporary file in ``path``'s folder, fsync it, then rename it over ``path``
    (``exclusive``: create it, refusing a name that exists by then).

    A crash, a kill or a full disk leaves the previous file intact; a failure removes the
    temporary file and raises one :class:`ConvaeError`; temporaries of killed processes are
    removed by the next write to the same name.
    """
    path = Path(path)
    make_parent(path)
    prefix = f".{path.name}."
    remove_stale(path.parent, prefix)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}.", suffix=".tmp", dir=path.parent)
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; a result file gets the mode open() would give it
            os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        publish(Path(tmp), path, exclusive)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        err = write_failure(path, e)
        if err is not None:
            raise err from None
        raise
    return path


def atomic_write_bytes(path: Path, data: bytes, exclusive: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(data), exclusive)


def torch_bytes(obj: Any) -> bytes:
    """``torch.save``'s bytes. Serialised in memory first: torch reports a full disk as a
    RuntimeError that does not say so ("unexpected pos ..."); a plain file write says ENOSPC."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """``torch.save`` whole or not at all: a crash or a full disk leaves the previous file intact."""
    return atomic_write_bytes(Path(path), torch_bytes(obj))


def atomic_write_text(path: Path, text: str, exclusive: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(utf8(text)), exclusive)


def utf8(text: str) -> bytes:
    """``text`` as UTF-8; a file name that is not UTF-8 (decoded with surrogate escapes) as ``\\xNN``."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        return text.encode("utf-8", "backslashreplace")
