"""Run configuration: one dataclass, named presets, file and CLI overrides, validation.

Precedence, lowest first: dataclass defaults < preset < ``--config FILE`` < CLI flags.
Unknown keys and invalid values are refused before any work starts.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from ..data.augment import AugmentConfig, AugmentKnobs
from ..data.batches import PLACEMENTS
from ..models.model_config import ModelConfig, ModelKnobs, model_knobs
from ..models.objectives import ObjectiveConfig, ObjectiveKnobs
from ..models.registry import ARCHITECTURES
from ..utils.device import micro_batch_size, resolve_precision
from ..utils.errors import ConvaeError, clip, first_line
from ..utils.files import read_file
from ..utils.knobs import Choice, Flag, Int, Num, Optional, PathRule, float_fields, group_fields, knob
from .modes import ConsistencyKnobs, JointKnobs
from .validation import validate

# Every batch-size default, in one place.
TRAIN_BATCH_SIZE = 2000  # the lecture's batch
SWEEP_BATCH_SIZE = 256  # the sweep counts steps, so small label budgets get as many updates as large ones
INFERENCE_BATCH_SIZE = 1024  # images per forward pass when only features or predictions are wanted


OPTIMIZERS = ("adam", "adamw", "sgd", "nesterov")
SCHEDULES = ("none", "cosine", "step", "triangle")
INITS = ("pretrained", "scratch")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
PROBE_FEATURES = ("latent", "pooled")
MAX_SEED = 2**32 - 1  # every RNG convae seeds (torch, numpy, t-SNE) takes this range
MAX_EPOCH_IMAGES = 10**8


@dataclass(frozen=True)
class RecipeKnobs:
    """The fine-tuning recipe's knobs (its parts are :mod:`convae.training.recipe`)."""

    warmup: float = knob(
        0.0,
        Num(0, hi=1),
        "--schedule triangle: fraction of the phase's steps the learning rate rises over (default 0)",
        group="optim",
        metavar="F",
    )
    label_smoothing: float = knob(
        0.0,
        Num(0, hi=1),
        "fine-tuning: label smoothing of the cross-entropy (default 0)",
        group="finetune",
        metavar="S",
    )
    ema: float = knob(
        0.0,
        Num(0, hi=1),
        "fine-tuning: evaluate and save an average of the weights, updated every "
        "step with this decay (default 0 = off; e.g. 0.99)",
        group="finetune",
        metavar="D",
    )
    lp_ft: bool = knob(
        False,
        Flag(),
        "fine-tuning: fit the head on the frozen features first (logistic regression "
        "to convergence), then train everything (LP-FT)",
        group="finetune",
    )
    epoch_images: int = knob(
        0,
        # the epoch's order is drawn before its first step: 8 bytes an image, 0.8 GB at the bound
        Int(0, hi=MAX_EPOCH_IMAGES),
        "fine-tuning: each epoch sees at least N images, the labelled set repeated "
        "(default 0 = one pass; at most 100,000,000), so few labels still get enough steps",
        group="finetune",
        metavar="N",
    )


@dataclass(frozen=True)
class DataKnobs:
    data: str = knob(
        "cifar10",
        PathRule(),
        "cifar10, a folder (class folders = labelled) or a .tar/.tar.gz/.zip of one (default: cifar10)",
        group="data",
        metavar="SRC",
    )
    test_data: str | None = knob(
        None,
        PathRule(optional=True),
        "evaluate on this source instead of a validation split (cifar10 = its test split)",
        group="data",
        metavar="SRC",
    )
    val_fraction: float = knob(
        0.1,
        Num(0, lo_open=True, hi=1),
        "fraction of --data held out, stratified and seeded (default 0.1)",
        group="data",
        metavar="F",
    )
    cache_dir: str = knob(
        "~/.cache/convae",
        PathRule(),
        "where downloads, extracted archives and decoded tensors are kept (default ~/.cache/convae)",
        group="data",
        metavar="DIR",
    )
    workers: int = knob(
        0,
        Int(0, 1024, note="0 = every core"),
        "processes that decode a source the first time (default 0 = every core)",
        group="data",
        metavar="N",
    )
    placement: str = knob(
        "auto",
        Choice(PLACEMENTS),
        "where the training images live: device (one tensor on the "
        "training device), host (batches read from the cache and prefetched), auto (default: the "
        "device when the set fits in half its free memory; on the CPU always host)",
        group="data",
    )


