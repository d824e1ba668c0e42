"""The ``convae`` command: run, pretrain, finetune, evaluate.

Flags have the same names in every command where they apply. A flag left out keeps the
value of the preset or of ``--config FILE``; user mistakes end with one line and exit 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, Callable, Sequence

from . import __version__
from .config import INITS, OPTIMIZERS, PRECISIONS, PRESETS, SCHEDULES, DEVICES, build_config
from .errors import ConvaeError
from .models import UPSAMPLE_MODES
from .sweep import DEFAULT_BUDGETS
from .train import Interrupted

SWEEP_BATCH_SIZE = 256  # the sweep counts steps, so small budgets get as many updates as large ones

# flag -> argparse keyword arguments; dest is the Config field of the same name
FLAGS: dict[str, dict[str, Any]] = {
    "--data": dict(metavar="SRC", help="cifar10, a folder (class folders = labelled) or a .tar/.tar.gz/.zip of one (default: cifar10)"),
    "--train-data": dict(metavar="SRC", help="labelled images whose frozen features train the kNN bank and the "
                         "linear probe (evaluate)"),
    "--test-data": dict(metavar="SRC", help="evaluate on this source instead of a validation split (cifar10 = its test split)"),
    "--val-fraction": dict(type=float, metavar="F", help="fraction of --data held out, stratified and seeded (default 0.1)"),
    "--labels-per-class": dict(type=int, metavar="N", help="fine-tune on only N labelled images per class (pretraining still uses all)"),
    "--cache-dir": dict(metavar="DIR", help="where downloads, extracted archives and decoded tensors are kept (default ~/.cache/convae)"),
    "--in-channels": dict(type=int, metavar="C", help="image channels (default 3); images are converted to it"),
    "--height": dict(type=int, metavar="H", help="image height (default 32); images are resized to it"),
    "--width": dict(type=int, metavar="W", help="image width (default 32)"),
    "--channels": dict(type=int, nargs="+", metavar="N", help="conv encoder widths, one per stride-2 stage (default 64 128 128)"),
    "--latent-dim": dict(type=int, metavar="N", help="size of the latent vector (default 1024)"),
    "--upsample": dict(choices=UPSAMPLE_MODES, help="decoder upsampling (default bilinear, as the lecture)"),
    "--pretrain-epochs": dict(type=int, metavar="N", help="autoencoder epochs (seed: 5)"),
    "--finetune-epochs": dict(type=int, metavar="N", help="classifier epochs (seed: 5)"),
    "--batch-size": dict(type=int, metavar="N", help="images per step (seed: 2000)"),
    "--lr": dict(type=float, metavar="LR", help="learning rate (seed: 1e-3)"),
    "--finetune-lr": dict(type=float, metavar="LR", help="learning rate for fine-tuning (default: --lr)"),
    "--optimizer": dict(choices=OPTIMIZERS, help="optimizer (seed: adam)"),
    "--weight-decay": dict(type=float, metavar="WD", help="weight decay (seed: 0)"),
    "--schedule": dict(choices=SCHEDULES, help="learning-rate schedule, stepped per epoch (seed: none)"),
    "--step-size": dict(type=int, metavar="N", help="epochs between 10x decays for --schedule step (default 30)"),
    "--init": dict(choices=INITS, help="classifier encoder: transferred from the autoencoder, or random (default pretrained)"),
    "--freeze-encoder": dict(action="store_true", help="train only the linear head (linear probe)"),
    "--micro-batch": dict(type=int, metavar="N", help="accumulate each batch's gradient over chunks of N images "
                          "(same update, faster on CPU); 0 = auto: on CPU 200 (fp32) or 500 (bf16), "
                          "whole batch on GPU"),
    "--compile": dict(action="store_true", help="torch.compile the training model (pays on GPUs; slower on CPU)"),
    "--precision": dict(choices=PRECISIONS, help="fp32, or bfloat16 autocast (default fp32)"),
    "--seed": dict(type=int, metavar="N", help="seed for weights, split and batch order (default 0)"),
    "--device": dict(choices=DEVICES, help="auto picks CUDA when available (default auto)"),
    "--out": dict(metavar="DIR", help="run folder (default runs/<timestamp>); must be new or empty"),
    "--checkpoint-every": dict(type=int, metavar="N", help="save the training state every N epochs (default 1; "
                               "0 = at the end of each phase only)"),
}

DATA = ["--data", "--test-data", "--val-fraction", "--cache-dir"]
MODEL = ["--in-channels", "--height", "--width", "--channels", "--latent-dim", "--upsample"]
OPTIM = ["--batch-size", "--lr", "--optimizer", "--weight-decay", "--schedule", "--step-size"]
FINETUNE = ["--finetune-epochs", "--finetune-lr", "--labels-per-class", "--init", "--freeze-encoder"]
EXEC = ["--checkpoint-every", "--micro-batch", "--compile", "--precision", "--seed", "--device", "--out"]

COMMANDS: dict[str, tuple[str, list[str]]] = {
    "run": ("pretrain the autoencoder, transfer its encoder, fine-tune and evaluate (the lecture's pipeline)",
            DATA + MODEL + ["--pretrain-epochs"] + OPTIM + FINETUNE + EXEC),
    "pretrain": ("train the autoencoder by reconstruction, without labels",
                 DATA + MODEL + ["--pretrain-epochs"] + OPTIM + EXEC),
    "finetune": ("fine-tune a classifier from an autoencoder checkpoint (or from scratch)",
                 DATA + OPTIM + FINETUNE + EXEC),
    "sweep": ("compare pretrained fine-tuning, linear probe, kNN and scratch over label budgets and seeds",
              DATA + MODEL + ["--pretrain-epochs"] + OPTIM + ["--finetune-lr"] + EXEC),
    "evaluate": ("evaluate a checkpoint on a labelled source: classifier accuracy, and kNN and linear probe "
                 "of its frozen encoder with --train-data",
                 ["--data", "--train-data", "--cache-dir", "--batch-size", "--precision", "--device", "--out"]),
}


def _add_tool_commands(sub) -> None:
    """Commands that work on a trained checkpoint rather than a config: export, predict."""
    from .export import FORMATS, PARTS

    e = sub.add_parser("export", help="write a trained part to ONNX, TorchScript or safetensors",
                       description="write a trained part to ONNX (dynamic batch), TorchScript or safetensors")
    e.add_argument("--checkpoint", metavar="CKPT", required=True, help="autoencoder or classifier checkpoint")
    e.add_argument("--format", required=True, choices=FORMATS)
    e.add_argument("--part", default="encoder", choices=PARTS, help="which part (default encoder)")
    e.add_argument("--out", metavar="FILE", required=True, help="file to write (must not exist)")
    r = sub.add_parser("report", help="(re)write RUN_DIR/report.html, one self-contained page",
                       description="(re)write RUN_DIR/report.html: config, curves, kernels, reconstructions, "
                                   "per-class table, confusion matrix, probes and sweep, images inlined")
    r.add_argument("run_dir", metavar="RUN_DIR")
    c = sub.add_parser("encode", help="embeddings of every image to .npy, a CSV of their sources, and a t-SNE map",
                       description="embeddings of every image to .npy (N x latent), a CSV (index, file, label, "
                                   "class, split) beside it, and figures/embedding_map.png")
    c.add_argument("--checkpoint", metavar="CKPT", required=True, help="autoencoder or classifier checkpoint")
    c.add_argument("--out", metavar="FILE.npy", required=True, help="embeddings file to write (must not exist)")
    c.add_argument("--no-map", action="store_true", help="skip the t-SNE map")
    for flag in ("--data", "--val-fraction", "--cache-dir", "--batch-size", "--precision", "--seed", "--device"):
        c.add_argument(flag, default=argparse.SUPPRESS, dest=flag[2:].replace("-", "_"), **FLAGS[flag])
    p = sub.add_parser("predict", help="class and probabilities for images, preprocessed as in training",
                       description="class and probabilities for images, preprocessed as in training")
    p.add_argument("--checkpoint", metavar="CKPT", required=True, help="classifier checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto picks CUDA when available")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per forward pass (default 256)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convae",
        description="Convolutional autoencoders for representation learning: pretrain without labels, "
                    "look inside, transfer, fine-tune with few labels.",
    )
    parser.add_argument("--version", action="version", version=f"convae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, flags) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--preset", default="seed", choices=list(PRESETS),
                       help="named recipe; seed = the lecture's exact recipe (default seed)")
        p.add_argument("--config", metavar="FILE", help="YAML or JSON file of config keys; flags given here win")
        if name in ("run", "pretrain", "finetune"):
            p.add_argument("--resume", action="store_true",
                           help="continue the run in --out DIR where it stopped, with its saved config.json")
        if name in ("finetune", "evaluate", "sweep"):
            p.add_argument("--checkpoint", metavar="CKPT", required=(name == "evaluate"),
                           help="classifier checkpoint to evaluate" if name == "evaluate"
                           else "autoencoder checkpoint to transfer from" + (" (default: pretrain once)"
                                                                              if name == "sweep" else ""))
        if name == "sweep":
            p.add_argument("--labels-per-class", nargs="+", default=DEFAULT_BUDGETS, metavar="N",
                           help="label budgets per class; 'all' = every training image (default 25 100 400 all)")
            p.add_argument("--seeds", type=int, default=3, metavar="K", help="seeds per budget (default 3)")
            p.add_argument("--steps", type=int, default=300, metavar="S",
                           help="optimizer steps per cell, the same for every method (default 300)")
        for flag in flags:
            p.add_argument(flag, default=argparse.SUPPRESS, dest=flag[2:].replace("-", "_"), **FLAGS[flag])
    _add_tool_commands(sub)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"command", "preset", "config", "checkpoint", "resume"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def _log(msg: str) -> None:
    print(msg, flush=True)


def _run(args: argparse.Namespace) -> None:
    from .config import load_run_config
    from .train import main as train_main

    phases = {"run": ("pretrain", "finetune"), "pretrain": ("pretrain",), "finetune": ("finetune",)}[args.command]
    overrides = _overrides(args)
    if args.resume:
        if "out" not in overrides:
            raise ConvaeError("--resume needs --out DIR, the run folder to continue")
        extra = sorted(set(overrides) - {"out", "device"})
        extra += [name for name in ("config", "checkpoint") if getattr(args, name, None)]
        if extra:
            raise ConvaeError("--resume continues with the run's saved config.json; drop "
                              + ", ".join("--" + k.replace("_", "-") for k in extra))
        cfg = load_run_config(overrides["out"])
        cfg.device = overrides.get("device", cfg.device)
        train_main(cfg, phases=phases, log=_log, resume=True)
        return
    cfg = build_config(args.preset, args.config, overrides)
    train_main(cfg, phases=phases, checkpoint=getattr(args, "checkpoint", None), log=_log)


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluate import main as evaluate_main

    overrides = _overrides(args)  # --data defaults to cifar10 through the config, so a --config file can set it
    train_data = overrides.pop("train_data", None)
    cfg = build_config(args.preset, args.config, overrides)
    evaluate_main(cfg, args.checkpoint, train_data=train_data, log=_log)


def _export(args: argparse.Namespace) -> None:
    from .export import export

    out = export(args.checkpoint, args.format, args.part, args.out)
    _log(f"wrote {args.part} as {args.format}: {out}")


def _report(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .html_report import write_report

    run = Path(args.run_dir)
    if not (run / "config.json").is_file():
        raise ConvaeError(f"{run} is not a convae run folder (no config.json)")
    _log(f"wrote {write_report(run)}")


def _encode(args: argparse.Namespace) -> None:
    from .embed import main as encode_main

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "checkpoint", "out", "no_map")}
    overrides.setdefault("batch_size", 1024)
    cfg = build_config("seed", None, overrides)
    encode_main(cfg, args.checkpoint, args.out, make_map=not args.no_map, log=_log)


def _predict(args: argparse.Namespace) -> None:
    from .predict import format_predictions, predict

    if args.batch_size <= 0:
        raise ConvaeError(f"batch_size must be an integer > 0, got {args.batch_size}")
    rows = predict(args.checkpoint, args.images, args.device, args.batch_size,
                   warn=lambda m: print(f"convae: warning: {m}", file=sys.stderr, flush=True))
    _log(format_predictions(rows, as_json=args.json))


def _sweep(args: argparse.Namespace) -> None:
    from .sweep import main as sweep_main
    from .sweep import parse_budgets

    overrides = {k: v for k, v in _overrides(args).items() if k not in ("labels_per_class", "seeds", "steps")}
    from .config import read_config_file

    # the sweep's own default sits below both the config file and the flags
    if "batch_size" not in overrides and "batch_size" not in (read_config_file(args.config) if args.config else {}):
        overrides["batch_size"] = SWEEP_BATCH_SIZE
    cfg = build_config(args.preset, args.config, overrides)
    sweep_main(cfg, parse_budgets(args.labels_per_class), args.seeds, args.steps, args.checkpoint, log=_log)


HANDLERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "run": _run, "pretrain": _run, "finetune": _run, "evaluate": _evaluate, "export": _export, "predict": _predict,
    "sweep": _sweep, "encode": _encode, "report": _report,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        HANDLERS[args.command](args)
    except ConvaeError as e:
        print(f"convae: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Interrupted as e:
        name = signal.Signals(e.signum).name if e.signum else "a signal"
        resume = f"convae {args.command} --out {e.run_path} --resume"
        print(f"convae: stopped by {name} at {e.where}; the state is saved. Resume with: {resume}",
              file=sys.stderr, flush=True)
        return 128 + (e.signum or 2)
    except KeyboardInterrupt:
        print("convae: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
