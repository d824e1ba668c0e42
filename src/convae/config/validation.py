"""Every rule a configuration must satisfy, checked before any work starts.

A value from a config file, a flag or a checkpoint is untrusted: wrong types, non-finite
numbers and sizes this machine cannot hold are refused with one short line that names the
key and the valid range (a value is never echoed at unbounded length). Each knob's own rule
lives with its field (:mod:`convae.knobs`); an architecture's rules with the architecture; here
are the rules that join them: the model's memory, and which objective trains which architecture.
"""

from __future__ import annotations

import os
from typing import Any

from ..models import training_bytes
from ..models.model_config import ModelConfig, owner
from ..models.objectives import OBJECTIVES
from ..models.registry import architecture, check_model
from ..utils.errors import ConvaeError, clip, short
from ..utils.knobs import check_all, check_values
from .modes import training_mode

MODEL_FIELDS = set(ModelConfig.__dataclass_fields__)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConvaeError(message)


def memory_bytes() -> int:
    """The machine's physical memory (bytes), or 0 when the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def validate_model(m: ModelConfig, where: str = "") -> None:
    """The architecture's rules: types, ranges and a size this machine can hold."""
    check_model(m, where)
    ram = memory_bytes()
    need = training_bytes(m, images=1)
    _check(
        not ram or need <= ram,
        f"{where}the model ({m.height}x{m.width} input, widths {short(list(m.channels), 40)}, latent {m.latent_dim}"
        f", {m.num_classes} classes) needs at least {need / 2**30:.3g} GiB to train one image, more than this "
        f"machine's {ram / 2**30:.3g} GiB of memory",
    )


def model_config_from_dict(d: Any, where: str = "") -> ModelConfig:
    """A :class:`ModelConfig` from untrusted data (a checkpoint's ``config``), validated."""
    _check(isinstance(d, dict), f"{where}the model config is not a mapping")
    unknown = sorted(str(k) for k in d if k not in MODEL_FIELDS)
    _check(not unknown, f"{where}unknown model config key(s): {clip(', '.join(unknown), 80)}")
    check_values(ModelConfig, d, where)  # before ModelConfig casts the widths with int()
    try:
        m = ModelConfig.from_dict(dict(d))
    except (TypeError, ValueError) as e:
        raise ConvaeError(f"{where}the model config is invalid ({clip(str(e), 80)})") from None
    validate_model(m, where)
    return m


def validate(cfg: Any) -> None:
    """Refuse every invalid value of a run :class:`~convae.config.Config` with the valid range."""
    check_all(cfg)
    validate_model(cfg.model_config())
    _check_pairing(cfg.arch, cfg.objective)
    _check(
        training_mode(cfg.joint).frozen_encoder or not cfg.freeze_encoder,
        f"--joint {cfg.joint} trains the encoder with the head: --joint and --freeze-encoder do not go together",
    )
    _check_own_knobs(cfg)
    training_mode(cfg.joint).check(cfg)
    architecture(cfg.arch).check_run(cfg, "")
    _check(
        cfg.cutout < min(cfg.height, cfg.width),
        f"--cutout {cfg.cutout} would erase every {cfg.height}x{cfg.width} image whole: it must be below "
        f"{min(cfg.height, cfg.width)} (0 = off)",
    )
    _check(
        cfg.patch_size <= min(cfg.height, cfg.width),
        f"patch_size must be at most the input size {min(cfg.height, cfg.width)}, got {cfg.patch_size}",
    )


def _check_own_knobs(cfg: Any) -> None:
    """A knob of one architecture set under another is refused: it would be saved, and read by nothing."""
    for name, f in ModelConfig.__dataclass_fields__.items():
        arch = owner(name)
        if arch is not None and arch != cfg.arch and getattr(cfg, name) != f.default:
            flag = "--" + name.replace("_", "-")
            undo = f"--no-{flag[2:]} turns it off" if isinstance(f.default, bool) else f"leave {flag} out"
            raise ConvaeError(
                f"{flag} is a setting of --arch {arch}, and this run's architecture is {cfg.arch} ({undo})"
            )


def _check_pairing(arch_name: str, objective_name: str) -> None:
    """An architecture that trains with some objectives only, or an objective that trains some
    architectures only, is refused with any other."""
    arch, objective = architecture(arch_name), OBJECTIVES[objective_name]
    if arch.objectives is not None and objective_name not in arch.objectives:
        pair = f"the {'/'.join(arch.objectives)} objective trains the {arch_name} architecture"
    elif objective.archs is not None and arch_name not in objective.archs:
        pair = f"the {objective_name} objective trains the {'/'.join(objective.archs)} architecture"
    else:
        return
    raise ConvaeError(
        f"objective {objective_name} with arch {arch_name}: {pair}, and only it (choose --arch and "
        "--objective together, or a preset)"
    )
