"""The lecture's pipeline: pretrain -> transfer -> fine-tune -> evaluate, as one function.

``run_training`` serves ``convae run`` (both phases), ``convae pretrain`` and ``convae
finetune``; it resumes a stopped run, and under ``torchrun`` every rank trains its shard
while rank 0 alone writes the run folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import Config, build_config, load_run_config
from ..data import ImageSet, file_sha256
from ..evaluation.metrics import format_class_table
from ..models import AutoEncoder, Classifier, ModelConfig
from ..outputs.checkpoint import load_checkpoint
from ..outputs.report import write_report
from ..outputs.rundir import RunDir, TensorBoardLog, locked
from ..training.fit import RunContext, read_state
from ..training.phases import finetune_phase, measure_representation, pretrain_phase
from ..training.rundata import RunData, check_model_for, prepare_data
from ..utils.device import provenance
from ..utils.distributed import Dist, setup_distributed, teardown_distributed
from ..utils.errors import ConvaeError
from ..utils.files import read_file
from ..utils.records import EpochRecord, Log, Results

PHASES = {"run": ("pretrain", "finetune"), "pretrain": ("pretrain",), "finetune": ("finetune",)}


def run_training(
    cfg: Config,
    phases: tuple[str, ...] = ("pretrain", "finetune"),
    checkpoint: str | None = None,
    log: Log = print,
    resume: bool = False,
    source: ImageSet | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> RunDir:
    """Both phases, pretraining only, or fine-tuning from ``checkpoint`` (an autoencoder).

    With ``resume`` the run folder ``cfg.out`` is continued from its saved state; ``cfg`` must
    be the one in its ``config.json``. ``source`` is training data already in memory (else
    ``cfg.data`` is decoded); ``on_epoch`` is called with every epoch's record.
    """
    dist, device = setup_distributed(cfg.device)
    # the precision that runs is recorded (config.json, results.json): auto resolved here
    cfg = cfg.for_device(device, log if dist.is_main else print)
    try:
        with ExitStack() as hold:  # the run folder's lock, held by rank 0 until the run ends
            return _run(
                cfg,
                phases,
                checkpoint,
                log if dist.is_main else (lambda m: None),
                resume,
                dist,
                device,
                hold,
                source,
                on_epoch,
            )
    finally:
        teardown_distributed()


INPUTS = "inputs.json"


def _fingerprints(cfg: Config, data: RunData) -> dict[str, str]:
    """What the run depends on: the config (less where it runs), each source's cache key
    (its files, sizes and times, or its archive's hash) and the initial checkpoint's hash."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "device", "placement", "workers")}
    out = {"config": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24], **data.keys}
    if cfg.init_checkpoint and Path(cfg.init_checkpoint).is_file():
        out["init_checkpoint"] = file_sha256(Path(cfg.init_checkpoint))[:24]
    return out


def _check_unchanged(run: RunDir, cfg: Config, data: RunData) -> None:
    """Refuse to resume a run whose inputs changed: it would not continue the same run."""
    try:
        saved = json.loads(read_file(run.file(INPUTS)))
    except (OSError, ValueError):
        return  # a run folder from before fingerprints: nothing to compare
    now = _fingerprints(cfg, data)
    what = {
        "config": f"{run.path / 'config.json'} was edited",
        "data": f"the training data {cfg.data} changed",
        "test_data": f"the test data {cfg.test_data} changed",
        "init_checkpoint": f"the initial checkpoint {cfg.init_checkpoint} changed",
    }
    changed = [what.get(k, k) for k in saved if k in now and saved[k] != now[k]]
    if changed:
        raise ConvaeError(
            f"cannot resume {run.path}: {'; '.join(changed)} since the run started, so it would not "
            "continue the same run",
            advice="start a new run",
        )


def _open_run(cfg: Config, dist: Dist, hold: ExitStack) -> tuple[RunDir, Config]:
    """Rank 0 makes the run folder (a timestamp when ``out`` is not set), locks it for the run, and
    saves the config."""
    if dist.is_main:
        run, cfg = RunDir.start(cfg, hold, "training")
    cfg = replace(cfg, out=dist.broadcast(cfg.out))
    return (run if dist.is_main else RunDir.open(cfg.out)), cfg


