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
        raise ConvaeError("the CUDA device was asked for, but no CUDA GPU is available",
                          advice="use --device cpu or auto")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast when asked for; a no-op context for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def micro_batch_size(micro_batch: int, precision: str, device: torch.device) -> int | None:
    """``micro_batch`` or, when 0 (auto), on the CPU 200 images in float32 and 500 in bfloat16,
    and the whole batch on a GPU.

    These were the fastest chunks for the seed model on a 2-core AVX-512 CPU (BENCHMARKS.md).
    """
    if micro_batch:
        return micro_batch
    if device.type != "cpu":
        return None
    return 500 if precision == "bf16" else 200
