"""Splits (seeded, stratified), few-label subsets, and batches sliced on the training device."""

from __future__ import annotations

from typing import Iterator

import torch

from .images import to_model_input


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
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
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
            x = to_model_input(x)
            yield x, y
