"""Shared by the benchmarks: the lecture's reference code, data, memory sampling, output."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import torch

from convae.models.reference import Model, autoencoder  # noqa: F401  (re-exported for the benchmarks)
from convae.utils.device import cpu_flags, device_name

# ----------------------------------------------------------------------------- the lecture's data path


class CIFARLike(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: uint8 HWC array -> PIL image -> transform."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform):
        self.data, self.targets, self.transform = images_hwc, labels, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        from PIL import Image

        img = Image.fromarray(self.data[index])
        return self.transform(img), int(self.targets[index])


# ----------------------------------------------------------------------------- data


def load_images(source: str, n: int | None = None, cache_dir: str = "~/.cache/convae"):
    """(images uint8 N x 3 x 32 x 32, labels int64 N): the shared archive (or any convae source), or random."""
    if source == "random":
        g = torch.Generator().manual_seed(0)
        n = n or 50_000
        return (
            torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g),
        )
    from convae.data import load_source

    ds = load_source(source, 3, 32, 32, cache_dir, log=lambda m: None)
    images, labels = ds.images, ds.labels
    if n:
        images, labels = images[:n], labels[:n]
    return images, labels


# ----------------------------------------------------------------------------- memory


def _rss_kib(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: str) -> list[str]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += f.read().split()
    except OSError:
        pass
    return out


def tree_rss_mib() -> float:
    """Resident memory of this process and its children (DataLoader workers), in MiB."""
    me = str(os.getpid())
    return (_rss_kib(me) + sum(_rss_kib(c) for c in _children(me))) / 1024


class PeakRSS:
    """Samples :func:`tree_rss_mib` every 20 ms while active; ``peak`` in MiB."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = tree_rss_mib()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, tree_rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_mib())


# ----------------------------------------------------------------------------- output


def config_overrides(pairs) -> dict:
    """``["pretrain_epochs=1", "channels=[8]"]`` -> config keys, values read as JSON where they parse."""
    out = {}
    for pair in pairs:
        key, text = pair.split("=", 1)
        try:
            out[key.replace("-", "_")] = json.loads(text)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = text
    return out


CPU_FEATURES = {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"}


def machine() -> dict:
    info = {
        "cpu": device_name(torch.device("cpu")),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    # the model name alone does not say which matrix units a CPU has (one "Intel Xeon" has AMX, another not)
    info["cpu_features"] = sorted(cpu_flags() & CPU_FEATURES)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def print_table(headers: list[str], rows: list[list]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(f"{h:<{w}}" for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(f"{str(c):<{w}}" for c, w in zip(r, widths)))


def write_json(path: str | None, default_name: str, payload: dict) -> Path:
    out = Path(path or Path("benchmarks") / "results" / default_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return out
