"""``convae evaluate``: a trained checkpoint scored on a labelled source, its frozen encoder probed."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from torch import nn

from ..config import INFERENCE_BATCH_SIZE, Config, build_config
from ..data import DeviceBatches, ImageSet, load_source
from ..data.sources import check_source
from ..evaluation.metrics import class_results, evaluate_classifier, format_class_table
from ..evaluation.probes import bank_size, frozen_representation
from ..outputs import figures
from ..outputs.checkpoint import open_model
from ..outputs.report import write_report
from ..outputs.rundir import RunDir
from ..utils.device import provenance
from ..utils.errors import ConvaeError
from ..utils.records import Log, Representation, Results

EVALUATE_KEYS = ("data", "cache_dir", "workers", "batch_size", "probe_features", "precision", "seed", "device")


def evaluate_checkpoint(cfg: Config, checkpoint: str, train_data: str | None, log: Log) -> Results:
    """A checkpoint on every image of ``cfg.data`` (``cifar10`` = its test split).

    A classifier is scored as a classifier. With ``train_data`` (labelled) the checkpoint's
    frozen encoder is also scored by kNN and a linear probe trained on ``train_data``'s
    features, next to the same architecture with random weights. With ``cfg.out`` it is all written there.
    """
    for src in (cfg.data, train_data):  # every path, before anything is opened or decoded
        if src is not None:
            check_source(src)
    model, payload, device = open_model(checkpoint, cfg.device)
    cfg = cfg.for_device(device, log)
    is_classifier = payload["kind"] == "classifier"
    if not is_classifier and train_data is None:
        raise ConvaeError(
            f"{checkpoint} holds an autoencoder: evaluating it needs labelled training images "
            "for the kNN bank and the linear probe",
            advice="pass --train-data SRC",
        )
    if cfg.out:
        RunDir.check_free(cfg.out)
    m = model.config
    ds = load_source(
        cfg.data, m.in_channels, m.height, m.width, cfg.cache_dir, train=False, log=log, workers=cfg.workers
    )
    if not ds.labelled:
        raise ConvaeError(f"{cfg.data} has no class folders: evaluation needs labelled data")
    classes = payload.get("classes") or ds.classes
    if is_classifier and ds.classes != classes:
        raise ConvaeError(f"{cfg.data} has classes {ds.classes}, the checkpoint was trained on {classes}")
    results: Results = {
        "eval_set": cfg.data,
        "eval_label": cfg.data,
        "checkpoint": str(checkpoint),
        "precision": cfg.precision,
        "provenance": provenance(device, cfg.precision),
        "kernel_shape": list(model.encoder.kernels().shape),
    }
    if is_classifier:
        r = evaluate_classifier(model, DeviceBatches.of(ds, device, cfg.batch_size), len(classes), cfg.precision)
        results.update(class_results(r["confusion_matrix"], classes))
        results["loss"] = r["loss"]
        log(f"accuracy on {cfg.data}: {100 * results['accuracy']:.2f}% of {results['num_images']} images")
        log(format_class_table(results))
    if train_data is not None:
        results["representation"] = _probe(cfg, model.encoder, ds, train_data, f"{payload['kind']}'s, frozen", log)
    if cfg.out:
        _write(cfg, checkpoint, train_data, results, ds, classes if is_classifier else None, log)
    return results


def _probe(cfg: Config, encoder: nn.Module, ds: ImageSet, train_data: str, what: str, log: Log) -> Representation:
    """kNN and linear probe of the frozen ``encoder`` with ``train_data`` as the labelled bank,
    beside the same architecture with random weights."""
    m = encoder.config
    bank = load_source(
        train_data, m.in_channels, m.height, m.width, cfg.cache_dir, train=True, log=log, workers=cfg.workers
    )
    if not bank.labelled or bank.classes != ds.classes:
        raise ConvaeError(f"the training data {train_data} must be labelled with the classes of {cfg.data}")
    log(
        f"measuring the frozen encoder: features of {bank_size(len(bank))} bank and {len(ds)} evaluation images, "
        "trained and random weights, then kNN and a linear probe on each"
    )
    rep = frozen_representation(encoder, bank, ds, len(ds.classes), cfg.precision, cfg.seed, cfg.probe_features)
    rep.update({"encoder": what, "bank": f"--train-data {train_data}", "eval_set": cfg.data})
    log(
        f"frozen encoder ({cfg.probe_features} features): kNN {100 * rep['knn_accuracy']:.2f}%, linear probe "
        f"{100 * rep['linear_probe_accuracy']:.2f}%; random weights: kNN {100 * rep['random']['knn_accuracy']:.2f}%, "
        f"linear probe {100 * rep['random']['linear_probe_accuracy']:.2f}% on {cfg.data}"
    )
    return rep  # type: ignore[return-value]


def _write(
    cfg: Config,
    checkpoint: str,
    train_data: str | None,
    results: Results,
    ds: ImageSet,
    classes: list[str] | None,
    log: Log,
) -> None:
    """results.json, what this evaluation used (not a training recipe it never ran), the confusion
    matrix of a classifier and report.html, into ``cfg.out``."""
    with ExitStack() as hold:
        _write_locked(
            RunDir.claim(cfg.out, hold, "writing an evaluation"), cfg, checkpoint, train_data, results, ds, classes, log
        )


def _write_locked(
    run: RunDir,
    cfg: Config,
    checkpoint: str,
    train_data: str | None,
    results: Results,
    ds: ImageSet,
    classes: list[str] | None,
    log: Log,
) -> None:
    used = {k: v for k, v in cfg.to_dict().items() if k in EVALUATE_KEYS}
    run.write_json(
        "config.json", {"command": "evaluate", "checkpoint": str(checkpoint), "train_data": train_data, **used}
    )
    run.write_json("results.json", results)
    if classes is not None:
        figures.save_confusion_matrix(results["confusion_matrix"], classes, run.figures / "confusion_matrix.png")
    if ds.skipped:
        run.write_lines("skipped.txt", ds.skipped)
    log(f"wrote {run.path}: results.json, report.html" + (", figures/confusion_matrix.png" if classes else ""))
    write_report(run.path)


# ----------------------------------------------------------------------------- the command


def main(overrides: dict[str, Any], checkpoint: str, train_data: str | None, log: Log) -> Results:
    """``convae evaluate``: the architecture comes from the checkpoint, so no preset or config file,
    only the settings given; INFERENCE_BATCH_SIZE images per pass unless told otherwise."""
    cfg = build_config("seed", None, {"batch_size": INFERENCE_BATCH_SIZE, **overrides})
    return evaluate_checkpoint(cfg, checkpoint, train_data, log)
