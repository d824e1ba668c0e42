"""Every rule a configuration must satisfy, checked before any work starts.

A value from a config file, a flag or a checkpoint is untrusted: wrong types, non-finite
numbers and sizes this machine cannot hold are refused with one short line that names the
key and the valid range (a value is never echoed at unbounded length).
"""

from __future__ import annotations

import math
import os
from typing import Any

from .errors import ConvaeError, clip, short
from .models import ARCHS, NORMS, OUTPUT_ACTIVATIONS, UPSAMPLE_MODES, ModelConfig
from .objectives import OBJECTIVES

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "step")
INITS = ("pretrained", "scratch")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "auto")
PROBE_FEATURES = ("latent", "pooled")
PLACEMENTS = ("auto", "device", "host")
MAX_SEED = 2**32 - 1  # every RNG convae seeds (torch, numpy, t-SNE) takes this range
MODEL_FIELDS = {"in_channels", "height", "width", "channels", "latent_dim", "upsample", "negative_slope",
                "num_classes", "norm", "convs_per_stage", "output_activation", "arch", "kernel_size", "threshold",
                "whiten"}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConvaeError(message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def memory_bytes() -> int:
    """The machine's physical memory (bytes), or 0 when the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def parameter_count(m: ModelConfig) -> int:
    """Parameters of the autoencoder ``m`` describes, computed without building it."""
    if m.arch == "patch":  # filters (no bias) + the dictionary (with bias)
        patch = m.in_channels * m.kernel_size**2
        return m.channels[0] * patch + (m.channels[0] + 1) * patch
    convs, c_in = 0, m.in_channels
    for c in m.channels:
        convs += c_in * c * 9 + c + (m.convs_per_stage - 1) * (c * c * 9 + c)
        c_in = c
    flat = m.channels[-1] * math.ceil(m.height / 2 ** len(m.channels)) * math.ceil(m.width / 2 ** len(m.channels))
    fc = 2 * flat * m.latent_dim + flat + m.latent_dim
    return 2 * convs + fc  # the decoder mirrors the encoder's convolutions


def training_bytes(m: ModelConfig, images: int) -> int:
    """A floor on the memory training ``m`` needs for ``images`` images at once (fp32 Adam):
    weights, gradients and two moments per parameter, and the activations the backward pass keeps."""
    per_image, (h, w) = 0, (m.height, m.width)
    if m.arch == "patch":  # the code map and the per-position patches it decodes to
        positions = (h - m.kernel_size + 1) * (w - m.kernel_size + 1)
        per_image = (m.channels[0] + m.in_channels * m.kernel_size**2) * positions
    for c in m.channels if m.arch == "stages" else ():
        h, w = (h + 1) // 2, (w + 1) // 2
        per_image += c * h * w * (m.convs_per_stage + 1)
    per_image = 2 * per_image + (m.channels[0] + m.in_channels) * m.height * m.width  # encoder + decoder
    return 16 * parameter_count(m) + 4 * 3 * per_image * images


def validate_model(m: ModelConfig, where: str = "") -> None:
    """The architecture's rules: types, ranges and a size this machine can hold."""
    _check(m.in_channels in (1, 3), f"{where}in_channels must be 1 (grey) or 3 (RGB), got {short(m.in_channels)}")
    for name in ("height", "width", "latent_dim", "convs_per_stage", "num_classes"):
        v = getattr(m, name)
        _check(_is_int(v) and v > 0, f"{where}{name} must be an integer > 0, got {short(v)}")
    ch = m.channels
    _check(isinstance(ch, (list, tuple)) and 0 < len(ch) <= 8 and all(_is_int(c) and c > 0 for c in ch),
           f"{where}channels must be a list of 1 to 8 integers > 0, got {short(ch)}")
    _check(_is_num(m.negative_slope), f"{where}negative_slope must be a finite number, got {short(m.negative_slope)}")
    for name, choices in (("upsample", UPSAMPLE_MODES), ("norm", NORMS), ("output_activation", OUTPUT_ACTIVATIONS),
                          ("arch", ARCHS)):
        v = getattr(m, name)
        _check(isinstance(v, str) and v in choices, f"{where}{name} must be one of {', '.join(choices)}; got {short(v)}")
    _validate_patch(m, where)
    # every stage halves the size; below 2**stages the deepest feature map would be padding only
    smallest = 2 ** len(ch) if m.arch == "stages" else 2
    _check(m.height >= smallest and m.width >= smallest,
           f"{where}input size {m.height}x{m.width} is too small for {len(ch)} encoder stages: "
           f"height and width must be >= {smallest}")
    ram = memory_bytes()
    need = training_bytes(m, images=1)
    _check(not ram or need <= ram,
           f"{where}the model ({m.height}x{m.width} input, widths {short(list(ch), 40)}, latent {m.latent_dim}) "
           f"needs at least {need / 2**30:.3g} GiB to train one image, more than this machine's "
           f"{ram / 2**30:.3g} GiB of memory")


def _validate_patch(m: ModelConfig, where: str) -> None:
    """The patch architecture's keys (checked for every arch: a config file's value is never ignored unseen)."""
    k = m.kernel_size
    _check(_is_int(k) and k >= 2, f"{where}kernel_size must be an integer >= 2, got {short(k)}")
    _check(_is_num(m.threshold) and m.threshold >= 0,
           f"{where}threshold must be a number >= 0 and finite, got {short(m.threshold)}")
    _check(isinstance(m.whiten, bool), f"{where}whiten must be true or false, got {short(m.whiten)}")
    if m.arch != "patch":
        return
    _check(len(m.channels) == 1, f"{where}the patch architecture has one layer: channels must be one width (the "
           f"number of filters), got {short(list(m.channels), 40)}")
    _check(k <= min(m.height, m.width), f"{where}kernel_size must be at most the input size "
           f"{min(m.height, m.width)}, got {k}")


def model_config_from_dict(d: Any, where: str = "") -> ModelConfig:
    """A :class:`ModelConfig` from untrusted data (a checkpoint's ``config``), validated."""
    _check(isinstance(d, dict), f"{where}the model config is not a mapping")
    unknown = sorted(str(k) for k in d if k not in MODEL_FIELDS)
    _check(not unknown, f"{where}unknown model config key(s): {clip(', '.join(unknown), 80)}")
    try:
        m = ModelConfig.from_dict(dict(d))
    except (TypeError, ValueError) as e:
        raise ConvaeError(f"{where}the model config is invalid ({clip(str(e), 80)})") from None
    validate_model(m, where)
    return m


def validate(cfg: Any) -> None:
    """Refuse every invalid value of a run :class:`~convae.config.Config` with the valid range."""
    for name in ("data", "cache_dir"):
        v = getattr(cfg, name)
        _check(isinstance(v, str) and v != "", f"{name} must be a non-empty path, got {short(v)}")
    for name in ("test_data", "out", "init_checkpoint"):
        v = getattr(cfg, name)
        _check(v is None or (isinstance(v, str) and v != ""), f"{name} must be a path or null, got {short(v)}")
    # before model_config(): ModelConfig casts the widths with int(), which would pass 16.5 as 16
    ch = cfg.channels
    _check(isinstance(ch, (list, tuple)) and 0 < len(ch) <= 8 and all(_is_int(c) and c > 0 for c in ch),
           f"channels must be a list of 1 to 8 integers > 0, got {short(ch)}")
    for name in ("pretrain_epochs", "finetune_epochs"):
        v = getattr(cfg, name)
        _check(_is_int(v) and v >= 0, f"{name} must be an integer >= 0, got {short(v)}")
    for name in ("batch_size", "step_size", "patch_size", "patches_per_image"):
        v = getattr(cfg, name)
        _check(_is_int(v) and v > 0, f"{name} must be an integer > 0, got {short(v)}")
    for name in ("lr", "finetune_lr"):
        v = getattr(cfg, name)
        if v is None and name == "finetune_lr":
            continue
        _check(_is_num(v) and v > 0, f"{name} must be a number > 0 and finite, got {short(v)}")
    _check(_is_num(cfg.weight_decay) and cfg.weight_decay >= 0,
           f"weight_decay must be a number >= 0 and finite, got {short(cfg.weight_decay)}")
    _check(_is_num(cfg.val_fraction) and 0 < cfg.val_fraction < 1,
           f"val_fraction must be in (0, 1), got {short(cfg.val_fraction)}")
    if cfg.labels_per_class is not None:
        _check(_is_int(cfg.labels_per_class) and cfg.labels_per_class > 0,
               f"labels_per_class must be an integer > 0, got {short(cfg.labels_per_class)}")
    _check(_is_int(cfg.checkpoint_every) and cfg.checkpoint_every >= 0,
           f"checkpoint_every must be an integer >= 0 (0 = at phase ends only), got {short(cfg.checkpoint_every)}")
    _check(_is_int(cfg.workers) and 0 <= cfg.workers <= 1024,
           f"workers must be an integer in [0, 1024] (0 = every core), got {short(cfg.workers)}")
    _check(_is_int(cfg.micro_batch) and cfg.micro_batch >= 0,
           f"micro_batch must be an integer >= 0 (0 = auto), got {short(cfg.micro_batch)}")
    _check(_is_int(cfg.seed) and 0 <= cfg.seed <= MAX_SEED, f"seed must be an integer in [0, 2**32), got {short(cfg.seed)}")
    for name in ("compile", "tensorboard", "freeze_encoder", "augment", "norm_targets"):
        v = getattr(cfg, name)
        _check(isinstance(v, bool), f"{name} must be true or false, got {short(v)}")
    for name in ("noise_std", "jitter"):
        v = getattr(cfg, name)
        _check(_is_num(v) and v >= 0, f"{name} must be a number >= 0 and finite, got {short(v)}")
    for name in ("drop_prob", "mask_ratio", "lifetime_rate"):
        v = getattr(cfg, name)
        _check(_is_num(v) and 0 <= v < 1, f"{name} must be in [0, 1), got {short(v)}")
    for name in ("sparse_k", "crop_padding"):
        v = getattr(cfg, name)
        _check(_is_int(v) and v >= 0, f"{name} must be an integer >= 0, got {short(v)}")
    for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("init", INITS), ("device", DEVICES),
                          ("precision", PRECISIONS), ("objective", OBJECTIVES), ("probe_features", PROBE_FEATURES),
                          ("placement", PLACEMENTS)):
        v = getattr(cfg, name)
        _check(isinstance(v, str) and v in choices, f"{name} must be one of {', '.join(choices)}; got {short(v)}")
    validate_model(cfg.model_config())
    _check((cfg.objective == "patches") == (cfg.arch == "patch"),
           f"objective {cfg.objective} with arch {cfg.arch}: the patches objective trains the patch architecture, "
           f"and only it (use --arch patch --objective patches together, or the patches preset)")
    _check(cfg.patch_size <= min(cfg.height, cfg.width),
           f"patch_size must be at most the input size {min(cfg.height, cfg.width)}, got {cfg.patch_size}")
