"""Where and in which precision the work runs."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .errors import ConvaeError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConvaeError("--device cuda was asked for, but no CUDA GPU is available (use --device cpu or auto)")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast when asked for; a no-op context for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
