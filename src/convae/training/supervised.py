"""Supervised fine-tuning (``--joint off``): the classifier on the labelled set, repeated to ``epoch_images``
per epoch, with the recipe's cross-entropy (label smoothing)."""

from __future__ import annotations

from ..config.modes import TrainingMode, register_training_mode
from ..data import DeviceBatches
from .loop import classification_loss
from .recipe import repeats


@register_training_mode
class Supervised(TrainingMode):
    name, label = "off", "supervised"

    def build(self, clf, labelled, unlabelled, classes, cfg, device, seed, rank=0, world_size=1, decoder=None):
        batches = DeviceBatches.of(
            labelled,
            device,
            cfg.batch_size,
            shuffle=True,
            seed=seed,
            rank=rank,
            world_size=world_size,
            placement=cfg.placement,
        ).repeated(repeats(len(labelled), cfg.epoch_images))
        return clf, batches, classification_loss(cfg.label_smoothing), None

    def describe(self, cfg, labelled: int, batches) -> str:
        return f"fine-tuning batches: {batches.describe()}"