@dataclass(frozen=True)
class TrainKnobs:
    """Optimisation, shared by both phases unless a finetune_* value is set."""

    pretrain_epochs: int = knob(5, Int(0), "autoencoder epochs (seed: 5)", group="pretrain", metavar="N")
    finetune_epochs: int = knob(5, Int(0), "classifier epochs (seed: 5)", group="finetune", metavar="N")
    batch_size: int = knob(TRAIN_BATCH_SIZE, Int(1), "images per step (seed: 2000)", group="optim", metavar="N")
    lr: float = knob(1e-3, Num(0, lo_open=True), "learning rate (seed: 1e-3)", group="optim", metavar="LR")
    finetune_lr: float | None = knob(
        None,
        Optional(Num(0, lo_open=True)),
        "learning rate for fine-tuning (default: --lr)",
        group="finetune",
        metavar="LR",
    )
    optimizer: str = knob("adam", Choice(OPTIMIZERS), "optimizer (seed: adam)", group="optim")
    weight_decay: float = knob(0.0, Num(0), "weight decay (seed: 0)", group="optim", metavar="WD")
    schedule: str = knob(
        "none",
        Choice(SCHEDULES),
        "learning-rate schedule: cosine and step change at epoch boundaries, "
        "triangle (--warmup, then linear decay to 0) every step (seed: none)",
        group="optim",
    )
    step_size: int = knob(
        30, Int(1), "epochs between 10x decays for --schedule step (default 30)", group="optim", metavar="N"
    )
    labels_per_class: int | None = knob(
        None,
        Optional(Int(1)),
        "fine-tune on only N labelled images per class (pretraining still uses all)",
        group="finetune",
        metavar="N",
    )
    init: str = knob(
        "pretrained",
        Choice(INITS),
        "classifier encoder: transferred from the autoencoder, or random (default pretrained)",
        group="finetune",
    )
    init_checkpoint: str | None = knob(None, PathRule(optional=True), flag=False)  # the autoencoder fine-tuned from
    freeze_encoder: bool = knob(False, Flag(), "train only the linear head (linear probe)", group="finetune")


@dataclass(frozen=True)
class ExecKnobs:
    probe_features: str = knob(
        "latent",
        Choice(PROBE_FEATURES),
        "features kNN and the linear probe read: latent (what the classifier's head reads: the stages network's FC "
        "latent, the blocks network's pooled map) or pooled (every conv stage pooled to 2x2); default latent",
        group="exec",
    )
    tensorboard: bool = knob(True, Flag(), flag=False)  # log to RUN/tensorboard when the package is installed
    checkpoint_every: int = knob(
        1,
        Int(0, note="0 = at phase ends only"),
        "save the training state every N epochs (default 1; 0 = at the end of each phase only)",
        group="exec",
        metavar="N",
    )
    compile: bool = knob(False, Flag(), "torch.compile the training model (pays on GPUs; slower on CPU)", group="exec")
    micro_batch: int = knob(
        0,
        Int(0, note="0 = auto"),
        "accumulate each batch's gradient over chunks of N images (faster on CPU): the same update for a "
        "network without batch norm; with batch norm each chunk is normalised with its own statistics (ghost "
        "batch norm). 0 = auto: on CPU 200 (fp32) or 500 (bf16), whole batch on GPU; config.json records the "
        "chunk used",
        group="exec",
        metavar="N",
    )
    precision: str = knob(
        "fp32",
        Choice(PRECISIONS),
        "fp32, bf16 (bfloat16 autocast), fp16 (float16 autocast with a "
        "gradient scaler; CUDA only), or auto: bf16 where the CPU/GPU has it in hardware, fp16 on an "
        "older CUDA GPU, else fp32 (default fp32)",
        group="exec",
    )
    seed: int = knob(
        0,
        Int(0, MAX_SEED, text="an integer in [0, 2**32)"),
        "seed for weights, split and batch order (default 0)",
        group="exec",
        metavar="N",
    )
    device: str = knob(
        "auto", Choice(DEVICES), "auto picks CUDA, then Apple's MPS, then the CPU (default auto)", group="exec"
    )
    out: str | None = knob(
        None,
        PathRule(optional=True),
        "run folder (default runs/<timestamp>); must be new or empty",
        group="exec",
        metavar="DIR",
    )


