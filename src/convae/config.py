"""Run configuration: one dataclass, named presets, file and CLI overrides, validation.

Precedence, lowest first: dataclass defaults < preset < ``--config FILE`` < CLI flags.
Unknown keys and invalid values are refused before any work starts.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .augment import AugmentConfig
from .errors import ConvaeError, clip, first_line
from .models import ModelConfig
from .objectives import ObjectiveConfig
from .validation import validate


# Every batch-size default, in one place.
TRAIN_BATCH_SIZE = 2000  # the lecture's batch
SWEEP_BATCH_SIZE = 256  # the sweep counts steps, so small label budgets get as many updates as large ones
INFERENCE_BATCH_SIZE = 1024  # images per forward pass when only features or predictions are wanted


@dataclass(frozen=True)
class Config:
    """The full, final configuration of a run; saved as ``config.json`` in the run folder.

    Frozen and validated on construction: a changed value is a new config
    (``dataclasses.replace``), which is validated again.
    """

    # data
    data: str = "cifar10"
    test_data: str | None = None
    cache_dir: str = "~/.cache/convae"
    val_fraction: float = 0.1
    labels_per_class: int | None = None
    workers: int = 0  # processes that decode a source the first time (0 = every core)
    placement: str = "auto"  # where training images live: auto (by size), device (all on it) or host (streamed)
    # model (the seed preset is the lecture's network)
    in_channels: int = 3
    height: int = 32
    width: int = 32
    channels: tuple[int, ...] = (64, 128, 128)
    latent_dim: int = 1024
    upsample: str = "bilinear"
    norm: str = "none"
    convs_per_stage: int = 1
    output_activation: str = "relu"
    arch: str = "stages"  # stages (the lecture's family) or patch (one wide conv, see convae.patchnet)
    kernel_size: int = 6
    threshold: float = 0.25
    whiten: bool = False
    # pretraining objective (see convae.objectives) and augmentation (see convae.augment)
    objective: str = "reconstruct"
    noise_std: float = 0.1
    drop_prob: float = 0.0
    mask_ratio: float = 0.6
    patch_size: int = 4
    norm_targets: bool = False
    sparse_k: int = 0
    lifetime_rate: float = 0.05
    patches_per_image: int = 16
    augment: bool = False
    crop_padding: int = 4
    jitter: float = 0.0
    probe_features: str = "latent"  # what kNN and the linear probe read: the FC latent or pooled conv stages
    # optimisation, shared by both phases unless a finetune_* value is set
    pretrain_epochs: int = 5
    finetune_epochs: int = 5
    batch_size: int = TRAIN_BATCH_SIZE
    lr: float = 1e-3
    finetune_lr: float | None = None
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "none"
    step_size: int = 30  # epochs between 10x decays with schedule "step"
    init: str = "pretrained"
    init_checkpoint: str | None = None  # the autoencoder a fine-tuning run started from
    freeze_encoder: bool = False
    # execution
    tensorboard: bool = True  # log to RUN/tensorboard when the tensorboard package is installed
    checkpoint_every: int = 1  # save the training state every N epochs (0: at phase ends only)
    compile: bool = False  # torch.compile the training model (measured slower on CPU; see BENCHMARKS.md)
    micro_batch: int = 0  # images per forward/backward chunk; 0 = auto (CPU: 200 fp32, 500 bf16; GPU: whole batch)
    precision: str = "fp32"
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    preset: str = "seed"

    def __post_init__(self) -> None:
        if isinstance(self.channels, list):
            object.__setattr__(self, "channels", tuple(self.channels))
        validate(self)

    def model_config(self, num_classes: int = 10) -> ModelConfig:
        return ModelConfig(
            in_channels=self.in_channels,
            height=self.height,
            width=self.width,
            channels=tuple(self.channels),
            latent_dim=self.latent_dim,
            upsample=self.upsample,
            num_classes=num_classes,
            norm=self.norm,
            convs_per_stage=self.convs_per_stage,
            output_activation=self.output_activation,
            arch=self.arch,
            kernel_size=self.kernel_size,
            threshold=self.threshold,
            whiten=self.whiten,
        )

    def with_model(self, m: ModelConfig) -> "Config":
        """This config with the data format and architecture of a checkpoint's model."""
        return replace(self, in_channels=m.in_channels, height=m.height, width=m.width, channels=tuple(m.channels),
                       latent_dim=m.latent_dim, upsample=m.upsample, norm=m.norm,
                       convs_per_stage=m.convs_per_stage, output_activation=m.output_activation, arch=m.arch,
                       kernel_size=m.kernel_size, threshold=m.threshold, whiten=m.whiten)

    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig(name=self.objective, noise_std=self.noise_std, drop_prob=self.drop_prob,
                               mask_ratio=self.mask_ratio, patch_size=self.patch_size,
                               norm_targets=self.norm_targets, sparse_k=self.sparse_k,
                               lifetime_rate=self.lifetime_rate, patches_per_image=self.patches_per_image,
                               crop_size=self.kernel_size)

    def augment_config(self) -> AugmentConfig | None:
        """None when augmentation is off (the seed preset)."""
        return AugmentConfig(crop_padding=self.crop_padding, flip=True, jitter=self.jitter) if self.augment else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d


