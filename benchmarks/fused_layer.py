"""One decoder layer, plain against fused: ``Upsample(2) -> Conv2d`` and ``convae.models.upsample_conv.upsample_conv``.

    python benchmarks/fused_layer.py [--batch 200] [--steps 10] [--rounds 2] [--precision fp32 bf16]

Times forward + backward (input, weight and bias gradients) of one layer on a channels_last
batch, for the seed decoder's last layer (64 -> 3 at 16 -> 32) and for wider outputs, the two
ways alternating in the same process. The decoder fuses only the shapes where this pays
(``convae.models.upsample_conv.fusion_pays``). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json
from convae.models.upsample_conv import fusion_pays, upsample_conv

# (in channels, out channels, low-resolution size): the seed's last layer first, then wider
SHAPES = [(64, 3, 16), (64, 8, 16), (64, 16, 16), (128, 16, 8), (64, 64, 8), (128, 64, 4)]


def plain(x, w, b):
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="bilinear"), w, b, padding=1)


def fused(x, w, b):
    return upsample_conv(x, w, b, "bilinear")


def time_layer(fn, x, w, b, precision: str, steps: int) -> float:
    """Milliseconds per forward + backward."""

    def once():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = fn(x, w, b)
        y.float().sum().backward()

    for _ in range(3):
        once()
    start = time.perf_counter()
    for _ in range(steps):
        once()
    return (time.perf_counter() - start) / steps * 1e3


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=200, help="images per forward/backward (the CPU micro-batch)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--json", help="output file (default benchmarks/results/fused_layer.json)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows, out = [], []
    for precision in args.precision:
        for c, o, n in SHAPES:
            x = torch.randn(args.batch, c, n, n).contiguous(memory_format=torch.channels_last).requires_grad_()
            w = torch.randn(o, c, 3, 3, requires_grad=True)
            b = torch.randn(o, requires_grad=True)
            times: dict[str, list[float]] = {"plain": [], "fused": []}
            for _ in range(args.rounds):
                for name, fn in (("plain", plain), ("fused", fused)):
                    times[name].append(time_layer(fn, x, w, b, precision, args.steps))
            tp, tf = statistics.mean(times["plain"]), statistics.mean(times["fused"])
            chosen = "fused" if fusion_pays(torch.nn.Conv2d(c, o, 3)) else "plain"
            rows.append(
                [precision, f"{c} -> {o}", f"{n} -> {2 * n}", f"{tp:.1f}", f"{tf:.1f}", f"{tp / tf:.2f}x", chosen]
            )
            out.append(
                {
                    "precision": precision,
                    "in": c,
                    "out": o,
                    "size": n,
                    "plain_ms": times["plain"],
                    "fused_ms": times["fused"],
                    "speedup": tp / tf,
                    "decoder_uses": chosen,
                }
            )
            print(" ".join(map(str, rows[-1])), flush=True)
    print()
    print_table(["precision", "channels", "size", "plain ms", "fused ms", "plain / fused", "decoder uses"], rows)
    return write_json(args.json, "fused_layer.json", {"args": vars(args), "results": out})


if __name__ == "__main__":
    main()
