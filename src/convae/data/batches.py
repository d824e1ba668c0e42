"""Splits (seeded, stratified), few-label subsets, and batches: sliced on the training device, or read
from the source on the host and prefetched (placement by size)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch

from .images import to_model_input
from .sources import ImageSet

PLACEMENTS = ("auto", "device", "host")  # where the training images live (the --placement choices)


def split_indices(
    labels: torch.Tensor | None, n: int, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
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

DEVICE_SHARE = 0.5  # "auto" puts a set on the GPU when it takes at most this share of the free memory
PREFETCH = 2  # host batches read ahead of the one training


def resolve_placement(placement: str, nbytes: int, device: torch.device) -> str:
    """Where a set's images live while training: ``device`` (one tensor on the training device,
    batches sliced from it) or ``host`` (batches read from the source, prefetched, copied over).

    ``auto``: on a GPU, the device when the set fits with room to spare, else the host; on the
    CPU always the host, since a cached source is already in memory (the page cache) and a
    second copy in the process would only double it.
    """
    if placement != "auto":
        assert placement in PLACEMENTS, placement
        return placement
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return "device" if nbytes <= DEVICE_SHARE * free else "host"
    return "host" if device.type == "cpu" else "device"


def on_device(ds: ImageSet, device: torch.device, chunk: int = 8192) -> torch.Tensor:
    """The set's images as one uint8 tensor on ``device``, copied in chunks (no second full copy on the host).
    On the CPU: in the process's memory, read from the cache file when there is one."""
    if device.type == "cpu":
        return ds.tensor() if ds.file is None else ds.take(torch.arange(len(ds)))
    out = torch.empty(ds.shape, dtype=torch.uint8, device=device)
    for i, x in enumerate(ds.chunks(chunk)):
        out[i * chunk : i * chunk + len(x)].copy_(x)
    return out


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetched(items: Iterator, depth: int = PREFETCH) -> Iterator:
    """``items`` produced by a background thread up to ``depth`` ahead (reads overlap training).

    An error in the thread is raised here; closing this generator stops the thread.
    """
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:
            put(_Failed(e))

    thread = threading.Thread(target=work, name="convae-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


class DeviceBatches:
    """Mini-batches of images on the training device.

    Yields float images scaled to [0, 1] (as the lecture's ToTensor) and labels (or None).
    The permutation of epoch ``e`` depends only on ``(seed, e)``, so an epoch can be replayed.
    Built from a uint8 tensor (already where it should be), or by :meth:`of` from an
    :class:`ImageSet` with a placement: both placements give the same batches in the same order.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        batch_size: int = 2000,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images: torch.Tensor | None = images
        self.source: ImageSet | None = None  # the host placement reads its batches from here
        self.labels = labels
        self.device = images.device
        self.n = images.shape[0]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.rank, self.world_size = rank, world_size  # each rank takes a strided shard of every batch
        self.repeat = 1  # passes over the set per epoch, each reshuffled (few labels, enough steps)
        # the fewest images the last batch may have; a shorter remainder joins the batch before it
        # (a network with batch norm cannot train on one image: :func:`convae.loop.keep_last_batch_trainable`)
        self.min_last = 1

    @classmethod
    def of(
        cls,
        ds: ImageSet,
        device: torch.device,
        batch_size: int,
        labels: bool = True,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        placement: str = "auto",
    ) -> DeviceBatches:
        """Batches of ``ds`` on ``device``; ``placement`` as :func:`resolve_placement`. On the host
        each rank reads only its own shard of every batch from the source."""
        where = resolve_placement(placement, ds.nbytes, device)
        y = ds.labels if labels else None
        if where == "device":
            return cls(
                on_device(ds, device), None if y is None else y.to(device), batch_size, shuffle, seed, rank, world_size
            )
        b = cls(ds.store[:0], y, batch_size, shuffle, seed, rank, world_size)
        b.images, b.source, b.device, b.n = None, ds, device, len(ds)
        return b

    @property
    def placement(self) -> str:
        return "host" if self.source is not None else "device"

    def describe(self) -> str:
        """Where the batches come from, for the log."""
        gib = self.n * (self.images if self.source is None else self.source.store)[0:1].numel() / 2**30
        passes = f", {self.repeat} passes per epoch" if self.repeat > 1 else ""
        if self.source is None:
            return f"{self.n} images ({gib:.2f} GiB) held on {self.device} (placement device){passes}"
        return (
            f"{self.n} images ({gib:.2f} GiB) read from the {'cache file' if self.source.file else 'host'} "
            f"batch by batch, prefetched, to {self.device} (placement host){passes}"
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def repeated(self, times: int) -> DeviceBatches:
        """Every epoch ``times`` passes over the set, each in its own order, batched as one stream."""
        if times > 1 and not self.shuffle:
            raise ValueError("only shuffled batches repeat")
        self.repeat = max(1, times)
        return self

    def indexed(self) -> DeviceBatches:
        """Each image's position in the set in place of its label (the key of a per-image memory)."""
        where = self.images.device if self.images is not None and self.source is None else torch.device("cpu")
        self.labels = torch.arange(self.n, device=where)
        return self

    def __len__(self) -> int:
        n, b = self.num_images, self.batch_size
        count = -(-n // b)
        # a remainder shorter than min_last is read with the batch before it
        return count - 1 if count > 1 and 0 < n % b < self.min_last else count

    @property
    def num_images(self) -> int:
        """Images in an epoch, over all ranks."""
        return self.n * self.repeat

    def global_size(self, batch_index: int) -> int:
        """Images in batch ``batch_index`` over all ranks (the last batch may be short, or hold the
        remainder shorter than ``min_last``)."""
        start = batch_index * self.batch_size
        return (self.num_images if batch_index == len(self) - 1 else start + self.batch_size) - start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return self.iterate(0)

    def _order(self) -> torch.Tensor:
        """The epoch's permutation: a function of (seed, epoch) only."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.repeat == 1:
            return torch.randperm(self.n, generator=g)
        return torch.cat([torch.randperm(self.n, generator=g) for _ in range(self.repeat)])

    def positions(self, start_batch: int = 0, order: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """The positions in the set of this rank's images of every batch from ``start_batch`` on
        (taken from ``order``, the epoch's permutation wherever it lives, when shuffling)."""
        if self.shuffle and order is None:
            order = self._order()
        for i in range(start_batch, len(self)):
            start = i * self.batch_size
            end = start + self.global_size(i)
            if self.shuffle:
                yield order[start:end][self.rank :: self.world_size]
            else:
                yield torch.arange(start, end)

    def iterate(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The epoch's batches from batch ``start_batch`` on (to continue an interrupted epoch)."""
        if self.source is None:
            assert self.images is not None
            # the permutation goes to the device once per epoch, not once per batch
            order = self._order().to(self.device, non_blocking=True) if self.shuffle else None
            for pos in self.positions(start_batch, order):
                if not self.shuffle:  # a slice: a view, no copy
                    x = self.images[int(pos[0]) : int(pos[-1]) + 1]
                    y = None if self.labels is None else self.labels[int(pos[0]) : int(pos[-1]) + 1]
                else:
                    x = self.images[pos]
                    y = None if self.labels is None else self.labels[pos]
                yield to_model_input(x), y
            return
        ds, pin = self.source, self.device.type == "cuda"
        host = (
            (ds.take(pos, pin=pin), None if self.labels is None else self.labels[pos])
            for pos in self.positions(start_batch)
        )
        for x, y in prefetched(host):
            x = x.to(self.device, non_blocking=True)
            yield to_model_input(x), None if y is None else y.to(self.device, non_blocking=True)
