"""Every ``convae`` command as one short function over the library; ``cli.py`` only parses and dispatches.

Each takes the preset, the optional config file and the flags given (``overrides``), applies
the command's own policy (resume rules, the sweep's batch size, encode's defaults) and calls
the library. Nothing here parses arguments or prints errors.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from .config import INFERENCE_BATCH_SIZE, SWEEP_BATCH_SIZE, build_config, load_run_config, presets, read_config_file
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
          steps: int | None, checkpoint: str | None, log: Log, methods: list[str] | None = None,
          curves: bool = False) -> RunDir:
    """``convae sweep``; its batch size defaults to SWEEP_BATCH_SIZE, below the preset, the config file
    and the flags."""
    from .sweep import parse_budgets, run_sweep

    overrides = dict(overrides)
    given = {**presets().get(preset, {}), **(read_config_file(config_file) if config_file else {}), **overrides}
    if "batch_size" not in given:
        overrides["batch_size"] = SWEEP_BATCH_SIZE
    cfg = build_config(preset, config_file, overrides)
    return run_sweep(cfg, parse_budgets(budgets), seeds, steps, checkpoint, log=log, methods=methods, curves=curves)


def evaluate(overrides: dict[str, Any], checkpoint: str, train_data: str | None, log: Log) -> Results:
    """``convae evaluate``: the architecture comes from the checkpoint, so no preset or config file,
    only the settings given; INFERENCE_BATCH_SIZE images per pass unless told otherwise."""
    from .evaluation import evaluate_checkpoint

    cfg = build_config("seed", None, {"batch_size": INFERENCE_BATCH_SIZE, **overrides})
    return evaluate_checkpoint(cfg, checkpoint, train_data, log)


def encode(overrides: dict[str, Any], checkpoint: str, out: str, make_map: bool, log: Log) -> Path:
    """``convae encode``: the seed preset's data settings, INFERENCE_BATCH_SIZE images per pass."""
    from .embeddings import write_embeddings

    given = set(overrides)
    overrides = {"batch_size": INFERENCE_BATCH_SIZE, **overrides}
    return write_embeddings(build_config("seed", None, overrides), checkpoint, out, make_map=make_map, log=log,
                            given=given)


def predict(checkpoint: str, images: list[str], device: str, batch_size: int, as_json: bool, log: Log,
            warn: Callable[[str], None]) -> None:
    from .prediction import format_predictions
    from .prediction import predict as predict_images

    rows = predict_images(checkpoint, images, device, batch_size, warn=warn)
    log(format_predictions(rows, as_json=as_json))


def export(checkpoint: str, fmt: str, part: str, out: str, log: Log) -> Path:
    from .export import export as export_part

    path = export_part(checkpoint, fmt, part, out, log)
    log(f"wrote {part} as {fmt}: {path}")
    return path


def cache(action: str, cache_dir: str, everything: bool, log: Log) -> int:
    """``convae cache list``: what the cache holds, with sizes; ``clean``: remove what no run reads
    again (older formats, stopped decodes; ``everything``: all of it). Returns the bytes freed."""
    from .data.inventory import entries, human, in_use, remove

    root = Path(cache_dir).expanduser()
    found = entries(root)
    if action == "list":
        for e in found:
            images = f"{e.images} images" if e.images is not None else ""
            log(f"{human(e.bytes):>10}  {e.kind:<18}  {e.state:<16}  {images:>14}  {e.path}")
        stale = [e for e in found if e.stale]
        log(f"{human(sum(e.bytes for e in found))} in {len(found)} entries under {root}"
            + (f"; 'convae cache clean' removes the {len(stale)} stale one(s), {human(sum(e.bytes for e in stale))}"
               if stale else ""))
        return 0
    freed = 0
    for e in found:
        if not (everything or e.stale):
            continue
        if in_use(e):
            log(f"kept {e.path}: a process is decoding into it now")
            continue
        remove(e)
        freed += e.bytes
        log(f"removed {e.path} ({human(e.bytes)})")
    log(f"freed {human(freed)} under {root}")
    return freed


def report(run_dir: str, log: Log) -> Path:
    from .report import write_report

    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise ConvaeError(f"{run} is not a convae run folder (no config.json)")
    with locked(run, "writing the report"):
        path = write_report(run)
    log(f"wrote {path}")
    return path
