"""The ``convae`` command line: parse and dispatch to :mod:`convae.commands`, nothing else.

Flags have the same names in every command where they apply. A flag left out keeps the
value of the preset or of ``--config FILE``; user mistakes end with one line and exit 2.
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .commands import cache, encode, evaluate, export, predict, report, run, sweep, sweep_methods
from .config import DEVICES, INFERENCE_BATCH_SIZE, SWEEP_BATCH_SIZE, Config, presets
from .utils import cores, heap
from .utils.distributed import leave
from .utils.errors import ConvaeError, Interrupted, clip, first_line
from .utils.files import utf8
from .utils.knobs import GROUPS, Choice, group_fields, knobs, value_type


def _flag_spec(name: str) -> dict[str, Any]:
    """argparse keyword arguments of a config knob's flag, from its field: type, choices, help."""
    meta = Config.__dataclass_fields__[name].metadata
    kind, rule = value_type(Config, name), meta["rule"]
    rule = getattr(rule, "rule", rule)  # an optional value: the rule of the value
    if kind is bool:
        return dict(action=argparse.BooleanOptionalAction, help=meta["help"])  # --no-X undoes a preset's X
    spec: dict[str, Any] = dict(help=meta["help"], metavar=meta["metavar"])
    if isinstance(rule, Choice):
        spec = dict(help=meta["help"], choices=rule.names())
    elif kind is tuple:
        spec.update(type=int, nargs="+")
    elif kind in (int, float):
        spec["type"] = kind
    return spec


def config_flags() -> dict[str, dict[str, Any]]:
    """flag -> argparse keyword arguments for every knob of Config that has a flag; dest is the field.
    Built when the parser is: an architecture or objective registered since is among the choices."""
    return {"--" + f.name.replace("_", "-"): _flag_spec(f.name) for f in knobs(Config) if f.metadata["flag"]}


def _group(name: str) -> list[str]:
    return [
        "--" + f.replace("_", "-")
        for f in group_fields(Config, name)
        if Config.__dataclass_fields__[f].metadata["flag"]
    ]


FLAGS = config_flags()
TRAIN_DATA = (
    "--train-data",
    dict(
        metavar="SRC", help="labelled images whose frozen features train the kNN bank and the linear probe (evaluate)"
    ),
)
DATA, MODEL, PRETRAIN, AUGMENT, OPTIM, FINETUNE, EXEC = (_group(g) for g in GROUPS)


def _preset() -> tuple[str, dict]:
    return (
        "--preset",
        dict(
            default="seed",
            choices=list(presets()),
            help="named recipe; seed = the lecture's exact recipe (default seed)",
        ),
    )


CONFIG = ("--config", dict(metavar="FILE", help="YAML or JSON file of config keys; flags given here win"))
RESUME = (
    "--resume",
    dict(action="store_true", help="continue the run in --out DIR where it stopped, with its saved config.json"),
)


def _checkpoint(help_text: str, required: bool = True) -> tuple[str, dict]:
    return ("--checkpoint", dict(metavar="CKPT", required=required, help=help_text))


def _batch(help_text: str) -> tuple[str, dict]:
    """--batch-size with a command's own default stated (the value itself is set in commands.py)."""
    return ("--batch-size", {**FLAGS["--batch-size"], "help": help_text})


