"""Data: sources decoded once into a cached uint8 tensor, splits, and on-device batches.

A source (``--data SRC``) is ``cifar10``, a folder (ImageFolder layout = labelled, plain
images = unlabelled) or a ``.tar``/``.tar.gz``/``.zip`` archive of either. Each is decoded
once into a uint8 ``N x C x H x W`` tensor cached under ``cache_dir``; training then slices
batches out of that tensor on the training device, with no per-sample Python in the loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torchvision.transforms.v2 import functional as TF

from .errors import ConvaeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
CACHE_VERSION = 2  # bump when the cached tensor's meaning changes

Log = Callable[[str], None]


@dataclass
class ImageSet:
    """A decoded source: ``images`` uint8 (N, C, H, W); ``labels`` int64 (N,) or None."""

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str]
    files: list[str]
    skipped: list[str] = field(default_factory=list)  # "path: reason" for each file left out
    source: str = ""

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor) -> "ImageSet":
        idx = index.tolist()
        return ImageSet(
            images=self.images[index],
            labels=None if self.labels is None else self.labels[index],
            classes=self.classes,
            files=[self.files[i] for i in idx] if self.files else [],
            source=self.source,
        )


# ----------------------------------------------------------------------------- conversion


def convert_images(x: torch.Tensor, channels: int, height: int, width: int) -> tuple[torch.Tensor, bool, bool]:
    """Bring decoded images (C, H, W) or (N, C, H, W), uint8 or uint16, to the configured format.

    Returns the uint8 result and whether the mode and the size were changed.
    """
    mode_changed = False
    if x.dtype == torch.uint16:  # 16-bit PNG: keep the high byte
        x = (x.to(torch.int32) >> 8).to(torch.uint8)
        mode_changed = True
    elif x.dtype != torch.uint8:
        raise ValueError(f"unsupported pixel type {x.dtype}")
    c = x.shape[-3]
    if c in (2, 4):  # drop alpha
        x = x[..., : c - 1, :, :]
        mode_changed = True
    c = x.shape[-3]
    if c != channels:
        mode_changed = True
        if c == 1:
            x = x.expand(*x.shape[:-3], channels, *x.shape[-2:])
        elif c == 3 and channels == 1:
            x = TF.rgb_to_grayscale(x)
        else:
            raise ValueError(f"cannot convert {c} channels to {channels}")
    resized = tuple(x.shape[-2:]) != (height, width)
    if resized:
        x = TF.resize(x, [height, width], antialias=True)
    return x.contiguous(), mode_changed, resized


def decode_file(path: Path, channels: int = 3, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, bool]:
    """Decode one image file with Pillow to a uint8 (channels, H, W) tensor.

    Returns the tensor and whether its mode had to change (grey, palette, alpha, 16-bit, ...).
    With ``size`` (height, width) a large JPEG is decoded at a reduced scale that still
    covers it. Runs once per file when a source is first cached, never in the training loop.
    """
    import numpy as np
    from PIL import Image

    target = "RGB" if channels == 3 else "L"
    with Image.open(path) as im:
        if size is not None and im.format == "JPEG":
            im.draft(target, (size[1], size[0]))  # a 4000x3000 photo need not be decoded whole
        im.load()  # truncated or corrupt files fail here, not later
        mode = im.mode
        if mode.startswith("I"):  # 16/32-bit integer grey: keep the high byte of 16 bits
            im = Image.fromarray((np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8), "L")
        if im.mode != target:
            im = im.convert(target)
        arr = np.asarray(im)
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return t, mode != target


def load_image(path: Path, channels: int, height: int, width: int) -> tuple[torch.Tensor, bool, bool]:
    """One file exactly as training sees it: decoded, converted and resized to (channels, height, width).

    Returns the uint8 tensor and whether its mode and its size were changed.
    """
    img, mode_changed = decode_file(path, channels, (height, width))
    img, _, resized = convert_images(img, channels, height, width)
    return img, mode_changed, resized


# ----------------------------------------------------------------------------- folders


def is_image_file(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if is_image_file(p) and p.is_file())


def scan_folder(root: Path) -> tuple[Path, list[Path], list[int] | None, list[str], list[str]]:
    """Find the images under ``root``; class folders make it labelled.

    A chain of single folders with no images (``train/<class>/...`` inside an archive) is
    descended first. Class folders without images are left out, with a note. Returns the
    dataset root, files, labels (or None), class names and those notes.
    """
    if not root.is_dir():
        raise ConvaeError(f"data folder not found: {root}")
    while True:
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        top_images = _image_files(root, recursive=False)
        if not top_images and len(subdirs) == 1 and not _image_files(subdirs[0], recursive=False):
            root = subdirs[0]
            continue
        break
    if top_images and subdirs:
        raise ConvaeError(
            f"{root} mixes images and sub-folders: use class folders only (labelled) "
            "or images only (unlabelled)"
        )
    if top_images:
        return root, top_images, None, [], []
    files: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    notes: list[str] = []
    for d in subdirs:
        found = _image_files(d, recursive=True)
        if not found:
            notes.append(f"{d.name}/: class folder without images; left out")
            continue
        files += found
        labels += [len(classes)] * len(found)
        classes.append(d.name)
    if not files:
        raise ConvaeError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return root, files, labels, classes, notes


# ----------------------------------------------------------------------------- archives


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
        raise ConvaeError(f"archive {name} would expand {ratio:,.0f}x to {expanded / 2**30:.1f} GiB; "
                          "refused as a possible archive bomb")
    free = shutil.disk_usage(dest).free
    if expanded > free:
        raise ConvaeError(f"archive {name} expands to {expanded / 2**30:.2f} GiB but only "
                          f"{free / 2**30:.2f} GiB are free under {dest}; nothing was extracted")


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
                    raise ConvaeError(f"archive {archive.name}: member {info.filename!r} lands outside the target; refused")
            _check_expansion(archive, len(infos), sum(i.file_size for i in infos), dest)
            zf.extractall(dest)
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
                    raise ConvaeError(f"archive {archive.name}: member {m.name!r} is not a regular file or folder; refused")
                if os.path.isabs(m.name) or not _inside(dest, m.name):
                    raise ConvaeError(f"archive {archive.name}: member {m.name!r} lands outside the target; refused")
            _check_expansion(archive, len(members), sum(m.size for m in members if m.isfile()), dest)
            tf.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ConvaeError(f"archive {archive} could not be read: {e}") from None


def extract_archive(archive: Path, cache_dir: Path, digest: str, log: Log) -> Path:
    """Extract once into the cache, keyed by content hash; a half-done extraction is never used."""
    final = cache_dir / "extracted" / digest[:16]
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
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


# ----------------------------------------------------------------------------- CIFAR-10


def _load_cifar10(train: bool, cache_dir: Path) -> tuple[torch.Tensor, list[int], list[str]]:
    from torchvision.datasets import CIFAR10

    root = cache_dir / "cifar10"
    try:
        ds = CIFAR10(root=str(root), train=train, download=True)
    except Exception as e:  # offline: URLError, socket errors, checksum failures
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConvaeError(
            f"could not download CIFAR-10 into {root} ({reason}); "
            "offline? pass --data PATH to a folder or archive of images instead"
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return images, list(ds.targets), list(ds.classes)


# ----------------------------------------------------------------------------- loading


def _cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _decode_all(files: list[Path], root: Path, channels: int, height: int, width: int, log: Log):
    from tqdm.auto import tqdm

    out = torch.empty((len(files), channels, height, width), dtype=torch.uint8)
    keep: list[int] = []
    skipped: list[str] = []
    n_mode = n_size = 0
    for i, f in enumerate(tqdm(files, desc="decoding", unit="img", leave=False, mininterval=1.0)):
        try:
            img, mode_changed, resized = load_image(f, channels, height, width)
        except Exception as e:  # noqa: BLE001 - any undecodable file is skipped and listed
            skipped.append(f"{f.relative_to(root)}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        out[len(keep)] = img
        keep.append(i)
        n_mode += mode_changed
        n_size += resized
    if n_mode or n_size:
        log(f"converted {n_mode} image(s) to {channels} channel(s), resized {n_size} to {height}x{width}")
    if skipped:
        log(f"skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
    return out[: len(keep)].clone(), keep, skipped


def load_source(
    src: str,
    channels: int = 3,
    height: int = 32,
    width: int = 32,
    cache_dir: str | Path = "~/.cache/convae",
    train: bool = True,
    log: Log = print,
) -> ImageSet:
    """Decode ``src`` once (cached) into an :class:`ImageSet` of the configured format.

    ``train`` picks CIFAR-10's split when ``src`` is ``cifar10``; folders and archives are
    read whole.
    """
    cache = Path(cache_dir).expanduser()
    fmt = {"channels": channels, "height": height, "width": width, "version": CACHE_VERSION}
    if src.lower() == "cifar10":
        key = _cache_key({"kind": "cifar10", "train": train, **fmt})
        loader = lambda: _from_cifar10(train, cache, channels, height, width, log)  # noqa: E731
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise ConvaeError(f"data source not found: {src} (expected cifar10, a folder or an archive)")
        if path.is_file():
            if not is_archive(path.name):
                raise ConvaeError(f"{src} is a file but not an archive ({', '.join(ARCHIVE_SUFFIXES)})")
            digest = file_sha256(path)
            key = _cache_key({"kind": "archive", "sha256": digest, **fmt})
            loader = lambda: _from_folder(extract_archive(path, cache, digest, log), channels, height, width, log)  # noqa: E731
        else:
            root = path.resolve()
            listing = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                       for p in sorted(root.rglob("*")) if p.is_file()]
            key = _cache_key({"kind": "folder", "path": str(root), "files": listing, **fmt})
            loader = lambda: _from_folder(root, channels, height, width, log)  # noqa: E731

    cached = cache / "tensors" / f"{key}.pt"
    if cached.is_file():
        try:
            d = torch.load(cached, weights_only=True)
            return ImageSet(d["images"], d["labels"], d["classes"], d["files"], d["skipped"], src)
        except Exception:
            log(f"cache file {cached} is unreadable; decoding again")
    ds = loader()
    ds.source = src
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{cached.name}.", suffix=".tmp", dir=cached.parent)
    with os.fdopen(fd, "wb") as f:
        torch.save({"images": ds.images, "labels": ds.labels, "classes": ds.classes,
                    "files": ds.files, "skipped": ds.skipped}, f)
    os.replace(tmp, cached)  # a killed run never leaves half a cache file under the real name
    return ds


def _from_cifar10(train: bool, cache: Path, channels: int, height: int, width: int, log: Log) -> ImageSet:
    images, labels, classes = _load_cifar10(train, cache)
    images, mode_changed, resized = convert_images(images, channels, height, width)
    if mode_changed or resized:
        log(f"converted {len(images)} CIFAR-10 images to {channels}x{height}x{width}")
    split = "train" if train else "test"
    return ImageSet(images, torch.tensor(labels, dtype=torch.int64), classes,
                    [f"cifar10/{split}/{i}" for i in range(len(labels))])


def _from_folder(path: Path, channels: int, height: int, width: int, log: Log) -> ImageSet:
    root, files, labels, classes, notes = scan_folder(path)
    for note in notes:
        log(f"warning: {note}")
    log(f"decoding {len(files)} images from {root}" + (f" ({len(classes)} classes)" if classes else " (unlabelled)"))
    images, keep, skipped = _decode_all(files, root, channels, height, width, log)
    if len(keep) == 0:
        raise ConvaeError(f"none of the {len(files)} image files under {root} could be decoded")
    lab = None if labels is None else torch.tensor([labels[i] for i in keep], dtype=torch.int64)
    rel = [str(files[i].relative_to(root)) for i in keep]
    return ImageSet(images, lab, classes, rel, notes + skipped)


# ----------------------------------------------------------------------------- splits


def split_indices(labels: torch.Tensor | None, n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train/validation split, stratified by class when there are labels.

    Each class with at least two images keeps at least one on each side.
    Returns sorted index tensors (train, val).
    """
    g = torch.Generator().manual_seed(seed)
    if labels is None:
        perm = torch.randperm(n, generator=g)
        k = min(max(round(n * val_fraction), 1), n - 1) if n >= 2 else 0
        return perm[k:].sort().values, perm[:k].sort().values
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(len(idx) * val_fraction)
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def per_class_subset(labels: torch.Tensor, index: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Keep at most ``per_class`` seeded picks of each class among ``index`` (the few-labels case)."""
    g = torch.Generator().manual_seed(seed + 1)  # a different stream from the split's
    lab = labels[index]
    keep = []
    for c in torch.unique(lab).tolist():
        idx = index[lab == c]
        keep.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(keep).sort().values


# ----------------------------------------------------------------------------- batches


class DeviceBatches:
    """Mini-batches sliced from a uint8 tensor that lives on the training device.

    Yields float images scaled to [0, 1] (as the lecture's ToTensor) and labels (or None).
    The permutation of epoch ``e`` depends only on ``(seed, e)``, so an epoch can be replayed.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        batch_size: int = 2000,
        shuffle: bool = False,
        seed: int = 0,
        channels_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.rank, self.world_size = rank, world_size  # each rank takes a strided shard of every batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.images.shape[0] // self.batch_size)

    @property
    def num_images(self) -> int:
        """Images in an epoch, over all ranks."""
        return self.images.shape[0]

    def global_size(self, batch_index: int) -> int:
        """Images in batch ``batch_index`` over all ranks (the last batch may be short)."""
        return min(self.batch_size, self.images.shape[0] - batch_index * self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return self.iterate(0)

    def iterate(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The epoch's batches from batch ``start_batch`` on (to continue an interrupted epoch)."""
        n = self.images.shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g).to(self.images.device, non_blocking=True)
        else:
            order = None
        for start in range(start_batch * self.batch_size, n, self.batch_size):
            if order is None:
                x = self.images[start : start + self.batch_size]
                y = None if self.labels is None else self.labels[start : start + self.batch_size]
            else:
                idx = order[start : start + self.batch_size][self.rank :: self.world_size]
                x = self.images[idx]
                y = None if self.labels is None else self.labels[idx]
            x = x.float().div_(255).contiguous(memory_format=self.memory_format)
            yield x, y
