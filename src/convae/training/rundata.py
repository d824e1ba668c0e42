"""The images one training run uses: training set, labelled subset, evaluation set."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config
from ..config.validation import validate_model
from ..data.batches import per_class_subset, split_indices
from ..data.sources import ImageSet, check_source, load_source
from ..utils.errors import ConvaeError
from ..utils.records import Log


@dataclass
class RunData:
    """The images a run trains and evaluates on (uint8, on the CPU until moved)."""

    train: ImageSet  # every training image: pretraining uses all of them, without labels
    finetune: ImageSet | None  # the labelled images for fine-tuning (maybe N per class)
    val: ImageSet  # the evaluation set: a validation split, or the separate test source
    eval_name: str  # what the evaluation set is, in full: "validation split (10% of SRC, seed 0)"
    eval_label: str  # its short name for figure titles and captions: "validation split"
    classes: list[str]
    skipped: list[str]  # "file: reason" for every file that could not be decoded
    keys: dict[str, str]  # each source's cache key ("data", "test_data"): what a resume must find unchanged


def check_model_for(cfg: Config, data: RunData, classifier: bool) -> None:
    """Before any folder or model is made: a classifier needs two classes, and the model's size (its
    head's from the data's classes) must be one this machine can train."""
    if classifier and len(data.classes) < 2:
        raise ConvaeError(f"{cfg.data} has {len(data.classes)} class folder(s): a classifier needs at least 2")
    validate_model(cfg.model_config(num_classes=len(data.classes) or 1))


def prepare_data(cfg: Config, need_labels: bool, log: Log, source: ImageSet | None = None) -> RunData:
    """Decode ``cfg.data`` (and ``cfg.test_data``), carve the validation split, pick the labelled subset.

    ``source``, when given, is the training set already in memory (the Python API's tensors
    and Datasets) and ``cfg.data`` only names it.
    """
    for src in (cfg.data if source is None else None, cfg.test_data):  # every path, before any decoding
        if src is not None:
            check_source(src)
    fmt = dict(
        channels=cfg.in_channels,
        height=cfg.height,
        width=cfg.width,
        cache_dir=cfg.cache_dir,
        log=log,
        workers=cfg.workers,
    )
    full = source if source is not None else load_source(cfg.data, train=True, **fmt)
    if need_labels and not full.labelled:
        raise ConvaeError(
            f"{cfg.data} has no class folders (unlabelled): fine-tuning needs labelled data",
            advice="use it with 'convae pretrain', or pass labelled --data",
        )
    if cfg.test_data:
        test = load_source(cfg.test_data, train=False, **fmt)
        if need_labels and not test.labelled:
            raise ConvaeError(f"the test data {cfg.test_data} has no class folders: evaluation needs labels")
        if full.labelled and test.labelled and test.classes != full.classes:
            raise ConvaeError(f"the test data's classes {test.classes} differ from the training data's {full.classes}")
        train, val, label = full, test, "test data"
        eval_name = f"{label} ({cfg.test_data})"
        skipped = full.skipped + [f"{cfg.test_data}: {s}" for s in test.skipped]
    else:
        if len(full) < 2:
            raise ConvaeError(f"{cfg.data} holds {len(full)} image(s): too few to carve a validation split")
        tr, va = split_indices(full.labels, len(full), cfg.val_fraction, cfg.seed)
        if len(va) == 0 or len(tr) == 0:
            raise ConvaeError(
                f"{cfg.data} holds {len(full)} image(s): a validation split of "
                f"{100 * cfg.val_fraction:g}% leaves {len(tr)} to train on and {len(va)} to evaluate",
                advice="pass a larger --val-fraction, more images, or --test-data SRC",
            )
        train, val = full.subset(tr), full.subset(va)
        label = "validation split"
        eval_name = f"{label} ({100 * cfg.val_fraction:g}% of {cfg.data}, seed {cfg.seed})"
        skipped = full.skipped
    finetune = None
    if full.labelled:
        finetune = train
        if cfg.labels_per_class:
            pick = per_class_subset(train.labels, torch.arange(len(train)), cfg.labels_per_class, cfg.seed)
            finetune = train.subset(pick)
            fewest = int(torch.bincount(train.labels, minlength=len(full.classes)).min())
            if need_labels and fewest < cfg.labels_per_class:
                log(
                    f"warning: labels_per_class {cfg.labels_per_class}: a class has only {fewest} training "
                    f"image(s), and all of them are used ({len(finetune)} labelled in all)"
                )
    labelled = (
        f", {len(full.classes)} classes, {len(finetune)} labelled for fine-tuning"
        if need_labels
        else f", {len(full.classes)} classes (the labels are not used)"
        if finetune is not None
        else ", unlabelled"
    )
    log(f"data: {len(train)} training and {len(val)} evaluation images{labelled}; evaluating on the {eval_name}")
    keys = {"data": full.key, **({"test_data": val.key} if cfg.test_data else {})}
    return RunData(train, finetune, val, eval_name, label, full.classes, skipped, keys)
