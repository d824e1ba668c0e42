"""Sources decoded once into a cached uint8 tensor: CIFAR-10, folders and archives.

A source (``--data SRC``) is ``cifar10``, a folder (ImageFolder layout = labelled, plain
images = unlabelled) or a ``.tar``/``.tar.gz``/``.zip`` archive of either. Each is decoded
once into a uint8 ``N x C x H x W`` array cached under ``cache_dir`` and opened as an
:class:`ImageSet`; training then takes whole batches of rows from it (``data.batches``), with no
per-sample Python in the loop.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from ..utils.errors import ConvaeError, first_line
from ..utils.records import Log
from .archives import ARCHIVE_SUFFIXES, extract_archive, file_sha256, is_archive
from .cache import read_cache, write_cache, writer_lock
from .decode import Chunks, decode_files, remove_partial
from .images import IMAGE_EXTENSIONS, convert_images, is_image_file, printable
from .rows import MappedFile, gather

MAX_CLASSES = 1_000_000  # a head of this many outputs, and its list of names, still fit in memory


@dataclass
class ImageSet:
    """A decoded source, or a part of one: its images uint8 (N, C, H, W), ``labels`` int64 (N,) or None.

    ``store`` is the source's uint8 tensor (a memory map of ``file`` when cached); a part
    (:meth:`subset`: a split, a few-labels pick) is the rows ``index`` of it, nothing copied.
    Read a big set with :meth:`take` and :meth:`chunks`; :attr:`images` is the whole set in one tensor.
    """

    store: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str]
    files: list[str]
    skipped: list[str] = field(default_factory=list)  # "path: reason" for each file left out
    source: str = ""
    key: str = ""  # the cache key: changes when the source's files, the format or the decoder change
    index: torch.Tensor | None = None  # the rows of ``store`` in this set; None: all of them
    file: MappedFile | None = None  # the cache file ``store`` maps, read row by row by ``take``

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return self.store.shape[0] if self.index is None else len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.store.shape[1:])

    @property
    def rows(self) -> torch.Tensor:
        """The rows of ``store`` in this set, in order."""
        return torch.arange(self.store.shape[0]) if self.index is None else self.index

    @property
    def nbytes(self) -> int:
        return len(self) * self.store[0].numel() if len(self.store) else 0

    @property
    def images(self) -> torch.Tensor:
        """The whole set as one uint8 tensor: the source itself (maybe its memory map), or a part's
        rows gathered into memory on every access (keep the result; a big set reads :meth:`chunks`)."""
        return self.tensor()

    def take(self, positions: torch.Tensor, pin: bool = False) -> torch.Tensor:
        """Images ``positions`` of this set, uint8 (len(positions), C, H, W), read from the cache file
        when there is one (only those rows enter memory)."""
        rows = positions.cpu() if self.index is None else self.index[positions.cpu()]
        return gather(self.store, rows, self.file, pin)

    def chunks(self, size: int):
        """This set's images in order, ``size`` at a time (for features and predictions of big sets)."""
        for start in range(0, len(self), size):
            yield self.take(torch.arange(start, min(start + size, len(self))))

    def tensor(self) -> torch.Tensor:
        """:attr:`images`."""
        return self.store if self.index is None else self.take(torch.arange(len(self)))

    def subset(self, index: torch.Tensor) -> ImageSet:
        """The images ``index`` (positions in this set) as a set of their own, sharing the rows."""
        idx = index.tolist()
        return ImageSet(
            store=self.store,
            labels=None if self.labels is None else self.labels[index],
            classes=self.classes,
            files=[self.files[i] for i in idx] if self.files else [],
            source=self.source,
            key=self.key,
            index=self.rows[index],
            file=self.file,
        )


# ----------------------------------------------------------------------------- folders


def _image_files(folder: Path, recursive: bool, notes: list[str], root: Path) -> list[Path]:
    """Image files under ``folder``. Links to folders are never followed, at any level (a link to
    ``.`` would duplicate every image, one outside the source would read foreign files): each is
    left out with a note. Links to files are read, as datasets of linked files are common."""
    it = folder.rglob("*") if recursive else folder.iterdir()
    files = []
    for p in it:
        if p.is_symlink() and p.is_dir():
            notes.append(
                f"{printable(p.relative_to(root))}/: a link to a folder; left out (folder links are not followed)"
            )
        elif is_image_file(p) and p.is_file():
            files.append(p)
    return sorted(files)


def _folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))


def scan_folder(root: Path) -> tuple[Path, list[Path], list[int] | None, list[str], list[str]]:
    """Find the images under ``root``; class folders make it labelled.

    A chain of single folders with no images (``train/<class>/...`` inside an archive) is
    descended first. Class folders without images, and links to folders, are left out with a
    note. Returns the dataset root, files, labels (or None), class names and those notes.
    """
    if not root.is_dir():
        raise ConvaeError(f"data folder not found: {root}")
    top = root
    while True:
        notes: list[str] = []
        subdirs = _folders(root)
        top_images = _image_files(root, False, notes, top)
        if not top_images and len(subdirs) == 1 and not _image_files(subdirs[0], False, [], top):
            root = subdirs[0]
            continue
        break
    if top_images and subdirs:
        raise ConvaeError(
            f"{root} mixes images and sub-folders: use class folders only (labelled) or images only (unlabelled)"
        )
    if top_images:
        return root, top_images, None, [], notes
    files: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    for d in subdirs:
        found = _image_files(d, True, notes, top)
        if not found:
            notes.append(f"{printable(d.name)}/: class folder without images; left out")
            continue
        files += found
        labels += [len(classes)] * len(found)
        classes.append(printable(d.name))
    if not files:
        raise ConvaeError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return root, files, labels, classes, notes


