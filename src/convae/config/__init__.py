"""The run's settings: one frozen, validated :class:`Config` (``config``: its sections, presets, file and flag
overrides, every batch-size default) and the rules that join its sections (``validation``)."""

from .config import (
    DEVICES,
    INFERENCE_BATCH_SIZE,
    PRESETS,
    SWEEP_BATCH_SIZE,
    Config,
    build_config,
    load_run_config,
    presets,
    read_config_file,
    save_config,
)

__all__ = [
    "DEVICES",
    "INFERENCE_BATCH_SIZE",
    "PRESETS",
    "SWEEP_BATCH_SIZE",
    "Config",
    "build_config",
    "load_run_config",
    "presets",
    "read_config_file",
    "save_config",
]
