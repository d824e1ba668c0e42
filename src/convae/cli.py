"""The ``convae`` command line: parse and dispatch to :mod:`convae.commands`, nothing else.

Flags have the same names in every command where they apply. A flag left out keeps the
value of the preset or of ``--config FILE``; user mistakes end with one line and exit 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, Callable, Sequence

from . import __version__, commands
from .config import INFERENCE_BATCH_SIZE, PRESETS, SWEEP_BATCH_SIZE
from .validation import DEVICES, INITS, OPTIMIZERS, PLACEMENTS, PRECISIONS, PROBE_FEATURES, SCHEDULES
from .errors import ConvaeError, Interrupted, clip, first_line
from .models import ARCHS, NORMS, OUTPUT_ACTIVATIONS, UPSAMPLE_MODES
from .objectives import OBJECTIVES
from .export import FORMATS as EXPORT_FORMATS
from .export import PARTS as EXPORT_PARTS
from .sweep import DEFAULT_BUDGETS, METHODS

# flag -> argparse keyword arguments; dest is the Config field of the same name
FLAGS: dict[str, dict[str, Any]] = {
    "--data": dict(metavar="SRC", help="cifar10, a folder (class folders = labelled) or a .tar/.tar.gz/.zip of one (default: cifar10)"),
    "--train-data": dict(metavar="SRC", help="labelled images whose frozen features train the kNN bank and the "
                         "linear probe (evaluate)"),
    "--test-data": dict(metavar="SRC", help="evaluate on this source instead of a validation split (cifar10 = its test split)"),
    "--val-fraction": dict(type=float, metavar="F", help="fraction of --data held out, stratified and seeded (default 0.1)"),
    "--labels-per-class": dict(type=int, metavar="N", help="fine-tune on only N labelled images per class (pretraining still uses all)"),
    "--workers": dict(type=int, metavar="N", help="processes that decode a source the first time (default 0 = "
                      "every core)"),
    "--placement": dict(choices=PLACEMENTS, help="where the training images live: device (one tensor on the "
                        "training device), host (batches read from the cache and prefetched), auto (default: the "
                        "device when the set fits in half its free memory; on the CPU always host)"),
    "--cache-dir": dict(metavar="DIR", help="where downloads, extracted archives and decoded tensors are kept (default ~/.cache/convae)"),
    "--in-channels": dict(type=int, metavar="C", help="image channels (default 3); images are converted to it"),
    "--height": dict(type=int, metavar="H", help="image height (default 32); images are resized to it"),
    "--width": dict(type=int, metavar="W", help="image width (default 32)"),
    "--channels": dict(type=int, nargs="+", metavar="N", help="conv encoder widths, one per stride-2 stage (default 64 128 128)"),
    "--latent-dim": dict(type=int, metavar="N", help="size of the latent vector (default 1024)"),
    "--upsample": dict(choices=UPSAMPLE_MODES, help="decoder upsampling (default bilinear, as the lecture)"),
    "--norm": dict(choices=NORMS, help="normalisation after every conv (default none, as the lecture)"),
    "--convs-per-stage": dict(type=int, metavar="N", help="3x3 convs per encoder and decoder stage (default 1)"),
    "--output-activation": dict(choices=OUTPUT_ACTIVATIONS, help="decoder output activation (default relu, as the "
                                "lecture; none for normalised targets)"),
    "--arch": dict(choices=ARCHS, help="stages (default: the lecture's stride-2 conv stages and FC latent) or patch "
                   "(one wide conv of --kernel-size filters, --channels of them, features pooled over quadrants)"),
    "--kernel-size": dict(type=int, metavar="K", help="patch: filter and patch side (default 6)"),
    "--threshold": dict(type=float, metavar="T", help="patch: features are relu(response - T) (default 0.25)"),
    "--whiten": dict(action="store_true", help="patch: ZCA-whiten the patches, fitted on the training images "
                     "before pretraining"),
    "--objective": dict(choices=OBJECTIVES, help="pretraining objective (default reconstruct, the lecture's MSE)"),
    "--noise-std": dict(type=float, metavar="S", help="denoise: Gaussian noise std on [0, 1] pixels (default 0.1)"),
    "--drop-prob": dict(type=float, metavar="P", help="denoise: probability a pixel is zeroed (default 0)"),
    "--mask-ratio": dict(type=float, metavar="R", help="masked: fraction of patches hidden (default 0.6)"),
    "--patch-size": dict(type=int, metavar="P", help="masked: patch side in pixels (default 4)"),
    "--norm-targets": dict(action="store_true", help="masked: per-patch normalised targets (use with "
                           "--output-activation none)"),
    "--sparse-k": dict(type=int, metavar="K", help="sparse: code units kept per image (default 0 = all)"),
    "--lifetime-rate": dict(type=float, metavar="R", help="sparse, patches: fraction of the batch each unit stays "
                            "active for (default 0.05)"),
    "--patches-per-image": dict(type=int, metavar="N", help="patches: random crops per image per step (default 16)"),
    "--augment": dict(action="store_true", help="random crop, flip (and --jitter) on the device, for pretraining "
                      "and fine-tuning"),
    "--crop-padding": dict(type=int, metavar="P", help="augment: padding of the random crop (default 4)"),
    "--jitter": dict(type=float, metavar="J", help="augment: colour jitter strength (default 0 = off)"),
    "--probe-features": dict(choices=PROBE_FEATURES, help="features kNN and the linear probe read: the FC latent or "
                             "every conv stage pooled to 2x2 (default latent)"),
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
    "--precision": dict(choices=PRECISIONS, help="fp32, bf16 (bfloat16 autocast), or auto: bf16 where the CPU/GPU "
                        "has it in hardware, else fp32 (default fp32)"),
    "--seed": dict(type=int, metavar="N", help="seed for weights, split and batch order (default 0)"),
    "--device": dict(choices=DEVICES, help="auto picks CUDA, then Apple's MPS, then the CPU (default auto)"),
    "--out": dict(metavar="DIR", help="run folder (default runs/<timestamp>); must be new or empty"),
    "--checkpoint-every": dict(type=int, metavar="N", help="save the training state every N epochs (default 1; "
                               "0 = at the end of each phase only)"),
}

DATA = ["--data", "--test-data", "--val-fraction", "--cache-dir", "--workers", "--placement"]
MODEL = ["--in-channels", "--height", "--width", "--channels", "--latent-dim", "--upsample", "--norm",
         "--convs-per-stage", "--output-activation", "--arch", "--kernel-size", "--threshold", "--whiten"]
PRETRAIN = ["--pretrain-epochs", "--objective", "--noise-std", "--drop-prob", "--mask-ratio", "--patch-size",
            "--norm-targets", "--sparse-k", "--lifetime-rate", "--patches-per-image"]
AUGMENT = ["--augment", "--crop-padding", "--jitter"]
OPTIM = ["--batch-size", "--lr", "--optimizer", "--weight-decay", "--schedule", "--step-size"]
FINETUNE = ["--finetune-epochs", "--finetune-lr", "--labels-per-class", "--init", "--freeze-encoder"]
EXEC = ["--probe-features", "--checkpoint-every", "--micro-batch", "--compile", "--precision", "--seed", "--device", "--out"]

PRESET = ("--preset", dict(default="seed", choices=list(PRESETS),
                           help="named recipe; seed = the lecture's exact recipe (default seed)"))
CONFIG = ("--config", dict(metavar="FILE", help="YAML or JSON file of config keys; flags given here win"))
RESUME = ("--resume", dict(action="store_true",
                           help="continue the run in --out DIR where it stopped, with its saved config.json"))


def _checkpoint(help_text: str, required: bool = True) -> tuple[str, dict]:
    return ("--checkpoint", dict(metavar="CKPT", required=required, help=help_text))


def _batch(help_text: str) -> tuple[str, dict]:
    """--batch-size with a command's own default stated (the value itself is set in commands.py)."""
    return ("--batch-size", {**FLAGS["--batch-size"], "help": help_text})


