"""Peak memory of a whole run against the size of its source.

    python benchmarks/run_memory.py [--gb 0.1 2] [--size 128] [--dir /tmp] [-- EXTRA CONVAE FLAGS]

For each size an unlabelled folder of JPEG images (SIZE x SIZE, smooth seeded random colours, so
the files stay small while the decoded source has its full size) is written once; then
``convae pretrain`` runs on it twice in a fresh process, the first time decoding it into the
cache, the second time from the cache, each for one whole epoch with its validation, figures and
checkpoint (a small network by default: what grows with the source is the data path, not the
model; ``--`` passes other flags to convae). The child's memory is sampled every 20 ms from
``/proc``: anonymous memory (the heap, tensors: what the run itself holds) and file-backed
memory (mapped files the kernel can drop) separately, its own and its decode workers' summed.
Prints the table and the growth from the smallest source to the largest; writes JSON.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import _children, machine, print_table, write_json  # noqa: E402

SMALL_NET = ["--channels", "8", "16", "--latent-dim", "32", "--batch-size", "256", "--precision", "auto",
             "--device", "cpu"]


def make_folder(folder: Path, n: int, size: int) -> None:
    """``n`` smooth random JPEGs: a 4x4 grid of seeded colours, upsampled."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        grid = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        grid.resize((size, size), Image.BILINEAR).save(folder / f"img_{i:07d}.jpg", quality=90)


def _status(pid: str) -> tuple[int, int]:
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("RssFile:") or line.startswith("RssShmem:"):
                    file += int(line.split()[1])
    except OSError:
        pass
    return anon, file


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; peak anonymous and file-backed MiB of it and its children, wall seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"anon": 0, "file": 0}
    done = threading.Event()

    def sample():
        while not done.wait(0.02):
            pids = [str(proc.pid)] + _children(str(proc.pid))
            anon, file = map(sum, zip(*(_status(p) for p in pids)))
            peak["anon"], peak["file"] = max(peak["anon"], anon), max(peak["file"], file)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"convae failed ({proc.returncode}):\n{out[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_anon_mib": peak["anon"] / 1024,
            "peak_file_mib": peak["file"] / 1024, "log_tail": out.strip().splitlines()[-3:]}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, nargs="+", default=[0.1, 2.0], help="decoded sizes of the sources")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--dir", default=None, help="where the folders, cache and runs go (default a temporary folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    rows, results = [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for gb in args.gb:
            n = max(int(gb * 2**30 // (3 * args.size * args.size)), 20)
            folder = Path(tmp) / f"images_{gb:g}"
            start = time.perf_counter()
            make_folder(folder, n, args.size)
            print(f"{gb:g} GiB: {n:,} images of 3x{args.size}x{args.size} written in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            arms = {}
            for arm in ("decoding", "from the cache"):
                out = Path(tmp) / f"run_{gb:g}_{len(arms)}"
                cmd = [sys.executable, "-m", "convae", "pretrain", "--data", str(folder), "--cache-dir",
                       str(Path(tmp) / "cache"), "--out", str(out), "--height", str(args.size), "--width",
                       str(args.size), "--pretrain-epochs", str(args.epochs), *SMALL_NET, *extra]
                arms[arm] = run_measured(cmd, env)
                a = arms[arm]
                print(f"  {arm}: {a['seconds']:.0f} s, peak anonymous {a['peak_anon_mib']:.0f} MiB, "
                      f"file-backed {a['peak_file_mib']:.0f} MiB", flush=True)
                rows.append([f"{gb:g}", f"{n:,}", arm, f"{a['seconds']:.0f}", f"{a['peak_anon_mib']:.0f}",
                             f"{a['peak_file_mib']:.0f}"])
            results.append({"gb": gb, "images": n, **{k.replace(" ", "_"): v for k, v in arms.items()}})
            subprocess.run(["rm", "-rf", str(folder)], check=True)
    print()
    print_table(["GiB", "images", "run", "wall (s)", "peak anonymous MiB", "peak file-backed MiB"], rows)
    for arm in ("decoding", "from_the_cache"):
        grow = results[-1][arm]["peak_anon_mib"] - results[0][arm]["peak_anon_mib"]
        print(f"{arm.replace('_', ' ')}: peak anonymous memory {grow:+.0f} MiB from {args.gb[0]:g} to "
              f"{args.gb[-1]:g} GiB")
    return write_json(args.json, "run_memory.json", {"size": args.size, "epochs": args.epochs, "extra": extra,
                                                     "results": results}) and {"results": results}


if __name__ == "__main__":
    main()
