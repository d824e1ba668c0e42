"""The strong view of consistency training: convae's batched RandAugment against torchvision's, same process.

    python benchmarks/strong_augment.py [--batch 448] [--size 32] [--rounds 3] [--device cpu|cuda]

Every image of a step's unlabelled batch needs its own operations and magnitudes. convae draws them for the whole
batch and transforms each group of images in one call (``convae.data.randaugment``); torchvision's
``transforms.v2.RandAugment`` draws one operation for every image of a tensor it is given, so per-image parameters
take one call per image (the ``per image`` arm). Its one call on the whole batch (every image the same
operation, which a strong view must not be) is shown as the floor of what torchvision's kernels cost. kornia's
``RandAugment`` was not measured: it is not a dependency of convae. Prints images/s and the ratios, writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, sync, write_json
from convae.data.randaugment import StrongAugment, strong_augment


def _timed(fn, x, device, rounds: int) -> float:
    fn(x)  # warm-up
    rates = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        fn(x)
        sync(device)
        rates.append(len(x) / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=448, help="images per call (default 448: FixMatch's 7 x 64)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="JSON file (default benchmarks/results/strong_augment.json)")
    a = p.parse_args(argv)
    from torchvision.transforms import v2

    device = torch.device(a.device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(a.batch, 3, a.size, a.size, generator=g, device=device)
    u8 = (x * 255).to(torch.uint8)
    ours = StrongAugment(ops=3, cutout=0.5)
    tv = v2.Compose([v2.RandAugment(num_ops=3), v2.RandomErasing(p=1.0, scale=(0.0, 0.25), value=0.5)])

    arms = {
        "convae, batched (per image)": lambda b: strong_augment(b, ours, g),
        "torchvision v2, one call per image (per image)": lambda b: torch.stack([tv(img) for img in b]),
        "torchvision v2, one call per batch (one op for all)": lambda b: tv(b),
    }
    inputs = {"convae, batched (per image)": x}
    rates = {name: _timed(fn, inputs.get(name, u8), device, a.rounds) for name, fn in arms.items()}
    first = next(iter(rates))
    rows = [[name, f"{r:,.0f}", f"{rates[first] / r:.1f}x"] for name, r in rates.items()]
    print(f"machine: {machine()['cpu']}, {torch.get_num_threads()} threads, device {device}")
    print_table(["arm", "images/s", "convae is"], rows)
    payload = {"batch": a.batch, "size": a.size, "device": str(device), "images_per_s": rates}
    write_json(a.json, "strong_augment.json", payload)
    return payload


if __name__ == "__main__":
    main()
