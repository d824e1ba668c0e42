"""Decode throughput against the number of processes, on a real source.

    python benchmarks/decode.py --data ../shared/data/cifar10-train-jpeg.tar.gz [--workers 1 2] [--limit N]

Decodes the source's image files (the archive is extracted once into the cache) with each
number of processes in turn, in the same process run, bypassing the decoded-tensor cache, and
prints images/s and the ratio to one process. Every run must give identical tensors.
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
from convae.data.archives import extract_archive, file_sha256, is_archive
from convae.data.decode import available_cores, decode_files
from convae.data.sources import scan_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a folder or archive of images")
    ap.add_argument("--workers", type=int, nargs="+", default=None, help="process counts (default 1, 2, every core)")
    ap.add_argument("--limit", type=int, default=None, help="decode only the first N files")
    ap.add_argument("--cache-dir", default="~/.cache/convae")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    src = Path(args.data).expanduser()
    cache = Path(args.cache_dir).expanduser()
    folder = extract_archive(src, cache, file_sha256(src), print) if is_archive(src.name) else src
    root, files, _, _, _ = scan_folder(folder)
    files = files[: args.limit] if args.limit else files
    counts = args.workers or sorted({1, 2, available_cores()})
    print(f"{len(files)} files under {root}; {available_cores()} cores available")
    rows, results, reference = [], [], None
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:  # no decoded cache, no resume chunks reused
            start = time.perf_counter()
            images, keep, skipped = decode_files(
                files, root, 3, 32, 32, lambda m: None, workers=n, partial=Path(tmp) / "partial"
            )
            seconds = time.perf_counter() - start
            images = images.tensor()  # the chunks saved in the folder about to be removed
        if reference is None:
            reference = (images, keep, seconds)
        assert torch.equal(images, reference[0]) and keep == reference[1], "a different result with more processes"
        results.append(
            {"workers": n, "seconds": seconds, "images_per_s": len(files) / seconds, "speedup": reference[2] / seconds}
        )
        rows.append([n, f"{seconds:.1f}", f"{len(files) / seconds:.0f}", f"{reference[2] / seconds:.2f}x"])
    print_table(["processes", "seconds", "images/s", "vs 1 process"], rows)
    write_json(args.json, "decode.json", {"source": str(src), "files": len(files), "results": results})


if __name__ == "__main__":
    main()