# ----------------------------------------------------------------------------- CIFAR-10


def _load_cifar10(train: bool, cache_dir: Path) -> tuple[torch.Tensor, list[int], list[str]]:
    from torchvision.datasets import CIFAR10

    root = cache_dir / "cifar10"
    existed = root.exists()
    try:
        ds = CIFAR10(root=str(root), train=train, download=True)
    except Exception as e:  # offline: URLError, socket errors, checksum failures
        if not existed:  # what the failed download left (an empty folder, a part of the archive): no cache entry
            shutil.rmtree(root, ignore_errors=True)
        raise ConvaeError(
            f"could not download CIFAR-10 into {root}: {first_line(e)} (offline, or the server cannot be reached)",
            advice="pass --data PATH to a folder or archive of images instead",
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return images, list(ds.targets), list(ds.classes)


# ----------------------------------------------------------------------------- loading


def _cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def check_source(src: str) -> None:
    """Refuse a source that cannot be read, before anything else is decoded or written."""
    if src.lower() == "cifar10":
        return
    path = Path(src).expanduser()
    if not path.exists():
        raise ConvaeError(f"data source not found: {src} (expected cifar10, a folder or an archive)")
    if path.is_file() and not is_archive(path.name):
        raise ConvaeError(f"{src} is a file but not an archive ({', '.join(ARCHIVE_SUFFIXES)})")


def load_source(
    src: str,
    channels: int = 3,
    height: int = 32,
    width: int = 32,
    cache_dir: str | Path = "~/.cache/convae",
    train: bool = True,
    log: Log = print,
    workers: int = 0,
) -> ImageSet:
    """Decode ``src`` once (cached) into an :class:`ImageSet` of the configured format.

    ``train`` picks CIFAR-10's split when ``src`` is ``cifar10``; folders and archives are
    read whole, decoded by ``workers`` processes (0 = every core).
    """
    check_source(src)
    cache = Path(cache_dir).expanduser()
    fmt = {"channels": channels, "height": height, "width": width}  # the format version is in meta.json
    if src.lower() == "cifar10":
        key = _cache_key({"kind": "cifar10", "train": train, **fmt})
        loader = lambda: _from_cifar10(train, cache, channels, height, width, log)
    else:
        path = Path(src).expanduser()
        if path.is_file():
            digest = file_sha256(path)
            key = _cache_key({"kind": "archive", "sha256": digest, **fmt})
            loader = lambda: _from_folder(
                extract_archive(path, cache, digest, log), channels, height, width, log, workers, partial
            )
        else:
            root = path.resolve()
            listing = [
                (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(root.rglob("*"))
                if p.is_file()
            ]
            key = _cache_key({"kind": "folder", "path": str(root), "files": listing, **fmt})
            loader = lambda: _from_folder(root, channels, height, width, log, workers, partial)

    cached = cache / "tensors" / key
    partial = cache / "tensors" / f"{key}.partial"  # the chunks of a decode in progress (or killed)
    d = read_cache(cached, lambda m: None)
    if d is not None:
        return _cached_set(d, src, key)
    with writer_lock(cache / "tensors" / f"{key}.lock", log):  # one decode per key: a second waits, then reads it
        d = read_cache(cached, log)
        if d is not None:
            return _cached_set(d, src, key)
        write_cache(cached, *loader())
        remove_partial(partial)
    d = read_cache(cached, log)  # from the file just written, as every later run opens it
    if d is None:  # pragma: no cover - written a moment ago
        raise ConvaeError(f"the cache {cached} could not be read back after writing it")
    return _cached_set(d, src, key)


def _cached_set(d: dict, src: str, key: str) -> ImageSet:
    return ImageSet(d["images"], d["labels"], d["classes"], d["files"], d["skipped"], src, key, file=d["file"])


class Decoded(NamedTuple):
    """A source just decoded, as the cache writes it: images (one tensor or chunks of one)."""

    images: torch.Tensor | Chunks
    labels: torch.Tensor | None
    classes: list[str]
    files: list[str]
    skipped: list[str]


def _from_cifar10(train: bool, cache: Path, channels: int, height: int, width: int, log: Log) -> Decoded:
    images, labels, classes = _load_cifar10(train, cache)
    images, mode_changed, resized = convert_images(images, channels, height, width)
    if mode_changed or resized:
        log(f"converted {len(images)} CIFAR-10 images to {channels}x{height}x{width}")
    split = "train" if train else "test"
    return Decoded(
        images,
        torch.tensor(labels, dtype=torch.int64),
        classes,
        [f"cifar10/{split}/{i}" for i in range(len(labels))],
        [],
    )


def _from_folder(
    path: Path, channels: int, height: int, width: int, log: Log, workers: int = 0, partial: Path | None = None
) -> Decoded:
    root, files, labels, classes, notes = scan_folder(path)
    for note in notes:
        log(f"warning: {note}")
    log(f"decoding {len(files)} images from {root}" + (f" ({len(classes)} classes)" if classes else " (unlabelled)"))
    images, keep, skipped = decode_files(files, root, channels, height, width, log, workers, partial)
    if len(keep) == 0:
        raise ConvaeError(f"none of the {len(files)} image files under {root} could be decoded")
    lab = None if labels is None else torch.tensor([labels[i] for i in keep], dtype=torch.int64)
    rel = [printable(files[i].relative_to(root)) for i in keep]
    return Decoded(images, lab, classes, rel, notes + skipped)
