"""Throughput on a busy machine: convae and the lecture's loop alone and beside one competing process.

    python benchmarks/busy_machine.py [--data ARCHIVE|random] [--competitor loop|torch] [--batch-size 1000]
                                      [--steps 6] [--warmup 4] [--rounds 2] [--phases pretrain finetune]

Every arm runs in this process, interleaved over ``--rounds``: the lecture's loop (as in
train_throughput.py), convae's loop with torch's default thread count (``fixed``), and convae's
loop following the free cores as the command line does (``follows``, :mod:`convae.utils.cores`), each
alone and beside a competitor started for that measurement: ``loop`` is one single-threaded busy
Python process, ``torch`` a 1024x1024 matrix-product loop on torch's default threads. The table
gives each arm's images/s and its ratio beside / alone. The warm-up should last longer than
the 2 s the free cores are measured over. Prints the CPU and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_images, print_table, write_json
from convae.utils import cores
from convae.utils.device import device_name, micro_batch_size, resolve_precision
from train_throughput import convae_loop, reference_loop

COMPETITORS = {
    "loop": "while True: pass",
    "torch": "import torch\na = torch.randn(1024, 1024)\nwhile True: a @ a",
}


def competitor(kind: str | None, settle: float = 1.0):
    """The competing process (None: alone); started, then given ``settle`` seconds to get going."""
    if kind is None:
        return None
    proc = subprocess.Popen([sys.executable, "-c", COMPETITORS[kind]])
    time.sleep(settle)
    return proc


def measure(arm: str, phase: str, images, labels, args, precision: str) -> tuple[float, int]:
    """images/s of one arm, and the thread count it ended on."""
    cpu = torch.device("cpu")
    if arm == "lecture":
        return reference_loop(
            phase, images, labels, args.batch_size, args.warmup, args.steps, cpu, args.workers
        ), torch.get_num_threads()
    share = cores.follow(True) if arm == "follows" else None
    try:
        ips = convae_loop(
            phase,
            images,
            labels,
            args.batch_size,
            args.warmup,
            args.steps,
            cpu,
            precision,
            micro=micro_batch_size(0, precision, cpu),
        )
        return ips, share.threads if share else torch.get_num_threads()
    finally:
        cores.stop_following()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="random", help="random, or a convae source such as the CIFAR-10 archive")
    p.add_argument("--cache-dir", default="~/.cache/convae")
    p.add_argument("--competitor", default="loop", choices=list(COMPETITORS))
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per measurement")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--phases", nargs="+", default=["pretrain"], choices=["pretrain", "finetune"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--workers", type=int, default=4, help="the lecture DataLoader's workers (the lecture: 4)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds the competitor runs before a measurement")
    p.add_argument(
        "--arms", nargs="+", default=["lecture", "fixed", "follows"], choices=["lecture", "fixed", "follows"]
    )
    p.add_argument("--json", help="output file (default benchmarks/results/busy_machine.json)")
    args = p.parse_args(argv)
    precision = resolve_precision(args.precision, torch.device("cpu"), warn=lambda m: None)
    need = args.batch_size * (args.warmup + args.steps)
    images, labels = load_images(args.data, None if args.data != "random" else need, args.cache_dir)
    cpu = device_name(torch.device("cpu"))
    print(
        f"CPU: {cpu}; {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; convae in {precision}; "
        f"competitor: {args.competitor}",
        flush=True,
    )
    results: dict[tuple, list[float]] = {}
    threads: dict[tuple, int] = {}
    for r in range(args.rounds):
        for phase in args.phases:
            for beside in (None, args.competitor):
                for arm in args.arms:
                    proc = competitor(beside, args.settle)
                    try:
                        ips, n = measure(arm, phase, images, labels, args, precision)
                    finally:
                        if proc is not None:
                            proc.kill()
                            proc.wait()
                    key = (phase, arm, beside or "alone")
                    results.setdefault(key, []).append(ips)
                    threads[key] = n
                    print(
                        f"round {r + 1}: {phase:<8} {arm:<8} {beside or 'alone':<6} {ips:8.0f} images/s "
                        f"({n} threads at the end)",
                        flush=True,
                    )
    rows, out = [], []
    for (phase, arm, beside), vals in results.items():
        mean = statistics.mean(vals)
        alone = statistics.mean(results[(phase, arm, "alone")])
        ratio = mean / alone
        rows.append(
            [
                phase,
                arm,
                beside,
                f"{mean:.0f}",
                " ".join(f"{v:.0f}" for v in vals),
                str(threads[(phase, arm, beside)]),
                f"{ratio:.2f}x",
            ]
        )
        out.append(
            {
                "phase": phase,
                "arm": arm,
                "beside": beside,
                "images_per_s": mean,
                "rounds": vals,
                "threads_at_end": threads[(phase, arm, beside)],
                "ratio_vs_alone": ratio,
            }
        )
    print()
    print_table(["phase", "arm", "beside", "images/s", "per round", "threads", "vs alone"], rows)
    payload = {"args": vars(args), "cpu": cpu, "cores": os.cpu_count(), "precision": precision, "results": out}
    write_json(args.json, "busy_machine.json", payload)
    return payload


if __name__ == "__main__":
    main()
