"""Sources bigger than they should be in memory: open time, peak RSS and pretraining images/s,
batches read from the cache file (placement host) against the set copied into memory (device).

    python benchmarks/large_source.py [--gb 0.2 1 5] [--size 64] [--steps 20] [--dir .]

For each size a synthetic cached source of uint8 3 x SIZE x SIZE images (seeded random pixels,
labels, file names) is written once in convae's cache format; then, for each placement, a fresh
process opens it, carves the 90 / 10 split as a run does, and trains the configured autoencoder
(the seed preset's architecture at SIZE x SIZE, batch 256, shuffled, precision auto) for a few
warm-up steps and then ``--steps`` timed steps. Each arm runs in its own process so its peak
resident set (``ru_maxrss``, model, optimizer and buffers included) is its own; the arms run one
after the other, never together, with the page cache warm. Prints the table and the ratios, and
writes JSON; the machine is named in both.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, sync, write_json
from convae.data.cache import read_cache, write_cache


def make_source(folder: Path, n: int, size: int) -> None:
    """A cached source of ``n`` random images, written in chunks (the writer never holds it all)."""
    g = torch.Generator().manual_seed(0)
    chunk = 4096

    class Chunks:
        shape = (n, 3, size, size)

        def __iter__(self):
            for start in range(0, n, chunk):
                yield torch.randint(0, 256, (min(chunk, n - start), 3, size, size), dtype=torch.uint8, generator=g)

    labels = torch.randint(0, 10, (n,), generator=g)
    files = [f"class_{i % 10}/img_{i:08d}.jpg" for i in range(n)]
    write_cache(folder, Chunks(), labels, [f"class_{k}" for k in range(10)], files, [])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(folder: Path, placement: str, size: int, steps: int, warmup: int, batch: int, device_name: str) -> dict:
    """One arm, in its own process: open, split, train; timings and memory."""
    from convae.config import build_config
    from convae.data import DeviceBatches, ImageSet, split_indices
    from convae.models import AutoEncoder
    from convae.models.objectives import make_objective
    from convae.training.loop import make_optimizer, train_step
    from convae.utils.device import micro_batch_size, resolve_precision
    from convae.utils.records import Batch

    start = time.perf_counter()
    d = read_cache(folder, print)
    open_s = time.perf_counter() - start
    assert d is not None
    full = ImageSet(d["images"], d["labels"], d["classes"], d["files"], d["skipped"], file=d["file"])
    tr, _ = split_indices(full.labels, len(full), 0.1, 0)
    train = full.subset(tr)
    cfg = build_config(
        "seed",
        None,
        {
            "height": size,
            "width": size,
            "batch_size": batch,
            "precision": "auto",
            "device": device_name,
            "placement": placement,
        },
    )
    from convae.utils.device import resolve_device

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(0)
    model = AutoEncoder(cfg.model_config()).to(device, memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    objective = make_objective(cfg.objective_config())
    micro = micro_batch_size(cfg.micro_batch, precision, device)  # as a run computes its batches
    start = time.perf_counter()
    batches = DeviceBatches.of(train, device, batch, labels=False, shuffle=True, seed=0, placement=placement)
    place_s = time.perf_counter() - start
    batches.set_epoch(1)
    it = iter(batches)
    for _ in range(warmup):
        x, y = next(it)
        train_step(model, Batch(x, y), opt, objective, precision, micro, len(x), 1)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
        train_step(model, Batch(x, y), opt, objective, precision, micro, len(x), 1)
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "placement": batches.placement,
        "open_s": open_s,
        "place_s": place_s,
        "images_per_s": steps * batch / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_file_mib": _status_kib("RssFile") / 1024,
        "rss_anon_mib": _status_kib("RssAnon") / 1024,
        "precision": precision,
        "train_images": len(train),
        "device": str(device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, nargs="+", default=[0.2, 1.0, 5.0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dir", default=".", help="where the synthetic sources are written (needs the largest size free)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where training runs (default cpu)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "PLACEMENT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        r = child(Path(args.child[0]), args.child[1], args.size, args.steps, args.warmup, args.batch, args.device)
        print("RESULT " + json.dumps(r))
        return
    print(f"machine: {machine()}")
    rows, results = [], []
    for gb in args.gb:
        n = int(gb * 1e9 // (3 * args.size * args.size))
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            folder = Path(tmp) / "source"
            start = time.perf_counter()
            make_source(folder, n, args.size)
            print(
                f"{gb:g} GB: {n:,} images of 3x{args.size}x{args.size} written in {time.perf_counter() - start:.1f} s"
            )
            arms = {}
            for placement in ("host", "device"):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        str(folder),
                        placement,
                        "--size",
                        str(args.size),
                        "--steps",
                        str(args.steps),
                        "--warmup",
                        str(args.warmup),
                        "--batch",
                        str(args.batch),
                        "--device",
                        args.device,
                    ],
                    capture_output=True,
                    text=True,
                )
                if out.returncode != 0:
                    raise SystemExit(f"the {placement} arm failed:\n{out.stderr[-3000:]}")
                arms[placement] = json.loads(out.stdout.split("RESULT ", 1)[1])
        h, d = arms["host"], arms["device"]
        results.append({"gb": gb, "images": n, "host": h, "device": d})
        for name, a in (("host (cache file)", h), ("device (in memory)", d)):
            rows.append(
                [
                    f"{gb:g}",
                    f"{n:,}",
                    name,
                    f"{a['open_s']:.3f}",
                    f"{a['place_s']:.1f}",
                    f"{a['peak_rss_mib'] / 1024:.2f}",
                    f"{a['images_per_s']:.0f}",
                ]
            )
        print(
            f"  host / in-memory images/s: {h['images_per_s'] / d['images_per_s']:.3f}; "
            f"peak RSS host {h['peak_rss_mib'] / 1024:.2f} GiB, in memory {d['peak_rss_mib'] / 1024:.2f} GiB"
        )
    print_table(["GB", "images", "placement", "open (s)", "placing (s)", "peak RSS (GiB)", "images/s"], rows)
    host = [r["host"]["peak_rss_mib"] for r in results]
    print(f"host path peak RSS, largest vs smallest source: {100 * (host[-1] / host[0] - 1):+.1f} %")
    write_json(
        args.json,
        "large_source.json",
        {"size": args.size, "batch": args.batch, "steps": args.steps, "device": args.device, "results": results},
    )


if __name__ == "__main__":
    main()
