"""Archives (.tar, .tar.gz, .tgz, .zip) extracted safely, once, into the cache."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ..utils.errors import ConvaeError, clip, first_line
from ..utils.files import remove_stale
from ..utils.records import Log

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES)


def is_archive(src: str) -> bool:
    return src.lower().endswith(ARCHIVE_SUFFIXES)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inside(dest: Path, name: str) -> bool:
    target = (dest / name).resolve()
    return target == dest or dest in target.parents


# An archive is refused before extraction when it would expand past these (archive bombs).
MAX_MEMBERS = 5_000_000  # ImageNet's training set is 1.3 million files
MAX_RATIO = 200  # expanded bytes per archive byte; images hardly compress, bombs do ...
RATIO_MIN_BYTES = 1 << 30  # ... but tiny archives of text-like files may, harmlessly


def _check_expansion(archive: Path, members: int, expanded: int, dest: Path) -> None:
    name = archive.name
    if members > MAX_MEMBERS:
        raise ConvaeError(f"archive {name} holds over {MAX_MEMBERS:,} members; refused as a possible archive bomb")
    ratio = expanded / max(archive.stat().st_size, 1)
    if expanded > RATIO_MIN_BYTES and ratio > MAX_RATIO:
        raise ConvaeError(
            f"archive {name} would expand {ratio:,.0f}x to {expanded / 2**30:.1f} GiB; "
            "refused as a possible archive bomb"
        )
    free = shutil.disk_usage(dest).free
    if expanded > free:
        raise ConvaeError(
            f"archive {name} expands to {expanded / 2**30:.2f} GiB but only "
            f"{free / 2**30:.2f} GiB are free under {dest}; nothing was extracted"
        )


ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into ``dest``: regular files and folders only, none outside ``dest``.

    Every member is checked, and the expansion measured, before anything is written.
    """
    dest = dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise ConvaeError(f"archive {archive.name}: member {info.filename!r} is a link; refused")
                if os.path.isabs(info.filename) or not _inside(dest, info.filename):
                    raise ConvaeError(
                        f"archive {archive.name}: member {info.filename!r} lands outside the target; refused"
                    )
                if info.flag_bits & 0x1:
                    raise ConvaeError(
                        f"archive {archive.name}: member {clip(repr(info.filename), 80)} is encrypted; "
                        "convae reads unencrypted archives only"
                    )
                if info.compress_type not in ZIP_METHODS:
                    raise ConvaeError(
                        f"archive {archive.name}: member {clip(repr(info.filename), 80)} uses zip "
                        f"compression method {info.compress_type}, which Python cannot read; "
                        "recompress it (stored, deflate, bzip2 or lzma)"
                    )
            _check_expansion(archive, len(infos), sum(i.file_size for i in infos), dest)
            try:
                zf.extractall(dest)
            except (
                zipfile.BadZipFile,
                zipfile.LargeZipFile,
                EOFError,
                ValueError,
                NotImplementedError,
                RuntimeError,
            ) as e:  # bad CRC, truncated, a method or an encryption it cannot read
                raise ConvaeError(f"archive {archive.name} is damaged: {clip(first_line(e), 120)}") from None
        return
    try:
        with tarfile.open(archive) as tf:
            members = []
            for m in tf:  # one pass over the headers; stops early on a member bomb
                members.append(m)
                if len(members) > MAX_MEMBERS:
                    _check_expansion(archive, len(members), 0, dest)
            for m in members:
                if not (m.isfile() or m.isdir()):
                    raise ConvaeError(
                        f"archive {archive.name}: member {m.name!r} is not a regular file or folder; refused"
                    )
                if os.path.isabs(m.name) or not _inside(dest, m.name):
                    raise ConvaeError(f"archive {archive.name}: member {m.name!r} lands outside the target; refused")
            _check_expansion(archive, len(members), sum(m.size for m in members if m.isfile()), dest)
            tf.extractall(dest, members=members, filter="data")
    except OSError as e:
        if e.errno in WRITE_ERRNOS:  # the extraction's writes, not the archive, failed
            raise ConvaeError(f"could not extract {archive.name} into {dest}: {e.strerror}") from None
        raise ConvaeError(f"archive {archive} could not be read: {clip(first_line(e), 120)}") from None
    except (tarfile.TarError, EOFError) as e:
        raise ConvaeError(f"archive {archive} could not be read: {clip(first_line(e), 120)}") from None


def extract_archive(archive: Path, cache_dir: Path, digest: str, log: Log) -> Path:
    """Extract once into the cache, keyed by content hash; a half-done extraction is never used."""
    final = cache_dir / "extracted" / digest[:16]
    if final.is_dir():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(final.parent, ".tmp-")  # extractions of killed processes
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=final.parent))
    except OSError as e:
        raise ConvaeError(f"could not use the cache folder {final.parent}: {e.strerror}") from None
    try:
        log(f"extracting {archive.name} into the cache")
        safe_extract(archive, tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # another process (a DDP rank) finished the same extraction first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