# Every command: (help, arguments). A string is a config flag of FLAGS (left out = the preset's or
# the config file's value); a (flag, kwargs) pair is an argument of the command's own.
COMMANDS: dict[str, tuple[str, list]] = {
    "run": ("pretrain the autoencoder, transfer its encoder, fine-tune and evaluate (the lecture's pipeline)",
            [PRESET, CONFIG, RESUME] + DATA + MODEL + PRETRAIN + AUGMENT + OPTIM + FINETUNE + EXEC),
    "pretrain": ("train the autoencoder by reconstruction, without labels",
                 [PRESET, CONFIG, RESUME] + DATA + MODEL + PRETRAIN + AUGMENT + OPTIM + EXEC),
    "finetune": ("fine-tune a classifier from an autoencoder checkpoint (or from scratch)",
                 [PRESET, CONFIG, RESUME, _checkpoint("autoencoder checkpoint to transfer from", False)]
                 + DATA + AUGMENT + OPTIM + FINETUNE + EXEC),
    "sweep": ("compare pretrained fine-tuning, linear probe, kNN and scratch over label budgets and seeds",
              [PRESET, CONFIG, _checkpoint("autoencoder checkpoint to transfer from (default: pretrain once)", False),
               ("--labels-per-class", dict(nargs="+", default=DEFAULT_BUDGETS, metavar="N",
                                           help="label budgets per class; 'all' = every training image "
                                                "(default 25 100 400 all)")),
               ("--seeds", dict(type=int, default=3, metavar="K", help="seeds per budget (default 3)")),
               ("--steps", dict(type=int, default=300, metavar="S",
                                help="optimizer steps per cell, the same for every method (default 300)")),
               ("--methods", dict(nargs="+", choices=list(METHODS), metavar="M", help=f"{', '.join(METHODS)} (default all)")),
               _batch(f"images per step (default {SWEEP_BATCH_SIZE} for the sweep)")]
              + DATA + MODEL + PRETRAIN + AUGMENT + [f for f in OPTIM if f != "--batch-size"] + ["--finetune-lr"]
              + EXEC),
    "evaluate": ("evaluate a checkpoint on a labelled source: classifier accuracy, and kNN and linear probe "
                 "of its frozen encoder with --train-data",
                 [_checkpoint("checkpoint to evaluate (a classifier; an autoencoder with --train-data)"),
                  "--data", "--train-data", "--cache-dir", "--workers",
                  _batch(f"images per forward pass (default {INFERENCE_BATCH_SIZE})"), "--probe-features",
                  "--precision",
                  ("--seed", {**FLAGS["--seed"], "help": "seed of the random-weights baseline and the linear probe "
                                                         "(default 0)"}),
                  "--device", "--out"]),
    "encode": ("embeddings of every image to .npy, a CSV of their sources, and a t-SNE map",
               [_checkpoint("autoencoder or classifier checkpoint"),
                ("--out", dict(metavar="FILE.npy", required=True, help="embeddings file to write (must not exist)")),
                ("--no-map", dict(action="store_true", help="skip the t-SNE map")),
                "--data", "--val-fraction", "--cache-dir", "--workers",
                _batch(f"images per forward pass (default {INFERENCE_BATCH_SIZE})"),
                "--probe-features", "--precision",
                ("--seed", {**FLAGS["--seed"], "help": "seed of the train/val column of the CSV, as in training "
                                                       "(default 0)"}),
                "--device"]),
    "report": ("(re)write RUN_DIR/report.html, one self-contained page",
               [("run_dir", dict(metavar="RUN_DIR"))]),
    "export": ("write a trained part to ONNX (one file, dynamic batch), torch.export (.pt2), safetensors or TorchScript",
               [_checkpoint("autoencoder or classifier checkpoint"),
                ("--format", dict(required=True, choices=EXPORT_FORMATS)),
                ("--part", dict(default="encoder", choices=EXPORT_PARTS, help="which part (default encoder)")),
                ("--out", dict(metavar="FILE", required=True, help="file to write (must not exist)"))]),
    "predict": ("class and probabilities for images, preprocessed as in training",
                [_checkpoint("classifier checkpoint"),
                 ("images", dict(nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")),
                 ("--json", dict(action="store_true", help="print JSON instead of a table")),
                 ("--device", dict(choices=DEVICES, default="auto", help="auto picks CUDA, then Apple's MPS, then the CPU")),
                 ("--batch-size", dict(type=int, default=INFERENCE_BATCH_SIZE, metavar="N",
                                       help=f"images per forward pass (default {INFERENCE_BATCH_SIZE})"))]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convae", allow_abbrev=False,
        description="Convolutional autoencoders for representation learning: pretrain without labels, "
                    "look inside, transfer, fine-tune with few labels.",
    )
    parser.add_argument("--version", action="version", version=f"convae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, arguments) in COMMANDS.items():
        # no prefix matching: --channel must not silently mean --channels
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        for arg in arguments:
            if isinstance(arg, str):  # a config flag: absent unless given, so lower layers keep their value
                p.add_argument(arg, default=argparse.SUPPRESS, dest=arg[2:].replace("-", "_"), **FLAGS[arg])
                continue
            flag, spec = arg
            if flag.startswith("--") and flag in FLAGS and "default" not in spec:
                spec = {**spec, "default": argparse.SUPPRESS, "dest": flag[2:].replace("-", "_")}
            p.add_argument(flag, **spec)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"command", "preset", "config", "checkpoint", "resume"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def _log(msg: str) -> None:
    print(msg, flush=True)


def _warn(msg: str) -> None:
    print(f"convae: warning: {msg}", file=sys.stderr, flush=True)


def _train(args: argparse.Namespace) -> None:
    commands.train(args.command, args.preset, args.config, _overrides(args), _log,
                   checkpoint=getattr(args, "checkpoint", None), resume=args.resume)


def _evaluate(args: argparse.Namespace) -> None:
    overrides = _overrides(args)
    train_data = overrides.pop("train_data", None)
    commands.evaluate(overrides, args.checkpoint, train_data, _log)


def _sweep(args: argparse.Namespace) -> None:
    overrides = {k: v for k, v in _overrides(args).items() if k not in ("labels_per_class", "seeds", "steps", "methods")}
    commands.sweep(args.preset, args.config, overrides, args.labels_per_class, args.seeds, args.steps,
                   args.checkpoint, _log, args.methods)


def _encode(args: argparse.Namespace) -> None:
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "checkpoint", "out", "no_map")}
    commands.encode(overrides, args.checkpoint, args.out, not args.no_map, _log)


HANDLERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "run": _train, "pretrain": _train, "finetune": _train, "evaluate": _evaluate, "sweep": _sweep, "encode": _encode,
    "export": lambda a: commands.export(a.checkpoint, a.format, a.part, a.out, _log),
    "predict": lambda a: commands.predict(a.checkpoint, a.images, a.device, a.batch_size, a.json, _log, _warn),
    "report": lambda a: commands.report(a.run_dir, _log),
}


# flags users reach for that convae spells otherwise, per command
MEANT = {"--epochs": {"sweep": ["--steps"], "*": ["--pretrain-epochs", "--finetune-epochs"]},
         "--bs": {"*": ["--batch-size"]}, "--learning-rate": {"*": ["--lr"]}}


def did_you_mean(command: str, unknown: str, parser: argparse.ArgumentParser) -> list[str]:
    """The flags of ``command`` that ``unknown`` probably meant."""
    import difflib

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    own = [o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    flag = unknown.split("=", 1)[0]
    meant = MEANT.get(flag, {})
    hints = meant.get(command, meant.get("*", []))
    return [h for h in hints if h in own] or difflib.get_close_matches(flag, own, n=1, cutoff=0.8)


def one_line(text: str) -> str:
    """An error as one printable line whatever it quotes (file names may hold newlines or bad bytes)."""
    text = text.replace("\r", "\\r").replace("\n", "\\n").encode("utf-8", "backslashreplace").decode()
    return clip(text, 1000)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        flags = [a for a in extra if a.startswith("-")]
        hints = sorted({h for f in flags for h in did_you_mean(args.command, f, parser)})
        meant = f" (did you mean {' or '.join(hints)}?)" if hints else ""
        print(f"convae {args.command}: error: unrecognized arguments: {' '.join(extra)}{meant}; "
              f"see convae {args.command} --help", file=sys.stderr, flush=True)
        return 2
    try:
        HANDLERS[args.command](args)
    except ConvaeError as e:
        advice = f"; {e.advice}" if e.advice else ""
        print(f"convae: error: {one_line(str(e))}{advice}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:  # the environment, not convae: a full disk, a vanished file, a dead mount
        where = f": {one_line(str(e.filename))}" if e.filename else ""
        print(f"convae: error: {e.strerror or first_line(e)}{where}", file=sys.stderr, flush=True)
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
