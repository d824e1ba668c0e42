"""Peak memory of a whole run against the size of its source.

    python benchmarks/run_memory.py [--gb 0.1 2] [--size 128] [--commands pretrain run] [--dir /tmp]
                                    [-- EXTRA CONVAE FLAGS]

For each size a folder of JPEG images in 10 class folders (SIZE x SIZE, smooth seeded random
colours, so the files stay small while the decoded source has its full size) is written once;
then, each in a fresh process: ``convae pretrain`` decoding it into the cache, ``convae pretrain``
from the cache, and ``convae run`` from the cache (pretraining, fine-tuning, the probes, figures
and report), each phase one whole epoch with its validation (a small network by default: what
grows with the source is the data path, not the model; ``--`` passes other flags to convae). The child's
memory is sampled every 20 ms from
``/proc``: anonymous memory (the heap, tensors), shared memory (tensors passed between
processes: the decode workers' chunks) and file-backed memory (mapped files the kernel can drop)
separately, its own and its decode workers' summed.
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
from _common import _children, machine, print_table, write_json

SMALL_NET = [
    "--channels",
    "8",
    "16",
    "--latent-dim",
    "32",
    "--batch-size",
    "256",
    "--precision",
    "auto",
    "--device",
    "cpu",
]


def make_folder(folder: Path, n: int, size: int) -> None:
    """``n`` smooth random JPEGs: a 4x4 grid of seeded colours, upsampled."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(10):
        (folder / f"class_{k}").mkdir(parents=True)
    for i in range(n):
        grid = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        grid.resize((size, size), Image.BILINEAR).save(folder / f"class_{i % 10}" / f"img_{i:07d}.jpg", quality=90)


def _status(pid: str) -> tuple[int, int, int]:
    """(anonymous, file-backed, shared) KiB resident in process ``pid``."""
    found = {"RssAnon:": 0, "RssFile:": 0, "RssShmem:": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(maxsplit=1)[0]
                if key in found:
                    found[key] = int(line.split()[1])
    except OSError:
        pass
    return found["RssAnon:"], found["RssFile:"], found["RssShmem:"]


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; peak anonymous, file-backed and shared MiB of it and its children (each summed
    over the processes), wall seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"anon": 0, "file": 0, "shmem": 0}
    done = threading.Event()

    def sample():
        while not done.wait(0.02):
            pids = [str(proc.pid)] + _children(str(proc.pid))
            for key, kib in zip(("anon", "file", "shmem"), map(sum, zip(*(_status(p) for p in pids)))):
                peak[key] = max(peak[key], kib)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"convae failed ({proc.returncode}):\n{out[-3000:]}")
    return {
        "seconds": time.perf_counter() - start,
        "peak_anon_mib": peak["anon"] / 1024,
        "peak_file_mib": peak["file"] / 1024,
        "peak_shared_mib": peak["shmem"] / 1024,
        "log_tail": out.strip().splitlines()[-3:],
    }


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, nargs="+", default=[0.1, 2.0], help="decoded sizes of the sources")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=1, help="epochs of each phase")
    ap.add_argument(
        "--commands",
        nargs="+",
        default=["pretrain", "run"],
        choices=["pretrain", "run"],
        help="what runs from the cache after the first, decoding, pretrain",
    )
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
            print(
                f"{gb:g} GiB: {n:,} images of 3x{args.size}x{args.size} written in {time.perf_counter() - start:.0f} s",
                flush=True,
            )
            arms = {}
            for arm, command in [("pretrain, decoding", "pretrain")] + [
                (f"{c}, from the cache", c) for c in args.commands
            ]:
                out = Path(tmp) / f"run_{gb:g}_{len(arms)}"
                cmd = [
                    sys.executable,
                    "-m",
                    "convae",
                    command,
                    "--data",
                    str(folder),
                    "--cache-dir",
                    str(Path(tmp) / "cache"),
                    "--out",
                    str(out),
                    "--height",
                    str(args.size),
                    "--width",
                    str(args.size),
                    "--pretrain-epochs",
                    str(args.epochs),
                    *SMALL_NET,
                    *extra,
                ]
                cmd += ["--finetune-epochs", str(args.epochs)] if command == "run" else []
                arms[arm] = run_measured(cmd, env)
                a = arms[arm]
                print(
                    f"  {arm}: {a['seconds']:.0f} s, peak anonymous {a['peak_anon_mib']:.0f} MiB, "
                    f"shared {a['peak_shared_mib']:.0f} MiB, file-backed {a['peak_file_mib']:.0f} MiB",
                    flush=True,
                )
                rows.append(
                    [
                        f"{gb:g}",
                        f"{n:,}",
                        arm,
                        f"{a['seconds']:.0f}",
                        f"{a['peak_anon_mib']:.0f}",
                        f"{a['peak_shared_mib']:.0f}",
                        f"{a['peak_file_mib']:.0f}",
                    ]
                )
            results.append({"gb": gb, "images": n, "runs": arms})
            subprocess.run(["rm", "-rf", str(folder)], check=True)
    print()
    print_table(
        ["GiB", "images", "run", "wall (s)", "peak anonymous MiB", "peak shared MiB", "peak file-backed MiB"], rows
    )
    for arm in results[0]["runs"]:
        first, last = results[0]["runs"][arm], results[-1]["runs"][arm]
        print(
            f"{arm}, from {args.gb[0]:g} to {args.gb[-1]:g} GiB: peak anonymous memory "
            f"{last['peak_anon_mib'] - first['peak_anon_mib']:+.0f} MiB, shared "
            f"{last['peak_shared_mib'] - first['peak_shared_mib']:+.0f} MiB"
        )
    payload = {"size": args.size, "epochs": args.epochs, "extra": extra, "results": results}
    write_json(args.json, "run_memory.json", payload)
    return payload


if __name__ == "__main__":
    main()