@dataclass(frozen=True)
class Config(
    ExecKnobs,
    ConsistencyKnobs,
    JointKnobs,
    RecipeKnobs,
    TrainKnobs,
    AugmentKnobs,
    ObjectiveKnobs,
    ModelKnobs,
    DataKnobs,
):
    """The full, final configuration of a run; saved as ``config.json`` in the run folder.

    Its sections are declared once, each with its knobs' rules and flags: data (here), the model
    (:class:`convae.models.model_config.ModelKnobs`), the objective (:class:`convae.models.objectives.ObjectiveKnobs`),
    the augmentation (:class:`convae.data.augment.AugmentKnobs`), training (here), the fine-tuning
    recipe (here), the training modes' (:class:`convae.config.modes.JointKnobs` and ``ConsistencyKnobs``)
    and execution (here).
    Frozen and validated on construction: a changed value is a new config
    (``dataclasses.replace``), which is validated again.
    """

    preset: str = "seed"

    def __post_init__(self) -> None:
        if isinstance(self.channels, list):
            object.__setattr__(self, "channels", tuple(self.channels))
        validate(self)

    def for_device(self, device: torch.device, warn: Callable[[str], None]) -> Config:
        """This config for ``device``, as every command records it: ``precision`` resolved (``auto``, or what the
        device cannot run, said through ``warn``), and ``micro_batch`` (0 = auto) the chunk the batches are
        computed in there (0: whole batches): with batch norm it is the set each normalisation's statistics are
        taken over, so the config says which it was."""
        precision = resolve_precision(self.precision, device, warn=warn)
        micro = micro_batch_size(self.micro_batch, precision, device) or 0
        return replace(self, precision=precision, micro_batch=micro)

    def model_config(self, num_classes: int = 10) -> ModelConfig:
        return ModelConfig(**model_knobs(self), num_classes=num_classes)

    def with_model(self, m: ModelConfig) -> Config:
        """This config with the data format and architecture of a checkpoint's model; the classifier's own
        knobs (test-time flip) stay this config's: they are not the pretrained autoencoder's to decide."""
        return replace(self, **{k: v for k, v in model_knobs(m).items() if k not in CLASSIFIER_KNOBS})

    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig(
            **{f: getattr(self, f) for f in ObjectiveKnobs.__dataclass_fields__}, crop_size=self.kernel_size
        )

    def augment_config(self, classify: bool = False) -> AugmentConfig | None:
        """None when augmentation is off (the seed preset); Cutout only where a classifier trains
        (``classify``): the reconstruction objectives hide or corrupt parts of the image themselves."""
        if not self.augment:
            return None
        return AugmentConfig(
            crop_padding=self.crop_padding, flip=True, jitter=self.jitter, cutout=self.cutout if classify else 0
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d


BASE_PRESETS: dict[str, dict[str, Any]] = {
    # The lecture's exact recipe: 3x32x32, 64-128-128, latent 1024, bilinear, Adam 1e-3,
    # batch 2000, 5 epochs of MSE pretraining then 5 epochs of cross-entropy fine-tuning.
    "seed": {},
    # The lecture's advice taken: train much longer, with a learning-rate schedule.
    "long": {"pretrain_epochs": 100, "finetune_epochs": 30, "schedule": "cosine", "batch_size": 500},
    # Pretraining that is meant to pay (benchmarks/learning_quality.py): the lecture's widths with
    # batch norm, a denoising objective (noise and dropped pixels), on-device crop+flip for both
    # phases, AdamW with a cosine schedule, probes on pooled conv features. 20 epochs: under 30
    # minutes on a 2-core CPU in bf16.
    "denoise": {
        "norm": "batch",
        "output_activation": "none",
        "objective": "denoise",
        "noise_std": 0.2,
        "drop_prob": 0.25,
        "augment": True,
        "batch_size": 256,
        "optimizer": "adamw",
        "weight_decay": 0.05,
        "schedule": "cosine",
        "pretrain_epochs": 20,
        "finetune_epochs": 30,
        "probe_features": "pooled",
    },
}


def presets() -> dict[str, dict[str, Any]]:
    """Every named recipe: the base ones and those each registered architecture brings."""
    return {**BASE_PRESETS, **{n: p for a in ARCHITECTURES.values() for n, p in a.presets.items()}}


PRESETS = presets()  # as registered at import; presets() sees architectures registered later

CLASSIFIER_KNOBS = frozenset(group_fields(ModelKnobs, "finetune"))  # model knobs a checkpoint does not decide
MAX_CONFIG_BYTES = 2**20
FIELD_NAMES = {f.name for f in fields(Config)}
FLOAT_FIELDS = float_fields(Config)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping; keys may use dashes or underscores."""
    p = Path(path)
    if not p.is_file():
        raise ConvaeError(f"config file not found: {p}")
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConvaeError(f"config file {p} is over {MAX_CONFIG_BYTES // 2**20} MiB: not a convae config")
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConvaeError(f"config file {p} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConvaeError(f"config file {p} could not be read ({e.strerror})") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # a parse error is the user's file, not our bug
        raise ConvaeError(f"config file {p} could not be parsed: {clip(first_line(e), 120)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConvaeError(f"config file {p} must hold a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(
    preset: str = "seed", file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Defaults, then the preset, then the config file, then ``overrides`` (the CLI flags)."""
    named = presets()
    if preset not in named:
        raise ConvaeError(f"unknown preset {preset!r}; choose one of: {', '.join(named)}")
    values: dict[str, Any] = dict(named[preset])
    layers = [read_config_file(file)] if file else []
    layers.append(dict(overrides or {}))
    for layer in layers:
        unknown = sorted(set(layer) - FIELD_NAMES)
        if unknown:
            hints = [m for k in unknown for m in difflib.get_close_matches(k, sorted(FIELD_NAMES), n=1, cutoff=0.6)]
            raise ConvaeError(
                f"unknown config key(s): {clip(', '.join(unknown), 100)}"
                + (f" (did you mean {', '.join(hints)}?)" if hints else "")
            )
        values.update(layer)
    values["preset"] = preset
    if isinstance(values.get("channels"), list):
        values["channels"] = tuple(values["channels"])
    for name, value in values.items():
        # YAML 1.1 reads off, on, no and yes as booleans: a choice among words takes the word back
        rule = Config.__dataclass_fields__[name].metadata.get("rule")  # unknown keys were refused above
        if isinstance(value, bool) and isinstance(rule, Choice):
            words = [w for w in (("on", "yes", "true") if value else ("off", "no", "false")) if w in rule.names()]
            values[name] = words[0] if words else value
    for name in FLOAT_FIELDS:
        # YAML 1.1 reads "1e-3" as a string; accept any numeric spelling
        if isinstance(values.get(name), str):
            try:
                values[name] = float(values[name])
            except ValueError:
                pass  # left for validate() to refuse with the valid range
    return Config(**values)


def save_config(cfg: Config, path: Path) -> None:
    """``config.json`` of a run folder: every key but ``out`` (the folder is where the file is),
    so ``--config RUN/config.json`` reruns the recipe into a new folder."""
    from ..utils.files import atomic_write_text

    atomic_write_text(path, json.dumps({k: v for k, v in cfg.to_dict().items() if k != "out"}, indent=2) + "\n")


def load_run_config(run_dir: str | Path) -> Config:
    """The config saved in an earlier run folder, to continue that run; ``out`` is ``run_dir``
    itself (a folder that was moved or copied continues where it is now)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConvaeError(
            f"{run_dir} is not a run folder to continue (no config.json)",
            advice="--resume needs --out DIR of an earlier run",
        )
    try:
        values = json.loads(read_file(path).decode("utf-8"))
    except (ValueError, OSError) as e:
        raise ConvaeError(f"{path} is not a readable convae config ({clip(first_line(e), 100)})") from None
    if not isinstance(values, dict) or set(values) - FIELD_NAMES:
        raise ConvaeError(f"{path} is not a convae config (a mapping of known keys)")
    values["out"] = str(run_dir)
    try:
        return Config(**values)
    except ConvaeError as e:
        raise ConvaeError(f"{path}: {e}") from None
