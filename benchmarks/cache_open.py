"""Opening a decoded source from the cache: the memory-mapped folder against reading a torch file.

    python benchmarks/cache_open.py [--images 10000 1000000] [--size 16]

For each count, synthetic uint8 images (3 x SIZE x SIZE), labels and file names are written
once in convae's cache format (``convae.data.cache``) and once as the single ``torch.save``
file convae used before; then each is opened (best of 3) in the same process run. Prints the
seconds and the ratio, and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json
from convae.data.cache import read_cache, write_cache


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows, results = [], []
    for n in args.images:
        images = torch.randint(0, 256, (n, 3, args.size, args.size), dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,))
        files = [f"class_{i % 10}/img_{i:07d}.jpg" for i in range(n)]
        with tempfile.TemporaryDirectory(dir=".") as tmp:
            folder, pt = Path(tmp) / "cache", Path(tmp) / "old.pt"
            write_cache(folder, images, labels, [str(k) for k in range(10)], files, [])
            torch.save({"images": images, "labels": labels, "files": files}, pt)
            mapped = best_of(3, lambda: read_cache(folder, print))
            loaded = best_of(3, lambda: torch.load(pt, weights_only=True))
            assert torch.equal(read_cache(folder, print)["images"], images)
        gb = images.numel() / 1e9
        results.append({"images": n, "gb": gb, "memory_map_s": mapped, "torch_load_s": loaded})
        rows.append([f"{n:,}", f"{gb:.2f}", f"{mapped:.3f}", f"{loaded:.3f}", f"{loaded / mapped:.1f}x"])
    print_table(["images", "GB", "memory map (s)", "torch.load (s)", "ratio"], rows)
    write_json(args.json, "cache_open.json", {"size": args.size, "results": results})


if __name__ == "__main__":
    main()
