"""Training throughput: convae's loop against the lecture's, in the same process, interleaved.

    python benchmarks/train_throughput.py [--data ARCHIVE|random] [--batch-size 2000] [--steps 5]
                                          [--rounds 2] [--device cpu|cuda] [--precision fp32 bf16]

The lecture's loop is written here as the lecture wrote it: torchvision-style dataset with a
per-image ToTensor, DataLoader(batch_size, shuffle=True, num_workers=4), NCHW float32. convae's
loop slices batches from a uint8 tensor on the device, channels_last, with micro-batches on CPU.
Each measurement times ``--steps`` optimizer steps after ``--warmup`` steps; the loops alternate
for ``--rounds`` rounds and the table shows the mean. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CIFARLike, Model, PeakRSS, autoencoder, load_images, print_table, sync, write_json
from convae.data import DeviceBatches
from convae.models import AutoEncoder, Classifier, ModelConfig
from convae.models.objectives import ObjectiveConfig, make_objective
from convae.training.loop import classification_criterion, train_step
from convae.utils import cores
from convae.utils.device import micro_batch_size
from convae.utils.records import Batch


def reference_loop(phase: str, images, labels, batch_size: int, warmup: int, steps: int, device, workers: int):
    """The lecture's training loop; returns images/s over the timed steps."""
    import torchvision.transforms as transforms

    transform = transforms.Compose([transforms.ToTensor()])
    trainset = CIFARLike(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), transform)
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=batch_size, shuffle=True, num_workers=workers)
    torch.manual_seed(0)
    net = autoencoder().to(device)
    if phase == "finetune":
        net = Model(net).to(device)
    criterion = nn.MSELoss() if phase == "pretrain" else nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    runningLoss = 0.0
    done, start = 0, None
    while True:
        for i, data in enumerate(trainloader, 0):
            inputs, labels_b = data
            inputs, labels_b = inputs.to(device), labels_b.to(device)
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, inputs) if phase == "pretrain" else criterion(outputs, labels_b)
            loss.backward()
            optimizer.step()
            runningLoss += loss.item()
            done += 1
            if done == warmup:
                sync(device)
                start = time.perf_counter()
            if done == warmup + steps:
                sync(device)
                return steps * batch_size / (time.perf_counter() - start)


