"""Every ``convae`` command as one short function over the library; ``cli.py`` only parses and dispatches.

Each takes the preset, the optional config file and the flags given (``overrides``), applies
the command's own policy (resume rules, the sweep's batch size, encode's defaults) and calls
the library. Nothing here parses arguments or prints errors.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from .config import INFERENCE_BATCH_SIZE, SWEEP_BATCH_SIZE, build_config, load_run_config, read_config_file
from .errors import ConvaeError
from .records import Log, Results
from .rundir import RunDir, locked


def train(command: str, preset: str, config_file: str | None, overrides: dict[str, Any], log: Log,
          checkpoint: str | None = None, resume: bool = False) -> RunDir:
    """``run``, ``pretrain`` or ``finetune``; with ``resume``, continue ``out`` with its saved config."""
    from .pipeline import PHASES, run_training

    if resume:
        if "out" not in overrides:
            raise ConvaeError("resuming needs the run folder to continue", advice="--resume needs --out DIR")
        extra = sorted(set(overrides) - {"out", "device"})
        extra += [name for name, given in (("config", config_file), ("checkpoint", checkpoint)) if given]
        if extra:
            raise ConvaeError("a resumed run continues with its saved config.json",
                              advice="drop " + ", ".join("--" + k.replace("_", "-") for k in extra))
        cfg = load_run_config(overrides["out"])
        cfg = replace(cfg, device=overrides.get("device", cfg.device))
        return run_training(cfg, phases=PHASES[command], log=log, resume=True)
    cfg = build_config(preset, config_file, overrides)
    return run_training(cfg, phases=PHASES[command], checkpoint=checkpoint, log=log)


def sweep(preset: str, config_file: str | None, overrides: dict[str, Any], budgets: list[str], seeds: int,
          steps: int, checkpoint: str | None, log: Log, methods: list[str] | None = None) -> RunDir:
    """``convae sweep``; its batch size defaults to SWEEP_BATCH_SIZE, below the config file and the flags."""
    from .sweep import parse_budgets, run_sweep

    overrides = dict(overrides)
    if "batch_size" not in overrides and "batch_size" not in (read_config_file(config_file) if config_file else {}):
        overrides["batch_size"] = SWEEP_BATCH_SIZE
    cfg = build_config(preset, config_file, overrides)
    return run_sweep(cfg, parse_budgets(budgets), seeds, steps, checkpoint, log=log, methods=methods)


EVALUATE_KEYS = ("data", "cache_dir", "workers", "batch_size", "probe_features", "precision", "seed", "device")


def evaluate(overrides: dict[str, Any], checkpoint: str, train_data: str | None, log: Log) -> Results:
    """``convae evaluate``: a checkpoint on every image of ``data`` (``cifar10`` = its test split).

    A classifier is scored as a classifier. With ``train_data`` (labelled) the checkpoint's
    frozen encoder is also scored by kNN and a linear probe trained on ``train_data``'s
    features, next to the same architecture with random weights. With ``out`` it is all written there.
    """
    from . import visualise
    from .checkpoint import open_model
    from .data import DeviceBatches, load_source
    from .device import provenance, resolve_precision
    from .evaluate import class_results, evaluate_classifier, format_class_table
    from .probes import random_encoder, representation_scores
    from .report import write_report

    # the architecture comes from the checkpoint: no preset or config file, only these settings
    cfg = build_config("seed", None, {"batch_size": INFERENCE_BATCH_SIZE, **overrides})
    model, payload, device = open_model(checkpoint, cfg.device)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device, warn=log))
    is_classifier = payload["kind"] == "classifier"
    if not is_classifier and train_data is None:
        raise ConvaeError(f"{checkpoint} holds an autoencoder: evaluating it needs labelled training images "
                          "for the kNN bank and the linear probe", advice="pass --train-data SRC")
    if cfg.out:
        RunDir.check_free(cfg.out)
    m = model.config
    ds = load_source(cfg.data, m.in_channels, m.height, m.width, cfg.cache_dir, train=False, log=log,
                     workers=cfg.workers)
    if not ds.labelled:
        raise ConvaeError(f"{cfg.data} has no class folders: evaluation needs labelled data")
    classes = payload.get("classes") or ds.classes
    if is_classifier and ds.classes != classes:
        raise ConvaeError(f"{cfg.data} has classes {ds.classes}, the checkpoint was trained on {classes}")
    results: Results = {"eval_set": cfg.data, "checkpoint": str(checkpoint), "precision": cfg.precision,
                        "provenance": provenance(device, cfg.precision)}
    if is_classifier:
        batches = DeviceBatches.of(ds, device, cfg.batch_size)
        r = evaluate_classifier(model, batches, len(classes), cfg.precision)
        results.update(class_results(r["confusion_matrix"], classes))
        results["loss"] = r["loss"]
        log(f"accuracy on {cfg.data}: {100 * results['accuracy']:.2f}% of {results['num_images']} images")
        log(format_class_table(results))
    if train_data is not None:
        bank = load_source(train_data, m.in_channels, m.height, m.width, cfg.cache_dir, train=True, log=log,
                           workers=cfg.workers)
        if not bank.labelled or bank.classes != ds.classes:
            raise ConvaeError(f"the training data {train_data} must be labelled with the classes of {cfg.data}")
        baseline = random_encoder(m, cfg.seed, device)
        rep = representation_scores(model.encoder, bank, bank.labels, ds, ds.labels, len(ds.classes),
                                    cfg.precision, cfg.seed, features=cfg.probe_features, baseline=baseline)
        rep.update({"encoder": f"{payload['kind']}'s, frozen", "bank": f"--train-data {train_data}",
                    "eval_set": cfg.data})
        results["representation"] = rep  # type: ignore[typeddict-item]
        log(f"frozen encoder ({cfg.probe_features} features): kNN {100 * rep['knn_accuracy']:.2f}%, linear probe "
            f"{100 * rep['linear_probe_accuracy']:.2f}%; random weights: kNN {100 * rep['random']['knn_accuracy']:.2f}%, "
            f"linear probe {100 * rep['random']['linear_probe_accuracy']:.2f}% on {cfg.data}")
    if cfg.out:
        run = RunDir(cfg.out)
        # what this evaluation used, not a training recipe it never ran
        used = {k: v for k, v in cfg.to_dict().items() if k in EVALUATE_KEYS}
        run.write_json("config.json", {"command": "evaluate", "checkpoint": str(checkpoint),
                                       "train_data": train_data, **used})
        run.write_json("results.json", results)
        if is_classifier:
            visualise.save_confusion_matrix(results["confusion_matrix"], classes, run.figures / "confusion_matrix.png")
        if ds.skipped:
            run.write_lines("skipped.txt", ds.skipped)
        log(f"wrote {run.path}: results.json, report.html" + (", figures/confusion_matrix.png" if is_classifier else ""))
        write_report(run.path)
    return results


def encode(overrides: dict[str, Any], checkpoint: str, out: str, make_map: bool, log: Log) -> Path:
    """``convae encode``: the seed preset's data settings, INFERENCE_BATCH_SIZE images per pass."""
    from .embeddings import write_embeddings

    overrides = {"batch_size": INFERENCE_BATCH_SIZE, **overrides}
    return write_embeddings(build_config("seed", None, overrides), checkpoint, out, make_map=make_map, log=log)


def predict(checkpoint: str, images: list[str], device: str, batch_size: int, as_json: bool, log: Log,
            warn: Callable[[str], None]) -> None:
    from .prediction import format_predictions
    from .prediction import predict as predict_images

    rows = predict_images(checkpoint, images, device, batch_size, warn=warn)
    log(format_predictions(rows, as_json=as_json))


def export(checkpoint: str, fmt: str, part: str, out: str, log: Log) -> Path:
    from .export import export as export_part

    path = export_part(checkpoint, fmt, part, out)
    log(f"wrote {part} as {fmt}: {path}")
    return path


def report(run_dir: str, log: Log) -> Path:
    from .report import write_report

    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise ConvaeError(f"{run} is not a convae run folder (no config.json)")
    with locked(run, "writing the report"):
        path = write_report(run)
    log(f"wrote {path}")
    return path