def _run(
    cfg: Config,
    phases: tuple[str, ...],
    checkpoint: str | None,
    log: Log,
    resume: bool,
    dist: Dist,
    device: torch.device,
    hold: ExitStack,
    source: ImageSet | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> RunDir:
    do_pretrain = "pretrain" in phases and not ("finetune" in phases and cfg.init == "scratch")
    do_finetune = "finetune" in phases
    ctx, data, ae = _open(cfg, checkpoint, log, resume, dist, device, hold, source, on_epoch, do_pretrain, do_finetune)
    cfg, run = ctx.cfg, ctx.run
    finetune_resumed = ctx.resume is not None and ctx.resume["phase"] == "finetune"
    torch.manual_seed(cfg.seed)
    mcfg: ModelConfig = cfg.model_config(num_classes=len(data.classes) or 1)
    results: Results = {}
    with ctx.stop.installed():
        if do_pretrain and not finetune_resumed:
            ae = AutoEncoder(mcfg).to(device, memory_format=torch.channels_last)
            _timed(ctx, "pretrain", lambda: pretrain_phase(ae, data, ctx, device))
            log(f"pretraining: {cfg.pretrain_epochs} epoch(s) in {ctx.timing['pretrain_s']:.1f} s")
        model = ae
        if do_finetune:
            if finetune_resumed or cfg.init == "scratch":
                clf = Classifier(mcfg)  # weights come from the state when resuming
            else:
                clf = Classifier.from_autoencoder(ae, len(data.classes))
            model = clf = clf.to(device, memory_format=torch.channels_last)
            decoder = ae.decoder if ae is not None and cfg.init == "pretrained" else None  # joint training's start
            results = _timed(ctx, "finetune", lambda: finetune_phase(clf, data, ctx, device, decoder))
            if dist.is_main:
                log(f"fine-tuning: {cfg.finetune_epochs} epoch(s) in {ctx.timing['finetune_s']:.1f} s")
                if cfg.init == "pretrained" and ae is None:  # resumed inside fine-tuning: the pretrained one
                    ae = _pretrained_autoencoder(run, cfg)
                if ae is not None:
                    results["representation"] = measure_representation(ae, data, ctx, device)
                    _compare_with_probe(results, log)
        if dist.is_main:
            results["kernel_shape"] = list(model.encoder.kernels().shape)
            _write_results(ctx, data, results, do_finetune, device)
    if dist.is_main:
        log(f"done: {run.path}")
        if not do_finetune:
            ckpt = run.checkpoints / "autoencoder.pt"
            log(f"autoencoder: {ckpt}\nnext: convae finetune --checkpoint {ckpt} --data {cfg.data} --out NEW_DIR")
    return run


def _compare_with_probe(results: Results, log: Log) -> None:
    """Say so when the classifier fine-tuned is below logistic regression on its encoder's frozen
    pretrained features: fine-tuning lost what the features already gave."""
    rep, acc = results.get("representation") or {}, results.get("accuracy")
    probe = rep.get("linear_probe_accuracy")
    if acc is not None and probe is not None and acc < probe:
        log(
            f"convae: warning: the fine-tuned classifier ({100 * acc:.2f}%) is below logistic regression on the "
            f"frozen pretrained features ({100 * probe:.2f}%): try --lp-ft, a lower --finetune-lr, or "
            "--freeze-encoder"
        )


def _timed(ctx: RunContext, phase: str, work: Callable):
    """``work()``, its wall time added to the run's ``timing`` (a resumed phase adds to what it had)."""
    start = time.perf_counter()
    out = work()
    ctx.timing[f"{phase}_s"] = ctx.timing.get(f"{phase}_s", 0.0) + time.perf_counter() - start
    return out


def _open(
    cfg: Config,
    checkpoint: str | None,
    log: Log,
    resume: bool,
    dist: Dist,
    device: torch.device,
    hold: ExitStack,
    source: ImageSet | None,
    on_epoch: Callable[[EpochRecord], None] | None,
    do_pretrain: bool,
    do_finetune: bool,
) -> tuple[RunContext, RunData, AutoEncoder | None]:
    """The run folder (new, or the one resumed, locked), its data, and the autoencoder fine-tuning
    starts from when it comes from a checkpoint."""
    state = None
    if resume:
        run = RunDir.open(cfg.out)
        if dist.is_main:
            hold.enter_context(locked(run.path, "resuming a run"))
        state = read_state(run)
        if _finished(run):
            raise ConvaeError(f"{run.path} has already finished; nothing to resume")
        if state is not None and state["phase"] == "pretrain" and not do_pretrain:
            raise ConvaeError(
                f"{run.path} stopped in pretraining, which fine-tuning alone does not continue",
                advice=f"continue it with: convae run --out {run.path} --resume",
            )
    if checkpoint is not None:
        cfg = replace(cfg, init_checkpoint=str(checkpoint))
    ae = None
    finetune_resumed = state is not None and state["phase"] == "finetune"
    if do_finetune and not do_pretrain and cfg.init == "pretrained" and not finetune_resumed:
        if cfg.init_checkpoint is None:
            raise ConvaeError(
                "fine-tuning a pretrained encoder needs an autoencoder checkpoint",
                advice="pass --checkpoint AE.pt, or --init scratch",
            )
        ae, _ = load_checkpoint(cfg.init_checkpoint, kind="autoencoder")
        cfg = cfg.with_model(ae.config)  # the data format and architecture follow the checkpoint
    if not resume:
        RunDir.check_free(cfg.out)
        dist.broadcast(None)  # every rank has looked before rank 0 makes the folder
    data = dist.in_turn(lambda: prepare_data(cfg, need_labels=do_finetune, log=log, source=source), device)
    check_model_for(cfg, data, classifier=do_finetune)
    if resume:
        _check_unchanged(run, cfg, data)
    else:
        run, cfg = _open_run(cfg, dist, hold)
        if dist.is_main:
            run.write_json(INPUTS, _fingerprints(cfg, data))
    ctx = RunContext(
        run,
        cfg,
        log,
        resume=state,
        dist=dist,
        tb=TensorBoardLog(run.path, cfg.tensorboard and dist.is_main),
        on_epoch=on_epoch,
    )
    if dist.is_main:
        if data.skipped:
            run.write_lines("skipped.txt", data.skipped)
        if resume:
            run.write_lines("metrics.jsonl", [json.dumps(m) for m in (state or {}).get("metrics", [])])
    if state is not None:
        ctx.metrics, ctx.timing = list(state["metrics"]), dict(state["timing"])
        log(
            f"resuming {run.path} after {state['phase']} epoch {state['epoch']}"
            + (f" and {state['step']} batch(es)" if state["step"] else "")
        )
    ranks = f", {dist.world_size} processes" if dist.enabled else ""
    log(f"run folder: {run.path}  (device {device}{ranks}, precision {cfg.precision})")
    return ctx, data, ae


def _write_results(ctx: RunContext, data: RunData, results: Results, do_finetune: bool, device: torch.device) -> None:
    """results.json, the per-class table and the report; the completion mark last (rank 0)."""
    cfg, run = ctx.cfg, ctx.run
    # a signal after the last epoch is honoured too: stop before each remaining step, and
    # --resume (the state holds the last epoch) redoes only what was not written
    ctx.check_stop("writing the results and the report")
    final = {
        **(results if do_finetune else {"phase": "pretrain", **results}),
        "timing": ctx.timing,
        "precision": cfg.precision,
        "provenance": provenance(device, cfg.precision),
    }
    run.write_json("results.json", final)
    if do_finetune:
        ctx.log(f"per-class accuracy on the {data.eval_name}:\n" + format_class_table(final))
    ctx.tb.close()
    ctx.log(f"report: {write_report(run.path)}")
    ctx.check_stop("the end of the run (only the completion mark is missing)")
    run.write_json("results.json", {**final, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _finished(run: RunDir) -> bool:
    """Whether a run wrote everything: results.json carries the completion mark, written last."""
    try:
        results = json.loads(read_file(run.file("results.json")))
    except (OSError, ValueError):
        return False
    return isinstance(results, dict) and "finished" in results


def _pretrained_autoencoder(run: RunDir, cfg: Config) -> AutoEncoder | None:
    """The autoencoder a fine-tuning run started from: this run's pretraining, or its checkpoint."""
    for path in (run.checkpoints / "autoencoder.pt", cfg.init_checkpoint):
        if path is not None and Path(path).is_file():
            return load_checkpoint(path, kind="autoencoder")[0]
    return None


# ----------------------------------------------------------------------------- the command


def main(
    command: str,
    preset: str,
    config_file: str | None,
    overrides: dict[str, Any],
    log: Log,
    checkpoint: str | None = None,
    resume: bool = False,
) -> RunDir:
    """``run``, ``pretrain`` or ``finetune``; with ``resume``, continue ``out`` with its saved config."""
    if resume:
        if "out" not in overrides:
            raise ConvaeError("resuming needs the run folder to continue", advice="--resume needs --out DIR")
        extra = sorted(set(overrides) - {"out", "device"})
        extra += [name for name, given in (("config", config_file), ("checkpoint", checkpoint)) if given]
        if extra:
            raise ConvaeError(
                "a resumed run continues with its saved config.json",
                advice="drop " + ", ".join("--" + k.replace("_", "-") for k in extra),
            )
        cfg = load_run_config(overrides["out"])
        cfg = replace(cfg, device=overrides.get("device", cfg.device))
        return run_training(cfg, phases=PHASES[command], log=log, resume=True)
    cfg = build_config(preset, config_file, overrides)
    return run_training(cfg, phases=PHASES[command], checkpoint=checkpoint, log=log)