def command_specs() -> dict[str, tuple[str, list]]:
    """Every command: (help, arguments). A string is a config flag (left out = the preset's or the
    config file's value); a (flag, kwargs) pair is an argument of the command's own."""
    preset = _preset()
    return {
        "run": (
            "pretrain the autoencoder, transfer its encoder, fine-tune and evaluate (the lecture's pipeline)",
            [preset, CONFIG, RESUME] + DATA + MODEL + PRETRAIN + AUGMENT + OPTIM + FINETUNE + EXEC,
        ),
        "pretrain": (
            "train the autoencoder by reconstruction, without labels",
            [preset, CONFIG, RESUME] + DATA + MODEL + PRETRAIN + AUGMENT + OPTIM + EXEC,
        ),
        "finetune": (
            "fine-tune a classifier from an autoencoder checkpoint (or from scratch)",
            [preset, CONFIG, RESUME, _checkpoint("autoencoder checkpoint to transfer from", False)]
            + DATA
            + AUGMENT
            + OPTIM
            + FINETUNE
            + EXEC,
        ),
        "sweep": (
            "compare pretrained fine-tuning, linear probe, kNN and scratch over label budgets and seeds",
            [
                preset,
                CONFIG,
                (
                    "--resume",
                    dict(
                        action="store_true",
                        help="continue the sweep in --out DIR where it stopped: its finished cells kept, the others "
                        "measured with the same seeds and labelled subsets",
                    ),
                ),
                _checkpoint("autoencoder checkpoint to transfer from (default: pretrain once)", False),
                (
                    "--labels-per-class",
                    dict(
                        nargs="+",
                        default=sweep_methods.DEFAULT_BUDGETS,
                        metavar="N",
                        help="label budgets per class; 'all' = every training image (default 25 100 400 all)",
                    ),
                ),
                ("--seeds", dict(type=int, default=3, metavar="K", help="seeds per budget (default 3)")),
                (
                    "--steps",
                    dict(
                        type=int,
                        default=None,
                        metavar="S",
                        help="optimizer steps per cell, the same for every method (default: the run's "
                        "recipe, --finetune-epochs epochs of at least --epoch-images images; 300 "
                        "steps when --epoch-images is 0)",
                    ),
                ),
                (
                    "--methods",
                    dict(
                        nargs="+",
                        choices=list(sweep_methods.methods()),
                        metavar="M",
                        help=f"{', '.join(sweep_methods.methods())} (default all)",
                    ),
                ),
                (
                    "--curves",
                    dict(
                        action="store_true",
                        help="also evaluate every trained cell along its training, at the end of the epochs that "
                        "pass each tenth of its steps (curve in sweep.json: steps, accuracy, training seconds)",
                    ),
                ),
                _batch(f"images per step (default {SWEEP_BATCH_SIZE} for the sweep)"),
            ]
            + DATA
            + MODEL
            + PRETRAIN
            + AUGMENT
            + [f for f in OPTIM if f != "--batch-size"]
            + [f for f in FINETUNE if f not in ("--labels-per-class", "--init", "--freeze-encoder")]
            + EXEC,
        ),
        "evaluate": (
            "evaluate a checkpoint on a labelled source: classifier accuracy, and kNN and linear probe "
            "of its frozen encoder with --train-data",
            [
                _checkpoint("checkpoint to evaluate (a classifier; an autoencoder with --train-data)"),
                "--data",
                TRAIN_DATA,
                "--cache-dir",
                "--workers",
                _batch(f"images per forward pass (default {INFERENCE_BATCH_SIZE})"),
                "--probe-features",
                "--precision",
                (
                    "--seed",
                    {**FLAGS["--seed"], "help": "seed of the random-weights baseline and the linear probe (default 0)"},
                ),
                "--device",
                "--out",
            ],
        ),
        "encode": (
            "embeddings of every image to .npy, a CSV of their sources, and a t-SNE map",
            [
                _checkpoint("autoencoder or classifier checkpoint"),
                ("--out", dict(metavar="FILE.npy", required=True, help="embeddings file to write (must not exist)")),
                ("--no-map", dict(action="store_true", help="skip the t-SNE map")),
                "--data",
                "--val-fraction",
                "--cache-dir",
                "--workers",
                _batch(f"images per forward pass (default {INFERENCE_BATCH_SIZE})"),
                "--probe-features",
                "--precision",
                (
                    "--seed",
                    {
                        **FLAGS["--seed"],
                        "help": "seed of the train/val column of the CSV (default: the training run's)",
                    },
                ),
                "--device",
            ],
        ),
        **_tool_specs(),
    }