def convae_loop(
    phase: str,
    images,
    labels,
    batch_size: int,
    warmup: int,
    steps: int,
    device,
    precision: str,
    compile: bool = False,
    micro: int = 0,
    fuse: bool = True,
    cfg: ModelConfig | None = None,
    objective: ObjectiveConfig | None = None,
):
    """convae's training step over on-device uint8 batches; returns images/s over the timed steps.

    ``micro`` 0 picks the micro-batch as ``convae run`` does; ``fuse=False`` computes the
    decoder's upsample and last conv as two plain layers (to measure what fusing them gives).
    ``cfg`` and ``objective`` (default: the seed model and its reconstruction) choose what trains.
    """
    torch.manual_seed(0)
    cfg = cfg or ModelConfig()
    model = AutoEncoder(cfg) if phase == "pretrain" else Classifier(cfg)
    if phase == "pretrain" and hasattr(model.decoder, "fuse_upsample"):
        model.decoder.fuse_upsample = fuse
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if compile:
        model = torch.compile(model)
    loss_fn = (
        make_objective(objective or ObjectiveConfig("reconstruct")) if phase == "pretrain" else classification_criterion
    )
    micro = micro_batch_size(micro, precision, device)
    batches = DeviceBatches(images.to(device), labels.to(device), batch_size, shuffle=True, seed=0)
    total = torch.zeros((), device=device, dtype=torch.float64)
    done, epoch, start = 0, 0, None
    while True:
        epoch += 1
        batches.set_epoch(epoch)
        for x, y in batches:
            g = torch.Generator(device=device).manual_seed(done) if getattr(loss_fn, "random", False) else None
            total += train_step(model, Batch(x, y), optimizer, loss_fn, precision, micro, generator=g)
            cores.poll()  # as train_one_epoch does: a no-op unless the run follows the free cores
            done += 1
            if done == warmup:
                sync(device)
                start = time.perf_counter()
            if done == warmup + steps:
                float(total)  # the one sync, as in an epoch's end
                return steps * batch_size / (time.perf_counter() - start)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="random", help="random, or a convae source such as the CIFAR-10 archive")
    p.add_argument("--cache-dir", default="~/.cache/convae")
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="times each loop is measured, interleaved")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--phases", nargs="+", default=["pretrain", "finetune"], choices=["pretrain", "finetune"])
    p.add_argument("--workers", type=int, default=4, help="the reference DataLoader's workers (the lecture: 4)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--compile", action="store_true", help="also measure convae's loop under torch.compile")
    p.add_argument(
        "--plain",
        action="store_true",
        help="also measure convae's loop with the decoder's upsample and last conv unfused",
    )
    p.add_argument(
        "--micro-batch",
        nargs="+",
        type=int,
        default=[0],
        help="convae's micro-batch sizes to measure (0 = auto, as convae run)",
    )
    p.add_argument("--json", help="output file (default benchmarks/results/train_throughput.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    need = args.batch_size * (args.warmup + args.steps)
    images, labels = load_images(args.data, None if args.data != "random" else max(need, 10_000), args.cache_dir)
    if len(images) < need:
        sys.exit(f"need {need} images for {args.warmup}+{args.steps} steps of {args.batch_size}; have {len(images)}")
    loops = [] if args.skip_reference else [("lecture", "fp32", None)]
    for prec in args.precision:
        for mb in args.micro_batch:
            mb = micro_batch_size(mb, prec, device)
            loops += [("convae", prec, mb)] + ([("plain", prec, mb)] if args.plain else [])
            loops += [("compiled", prec, mb)] if args.compile else []
    results: dict[tuple, list[float]] = {}
    peaks: dict[tuple, float] = {}
    for r in range(args.rounds):
        for phase in args.phases:
            for name, prec, mb in loops:
                if name == "plain" and phase != "pretrain":
                    continue  # the classifier has no decoder
                with PeakRSS() as mem:
                    if name == "lecture":
                        ips = reference_loop(
                            phase, images, labels, args.batch_size, args.warmup, args.steps, device, args.workers
                        )
                    else:
                        ips = convae_loop(
                            phase,
                            images,
                            labels,
                            args.batch_size,
                            args.warmup,
                            args.steps,
                            device,
                            prec,
                            compile=name == "compiled",
                            micro=mb or args.batch_size,
                            fuse=name != "plain",
                        )
                key = (phase, name, prec, mb)
                results.setdefault(key, []).append(ips)
                peaks[key] = max(peaks.get(key, 0.0), mem.peak)
                print(
                    f"round {r + 1}: {phase:<8} {name:<8} {prec:<5} micro {mb or '-':<5} {ips:8.0f} images/s",
                    flush=True,
                )
    rows, out = [], []
    for (phase, name, prec, mb), vals in results.items():
        mean = statistics.mean(vals)
        ref = results.get((phase, "lecture", "fp32", None))
        ratio = mean / statistics.mean(ref) if ref else None
        rows.append(
            [
                phase,
                name,
                prec,
                str(mb or "-"),
                f"{mean:.0f}",
                " ".join(f"{v:.0f}" for v in vals),
                f"{ratio:.2f}x" if ratio else "-",
                f"{peaks[(phase, name, prec, mb)]:.0f}",
                f"{50_000 / mean:.2f}",
            ]
        )
        out.append(
            {
                "phase": phase,
                "loop": name,
                "precision": prec,
                "micro_batch": mb,
                "images_per_s": mean,
                "rounds": vals,
                "seconds_per_50k_epoch": 50_000 / mean,
                "ratio_vs_lecture": ratio,
                "peak_rss_mib": peaks[(phase, name, prec, mb)],
            }
        )
    print()
    print_table(
        [
            "phase",
            "loop",
            "precision",
            "micro-batch",
            "images/s",
            "per round",
            "vs lecture",
            "peak RSS MiB",
            "s per 50k epoch",
        ],
        rows,
    )
    payload = {"args": vars(args), "device": str(device), "results": out}
    write_json(args.json, "train_throughput.json", payload)
    return payload


if __name__ == "__main__":
    main()
