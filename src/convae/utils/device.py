"""Where and in which precision the work runs."""

from __future__ import annotations

import platform
import time
from contextlib import nullcontext

import torch

from .errors import ConvaeError


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; asking for a device that is not
    there is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConvaeError(
            "the CUDA device was asked for, but no CUDA GPU is available", advice="use --device cpu or auto"
        )
    if name == "mps" and not mps_available():
        raise ConvaeError(
            "the MPS device was asked for, but this machine has no Apple-silicon GPU for torch",
            advice="use --device cpu or auto",
        )
    return torch.device(name)


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` of Linux's ``/proc/cpuinfo`` (None elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where the platform does not list them)."""
    return set((_cpuinfo("flags") or "").split())


def device_name(device: torch.device) -> str:
    """The GPU's or CPU's model name, for provenance records."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 has hardware support here: a CPU with AVX512-BF16 or AMX, a CUDA GPU
    of compute capability 8.0 or newer. Elsewhere bf16 is emulated and slower than fp32
    (measured 2.6x slower on an AVX-512 CPU without it, BENCHMARKS.md)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_precision(precision: str, device: torch.device, warn=print) -> str:
    """``auto``: bf16 where it is fast, fp16 on a CUDA GPU without it (compute capability below 8:
    its tensor cores run fp16), fp32 elsewhere. An explicit ``bf16`` where it is slow is honoured
    with a warning; fp16 off CUDA is refused (no gradient scaler and no fast fp16 there)."""
    fast = bf16_is_fast(device)
    if precision == "auto":
        return "bf16" if fast else "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConvaeError(
            f"--precision fp16 needs a CUDA GPU; this run is on {device.type}",
            advice="use --precision auto (bf16 where the hardware has it, else fp32)",
        )
    if precision == "bf16" and not fast:
        warn(
            f"warning: bf16 has no hardware support on this {device.type} ({device_name(device)}): it runs "
            "emulated, slower than fp32; --precision auto picks the faster one"
        )
    return precision


def convae_version() -> str:
    """The installed package's version (its metadata); from a source tree that is not installed
    (``PYTHONPATH=src``), the package's ``__version__`` marked as such."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("convae")
    except PackageNotFoundError:
        root = sys.modules.get(__package__.split(".")[0])  # imported already: this module is part of it
        return f"{root.__version__} (source tree)" if hasattr(root, "__version__") else "unknown"


def provenance(device: torch.device, precision: str) -> dict[str, str]:
    """What produced a result: versions, date, device and precision."""
    return {
        "convae": convae_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "device": str(device),
        "device_name": device_name(device),
        "precision": precision,
    }


def autocast(device: torch.device, precision: str):
    """bfloat16 or float16 autocast when asked for; a no-op context for fp32."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return nullcontext()


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler fp16 training needs (fp16's range underflows small gradients); None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


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