PRESETS: dict[str, dict[str, Any]] = {
    # The lecture's exact recipe: 3x32x32, 64-128-128, latent 1024, bilinear, Adam 1e-3,
    # batch 2000, 5 epochs of MSE pretraining then 5 epochs of cross-entropy fine-tuning.
    "seed": {},
    # The lecture's advice taken: train much longer, with a learning-rate schedule.
    "long": {"pretrain_epochs": 100, "finetune_epochs": 30, "schedule": "cosine", "batch_size": 500},
    # Pretraining that is meant to pay (benchmarks/learning_quality.py): the lecture's widths with
    # batch norm, a denoising objective (noise and dropped pixels), on-device crop+flip for both
    # phases, AdamW with a cosine schedule, probes on pooled conv features. 20 epochs: under 30
    # minutes on a 2-core CPU in bf16.
    "denoise": {"norm": "batch", "output_activation": "none", "objective": "denoise", "noise_std": 0.2,
                "drop_prob": 0.25, "augment": True, "batch_size": 256, "optimizer": "adamw", "weight_decay": 0.05,
                "schedule": "cosine", "pretrain_epochs": 20, "finetune_epochs": 30, "probe_features": "pooled"},
    # One wide convolution learned as a sparse autoencoder of 6x6 patches (convae.patchnet: Coates
    # et al. 2011's single layer with Makhzani & Frey's lifetime sparsity); features are the code
    # averaged over quadrants. Pretraining takes minutes, not hours, on a 2-core CPU.
    "patches": {"arch": "patch", "channels": (400,), "kernel_size": 6, "threshold": 0.25, "whiten": True,
                "objective": "patches",
                "patches_per_image": 16, "lifetime_rate": 0.05, "batch_size": 256, "pretrain_epochs": 5,
                "finetune_epochs": 30, "augment": True, "optimizer": "adamw", "weight_decay": 0.05,
                "schedule": "cosine", "probe_features": "pooled"},
}

MAX_CONFIG_BYTES = 2**20
FIELD_NAMES = {f.name for f in fields(Config)}
FLOAT_FIELDS = ("lr", "finetune_lr", "weight_decay", "val_fraction", "noise_std", "drop_prob", "mask_ratio",
                "lifetime_rate", "jitter", "threshold")


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
    if preset not in PRESETS:
        raise ConvaeError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    values: dict[str, Any] = dict(PRESETS[preset])
    layers = [read_config_file(file)] if file else []
    layers.append(dict(overrides or {}))
    for layer in layers:
        unknown = sorted(set(layer) - FIELD_NAMES)
        if unknown:
            hints = [m for k in unknown for m in difflib.get_close_matches(k, sorted(FIELD_NAMES), n=1, cutoff=0.6)]
            raise ConvaeError(f"unknown config key(s): {clip(', '.join(unknown), 100)}"
                              + (f" (did you mean {', '.join(hints)}?)" if hints else ""))
        values.update(layer)
    values["preset"] = preset
    if isinstance(values.get("channels"), list):
        values["channels"] = tuple(values["channels"])
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
    from .files import atomic_write_text

    atomic_write_text(path, json.dumps({k: v for k, v in cfg.to_dict().items() if k != "out"}, indent=2) + "\n")


def load_run_config(run_dir: str | Path) -> Config:
    """The config saved in an earlier run folder, to continue that run; ``out`` is ``run_dir``
    itself (a folder that was moved or copied continues where it is now)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConvaeError(f"{run_dir} is not a run folder to continue (no config.json)",
                          advice="--resume needs --out DIR of an earlier run")
    try:
        values = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as e:
        raise ConvaeError(f"{path} is not a readable convae config ({clip(first_line(e), 100)})") from None
    if not isinstance(values, dict) or set(values) - FIELD_NAMES:
        raise ConvaeError(f"{path} is not a convae config (a mapping of known keys)")
    values["out"] = str(run_dir)
    try:
        return Config(**values)
    except ConvaeError as e:
        raise ConvaeError(f"{path}: {e}") from None
