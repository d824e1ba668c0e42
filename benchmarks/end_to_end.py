"""End to end: ``convae run --preset seed`` against the lecture's pipeline, wall time per phase.

    python benchmarks/end_to_end.py --data ../shared/data/cifar10-train-jpeg.tar.gz
                                    [--pretrain-epochs 5] [--finetune-epochs 5] [--skip-reference]

Both pipelines train on the same 45,000/5,000 stratified split (seed 0) of ``--data``; each
runs in a child process so that its peak resident memory is its own (``os.wait4``). The
reference is the lecture's notebook as a script: DataLoader with per-image ToTensor and 4
workers, batch 2000, Adam 1e-3, 5 + 5 epochs, accuracy on the evaluation split every fine-tuning
epoch. Run convae once beforehand (or pass the same --cache-dir) so its decoded-data cache is
warm, as the issue's target assumes. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CIFARLike, Model, autoencoder, print_table, write_json


def reference_pipeline(args) -> dict:
    """The lecture's notebook, on the split convae uses; returns phase times and accuracy."""
    import torch.nn as nn
    import torch.optim as optim
    import torchvision.transforms as transforms

    from convae.data import load_source, split_indices

    ds = load_source(args.data, 3, 32, 32, args.cache_dir, log=lambda m: None)
    tr, va = split_indices(ds.labels, len(ds), 0.1, 0)
    hwc = ds.images.permute(0, 2, 3, 1).numpy()
    lab = ds.labels.numpy()
    transform = transforms.Compose([transforms.ToTensor()])
    BatchSize = 2000
    trainset = CIFARLike(hwc[tr.numpy()], lab[tr.numpy()], transform)
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=BatchSize, shuffle=True, num_workers=4)
    testset = CIFARLike(hwc[va.numpy()], lab[va.numpy()], transform)
    testloader = torch.utils.data.DataLoader(testset, batch_size=BatchSize, shuffle=False, num_workers=4)
    torch.manual_seed(0)
    net = autoencoder()
    times = {}
    start = time.perf_counter()
    criterion = nn.MSELoss()
    optimizer = optim.Adam(net.parameters(), lr=1e-3)
    for epoch in range(args.pretrain_epochs):
        runningLoss = 0.0
        for i, data in enumerate(trainloader, 0):
            inputs, labels = data
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, inputs)
            loss.backward()
            optimizer.step()
            runningLoss += loss.item()
        print(f"reference pretrain epoch {epoch + 1}: loss {runningLoss / len(trainloader):.4f}", flush=True)
    times["pretrain_s"] = time.perf_counter() - start
    start = time.perf_counter()
    net = Model(net)
    optimizer = optim.Adam(net.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    acc = 0.0
    for epoch in range(args.finetune_epochs):
        for i, data in enumerate(trainloader, 0):
            inputs, labels = data
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
        correct = total = 0
        with torch.no_grad():
            for data in testloader:
                inputs, labels = data
                outputs = net(inputs)
                _, predicted = torch.max(outputs.data, 1)
                total += labels.size(0)
                correct += (predicted == labels).sum().item()
        acc = correct / total
        print(f"reference finetune epoch {epoch + 1}: accuracy {100 * acc:.2f}%", flush=True)
    times["finetune_s"] = time.perf_counter() - start
    return {**times, "accuracy": acc}


def _run_child(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; returns (wall seconds, peak RSS MiB of that child)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a labelled convae source, e.g. the CIFAR-10 archive")
    p.add_argument("--cache-dir", default="~/.cache/convae")
    p.add_argument("--pretrain-epochs", type=int, default=5)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument(
        "--precision",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "bf16"],
        help="convae's precision(s); each runs as its own pipeline",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--reference-child", help=argparse.SUPPRESS)
    p.add_argument("--json", help="output file (default benchmarks/results/end_to_end.json)")
    args = p.parse_args(argv)
    if args.reference_child:
        Path(args.reference_child).write_text(json.dumps(reference_pipeline(args)))
        return {}
    rows, out = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precision:
            run = Path(tmp) / f"run-{precision}"
            cmd = [
                sys.executable,
                "-m",
                "convae",
                "run",
                "--preset",
                "seed",
                "--data",
                args.data,
                "--cache-dir",
                args.cache_dir,
                "--out",
                str(run),
                "--pretrain-epochs",
                str(args.pretrain_epochs),
                "--finetune-epochs",
                str(args.finetune_epochs),
                "--precision",
                precision,
                "--device",
                args.device,
            ]
            wall, rss = _run_child(cmd)
            res = json.loads((run / "results.json").read_text())
            t = res["timing"]
            metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
            out.append(
                {
                    "pipeline": "convae",
                    "precision": precision,
                    "wall_s": wall,
                    "peak_rss_mib": rss,
                    "accuracy": res["accuracy"],
                    "metrics": metrics,
                    **t,
                }
            )
            rows.append(
                [
                    f"convae {precision}",
                    f"{t['pretrain_s']:.1f}",
                    f"{t['finetune_s']:.1f}",
                    f"{wall:.1f}",
                    f"{rss:.0f}",
                    f"{100 * res['accuracy']:.2f}%",
                ]
            )
        if not args.skip_reference:
            result_file = Path(tmp) / "reference.json"
            ref_cmd = [
                sys.executable,
                __file__,
                "--data",
                args.data,
                "--cache-dir",
                args.cache_dir,
                "--pretrain-epochs",
                str(args.pretrain_epochs),
                "--finetune-epochs",
                str(args.finetune_epochs),
                "--reference-child",
                str(result_file),
            ]
            wall_r, rss_r = _run_child(ref_cmd)
            r = json.loads(result_file.read_text())
            out.append({"pipeline": "lecture", "wall_s": wall_r, "peak_rss_mib": rss_r, **r})
            rows.append(
                [
                    "lecture",
                    f"{r['pretrain_s']:.1f}",
                    f"{r['finetune_s']:.1f}",
                    f"{wall_r:.1f}",
                    f"{rss_r:.0f}",
                    f"{100 * r['accuracy']:.2f}%",
                ]
            )
            for o in out[:-1]:
                rows.append(
                    [
                        f"lecture / convae {o['precision']}",
                        f"{r['pretrain_s'] / o['pretrain_s']:.2f}x",
                        f"{r['finetune_s'] / o['finetune_s']:.2f}x",
                        f"{wall_r / o['wall_s']:.2f}x",
                        "",
                        "",
                    ]
                )
    print_table(["pipeline", "pretrain s", "finetune s", "wall s", "peak RSS MiB", "val accuracy"], rows)
    return write_json(args.json, "end_to_end.json", {"args": vars(args), "results": out})


if __name__ == "__main__":
    main()