def _tool_specs() -> dict[str, tuple[str, list]]:
    """The commands that take no config: they read a run folder, the cache or a checkpoint."""
    return {
        "cache": (
            "list what the cache holds (decoded sources, extractions, downloads) with sizes, or clean what "
            "no run reads again",
            [
                ("action", dict(choices=["list", "clean"], help="list (default) or clean", nargs="?", default="list")),
                (
                    "--cache-dir",
                    dict(metavar="DIR", default="~/.cache/convae", help="the cache folder (default ~/.cache/convae)"),
                ),
                (
                    "--all",
                    dict(
                        action="store_true",
                        dest="everything",
                        help="clean: remove everything, not only older formats and stopped decodes",
                    ),
                ),
            ],
        ),
        "report": ("(re)write RUN_DIR/report.html, one self-contained page", [("run_dir", dict(metavar="RUN_DIR"))]),
        "export": (
            "write a trained part to ONNX (one file, dynamic batch), torch.export (.pt2), safetensors or TorchScript",
            [
                _checkpoint("autoencoder or classifier checkpoint"),
                ("--format", dict(required=True, choices=export.FORMATS)),
                ("--part", dict(default="encoder", choices=export.PARTS, help="which part (default encoder)")),
                ("--out", dict(metavar="FILE", required=True, help="file to write (must not exist)")),
            ],
        ),
        "predict": (
            "class and probabilities for images, preprocessed as in training",
            [
                _checkpoint("classifier checkpoint"),
                ("images", dict(nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")),
                ("--json", dict(action="store_true", help="print JSON instead of a table")),
                (
                    "--device",
                    dict(choices=DEVICES, default="auto", help="auto picks CUDA, then Apple's MPS, then the CPU"),
                ),
                (
                    "--batch-size",
                    dict(
                        type=int,
                        default=INFERENCE_BATCH_SIZE,
                        metavar="N",
                        help=f"images per forward pass (default {INFERENCE_BATCH_SIZE})",
                    ),
                ),
            ],
        ),
    }


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose user mistakes (a bad choice, a number that is not one, a missing value) end
    with one line and a did-you-mean, not the usage block."""

    def error(self, message: str):  # type: ignore[override]
        import difflib
        import re

        hint = ""
        bad = re.match(r"argument \S+: invalid choice: '(.*)' \(choose from (.*)\)$", message)
        if bad:
            choices = re.findall(r"'([^']*)'", bad.group(2)) or [c.strip() for c in bad.group(2).split(",")]
            close = difflib.get_close_matches(bad.group(1), choices, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
        self.exit(2, f"{self.prog}: error: {one_line(message)}{hint}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="convae",
        allow_abbrev=False,
        description="Convolutional autoencoders for representation learning: pretrain without labels, "
        "look inside, transfer, fine-tune with few labels.",
    )
    parser.add_argument("--version", action="version", version=f"convae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    flags = config_flags()
    for name, (help_text, arguments) in command_specs().items():
        # no prefix matching: --channel must not silently mean --channels
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        for arg in arguments:
            if isinstance(arg, str):  # a config flag: absent unless given, so lower layers keep their value
                p.add_argument(arg, default=argparse.SUPPRESS, dest=arg[2:].replace("-", "_"), **flags[arg])
                continue
            flag, spec = arg
            if flag.startswith("--") and flag in flags and "default" not in spec:
                spec = {**spec, "default": argparse.SUPPRESS, "dest": flag[2:].replace("-", "_")}
            p.add_argument(flag, **spec)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"command", "preset", "config", "checkpoint", "resume"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def _printable(msg: str) -> str:
    """A message any terminal or log file takes: a path that is not UTF-8 (surrogate escapes) as \\xNN."""
    return utf8(msg).decode("utf-8")


def _log(msg: str) -> None:
    print(_printable(msg), flush=True)


def _warn(msg: str) -> None:
    print(_printable(f"convae: warning: {msg}"), file=sys.stderr, flush=True)


def _train(args: argparse.Namespace) -> None:
    run.main(
        args.command,
        args.preset,
        args.config,
        _overrides(args),
        _log,
        checkpoint=getattr(args, "checkpoint", None),
        resume=args.resume,
    )


def _evaluate(args: argparse.Namespace) -> None:
    overrides = _overrides(args)
    train_data = overrides.pop("train_data", None)
    evaluate.main(overrides, args.checkpoint, train_data, _log)


def _sweep(args: argparse.Namespace) -> None:
    # the sweep's own arguments and their defaults: with --resume the plan decides them, so one given is refused
    defaults = {
        "labels_per_class": sweep_methods.DEFAULT_BUDGETS,
        "seeds": 3,
        "steps": None,
        "methods": None,
        "curves": False,
    }
    own = tuple(defaults)
    sweep.main(
        args.preset,
        args.config,
        {k: v for k, v in _overrides(args).items() if k not in own},
        args.labels_per_class,
        args.seeds,
        args.steps,
        args.checkpoint,
        _log,
        args.methods,
        args.curves,
        args.resume,
        [k for k, v in defaults.items() if getattr(args, k) != v],
    )


def _encode(args: argparse.Namespace) -> None:
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "checkpoint", "out", "no_map")}
    encode.main(overrides, args.checkpoint, args.out, not args.no_map, _log)


HANDLERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "run": _train,
    "pretrain": _train,
    "finetune": _train,
    "evaluate": _evaluate,
    "sweep": _sweep,
    "encode": _encode,
    "export": lambda a: export.main(a.checkpoint, a.format, a.part, a.out, _log),
    "predict": lambda a: predict.main(a.checkpoint, a.images, a.device, a.batch_size, a.json, _log, _warn),
    "report": lambda a: report.main(a.run_dir, _log),
    "cache": lambda a: cache.main(a.action, a.cache_dir, a.everything, _log),
}


# flags users reach for that convae spells otherwise, per command
MEANT = {
    "--epochs": {"sweep": ["--steps"], "*": ["--pretrain-epochs", "--finetune-epochs"]},
    "--bs": {"*": ["--batch-size"]},
    "--learning-rate": {"*": ["--lr"]},
}


def did_you_mean(command: str, unknown: str, parser: argparse.ArgumentParser) -> list[str]:
    """The flags of ``command`` that ``unknown`` probably meant."""
    import difflib

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    own = [o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    flag = unknown.split("=", 1)[0]
    hints = MEANT.get(flag, {}).get(command, MEANT.get(flag, {}).get("*", []))
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
        print(
            f"convae {args.command}: error: unrecognized arguments: {' '.join(extra)}{meant}; "
            f"see convae {args.command} --help",
            file=sys.stderr,
            flush=True,
        )
        return 2

    def terminated(signum, frame):  # SIGTERM outside training (decoding, probes, export): stop cleanly
        raise Interrupted(signum, "before it finished", "", resumable=False)

    previous = (
        signal.signal(signal.SIGTERM, terminated) if threading.current_thread() is threading.main_thread() else None
    )
    cores.follow()  # unless OMP_NUM_THREADS pins the threads
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
        if e.resumable:
            resume = f"convae {args.command} --out {e.run_path} --resume"
            print(
                f"convae: stopped by {name} at {e.where}; the state is saved. Resume with: {resume}",
                file=sys.stderr,
                flush=True,
            )
        else:
            kept = f"; what was written so far is in {one_line(e.run_path)}" if e.run_path else ""
            print(f"convae: stopped by {name} {e.where}{kept}", file=sys.stderr, flush=True)
        return 128 + (e.signum or 2)
    except KeyboardInterrupt:
        print("convae: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        cores.stop_following()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def entry() -> None:
    """The ``convae`` command: :func:`main`, then exit with its status."""
    heap.keep_freed_memory()  # the command's own process: each training step reuses the last one's pages
    try:
        status = main()  # argparse's --help, --version and usage errors exit from inside main
    finally:  # the interpreter's last collections walk every object torch and scikit-learn made
        gc.freeze()  # (1.4 s after a tiny run, 2-core CPU); frozen, they go with the process (files are closed)
    leave(status)
