"""Distributed data parallel through ``torchrun``, set up in one place.

    torchrun --standalone --nproc_per_node 2 -m convae run --data ... --out runs/ddp

Rank 0 decodes a source first and the others open its cache (:meth:`Dist.in_turn`). Each rank
takes a disjoint, strided shard of every global batch of the same epoch permutation, read from
the cache on the host (only its shard's rows) or sliced from a copy on its GPU when the set fits; gradients
are averaged by DDP with each
rank's loss scaled so that the update equals a single process's on the same global batch;
the epoch's loss is all-reduced; rank 0 alone writes the run folder.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .device import resolve_device
from .errors import ConvaeError

T = TypeVar("T")


@dataclass
class Dist:
    """This process's place in the job; one process when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel when distributed, else as it is."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        device = next(model.parameters()).device
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def in_turn(self, fn: Callable[[], T], device: torch.device) -> T:
        """``fn()`` on every rank, rank 0 first, then the first rank of each other machine, then the
        rest: a source is decoded once per cache (once in all when the cache is shared), and the
        other ranks open what it wrote. A failure on any rank stops every rank (none waits forever)."""
        if not self.enabled:
            return fn()
        result, error = None, None
        turns = (self.rank == 0, self.rank != 0 and self.local_rank == 0, self.rank != 0 and self.local_rank != 0)
        for mine in turns:
            if mine:
                try:
                    result = fn()
                except Exception as e:
                    error = e
            if self.any(error is not None, device):
                if error is not None:
                    raise error
                raise ConvaeError("another rank could not prepare the data (rank 0's output says why)")
        return result  # type: ignore[return-value]

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (also a barrier)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup_distributed(device_name: str = "auto") -> tuple[Dist, torch.device]:
    """Join the process group when ``torchrun`` started us (WORLD_SIZE > 1); pick this rank's device.

    NCCL on CUDA (one GPU per rank, by LOCAL_RANK), gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave(status: int) -> NoReturn:
    """End the process with ``status``; a process torchrun started ends without the interpreter's teardown.

    DDP keeps gloo's worker threads alive after :func:`teardown_distributed` (a reference to the process
    group outlives the wrapped model), and tearing the interpreter and the C++ statics down around them
    aborted a rank now and then on a loaded CPU ("terminate called without an active exception"; torchrun
    then stopped the other ranks in the middle of their work). The exit handlers still run, the output is
    flushed, and every file convae writes is already closed.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken pipe: nothing more to say
                pass
        os._exit(status)
    sys.exit(status)
