"""Batches from the host (rows read from the cache file, prefetched) match batches on the device."""

import threading

import numpy as np
import pytest
import torch
import torch.distributed

from convae.data import DeviceBatches, ImageSet, split_indices
from convae.data.batches import prefetched, resolve_placement
from convae.data.cache import read_cache, write_cache
from convae.data.rows import gather


def _cached_set(tmp_path, n=37, shape=(3, 5, 4), labels=None) -> ImageSet:
    """A cached source whose every pixel of image i is i % 251 plus a pattern (rows are tellable apart)."""
    g = torch.Generator().manual_seed(0)
    images = (torch.arange(n).view(n, 1, 1, 1) % 251 + torch.randint(0, 5, (n, *shape), generator=g)).to(torch.uint8)
    labels = torch.arange(n) if labels is None else labels
    classes = [f"c{k}" for k in range(int(labels.max()) + 1)]  # a class for every label: a valid cache
    write_cache(tmp_path / "c", images, labels, classes, [f"f{i}" for i in range(n)], [])
    d = read_cache(tmp_path / "c", print)
    assert d is not None and d["file"] is not None
    return ImageSet(d["images"], d["labels"], d["classes"], d["files"], file=d["file"])


def test_gather_reads_the_rows_asked_in_the_order_asked(tmp_path):
    ds = _cached_set(tmp_path)
    expected = ds.images.clone()
    for rows in ([3, 4, 5, 9, 10, 36], [36, 0, 5, 4, 4, 20, 19], [7], list(range(37))[::-1], []):
        r = torch.tensor(rows, dtype=torch.int64)
        got = gather(ds.images, r, ds.file)
        assert got.shape == (len(rows), 3, 5, 4) and torch.equal(got, expected[r])


def test_big_batches_are_read_into_mappings_of_their_own(tmp_path, monkeypatch):
    """Above OWN_MAPPING bytes a batch buffer is an anonymous mapping (returned to the system when the
    tensor dies, never left in a fragmented heap); the rows and their order are the same."""
    import threading

    from convae.data import rows as rows_module

    ds = _cached_set(tmp_path)
    expected = ds.images.clone()
    made = []
    real = rows_module.mmap.mmap
    monkeypatch.setattr(rows_module.mmap, "mmap", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    monkeypatch.setattr(rows_module, "OWN_MAPPING", 3 * 5 * 4 * 2)  # two rows
    out = {}
    for order in ([3, 4, 5, 9], [36, 0, 5, 4, 4, 20]):
        r = torch.tensor(order)
        worker = threading.Thread(target=lambda: out.update(x=gather(ds.images, r, ds.file)))  # as the prefetch does
        worker.start()
        worker.join()
        assert torch.equal(out["x"], expected[r])
        out["x"][0] = 0  # writable, and its own memory: the source is untouched
        assert torch.equal(ds.images[r[0]], expected[r[0]])
    assert len(made) == 3 and all(isinstance(m, real) for m in made)  # in order: 1 buffer; shuffled: 2
    assert gather(ds.images, torch.tensor([7]), ds.file).shape == (1, 3, 5, 4)  # one row: from the heap
    assert len(made) == 3


def test_a_subset_shares_the_source_rows_instead_of_copying(tmp_path):
    ds = _cached_set(tmp_path)
    tr, va = split_indices(None, len(ds), 0.25, seed=1)
    train = ds.subset(tr)
    part = train.subset(torch.tensor([4, 0, 2]))
    assert train.store is ds.store and part.store is ds.store  # one source tensor, no copy
    assert len(train) == len(tr) and part.index.tolist() == tr[[4, 0, 2]].tolist()
    assert torch.equal(part.tensor(), ds.images[tr[[4, 0, 2]]])
    assert torch.equal(part.labels, tr[[4, 0, 2]])  # labels are positions: they travel with the rows
    assert torch.equal(torch.cat(list(train.chunks(6))), ds.images[tr])


@pytest.mark.parametrize("world_size", [1, 2])
def test_host_and_device_placements_give_identical_batches(tmp_path, world_size):
    ds = _cached_set(tmp_path)
    tr, _ = split_indices(None, len(ds), 0.2, seed=0)
    train = ds.subset(tr)
    for rank in range(world_size):
        kw = dict(batch_size=8, shuffle=True, seed=5, rank=rank, world_size=world_size)
        host = DeviceBatches.of(train, torch.device("cpu"), placement="host", **kw)
        dev = DeviceBatches.of(train, torch.device("cpu"), placement="device", **kw)
        assert host.placement == "host" and dev.placement == "device"
        assert len(host) == len(dev) and host.num_images == dev.num_images == len(train)
        for epoch in (1, 2):
            host.set_epoch(epoch)
            dev.set_epoch(epoch)
            pairs = list(zip(host, dev, strict=True))
            for (xh, yh), (xd, yd) in pairs:
                assert torch.equal(xh, xd) and torch.equal(yh, yd)
            # a resumed epoch (from batch 2) replays the same batches on the host path
            again = list(host.iterate(2))
            assert all(torch.equal(a[0], b[0][0]) for a, b in zip(again, pairs[2:], strict=True))


def test_unshuffled_host_batches_are_the_set_in_order(tmp_path):
    ds = _cached_set(tmp_path)
    b = DeviceBatches.of(ds, torch.device("cpu"), batch_size=10, placement="host")
    xs = torch.cat([x for x, _ in b])
    torch.testing.assert_close(xs, ds.images.float() / 255)


def test_auto_placement_by_size(monkeypatch):
    assert resolve_placement("auto", 10**12, torch.device("cpu")) == "host"  # the CPU reads the cache file
    assert resolve_placement("device", 10**12, torch.device("cpu")) == "device"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 16 * 2**30))
    gpu = torch.device("cuda", 0)
    assert resolve_placement("auto", 3 * 2**30, gpu) == "device"  # fits with room to spare
    assert resolve_placement("auto", 5 * 2**30, gpu) == "host"  # over half the free memory
    assert resolve_placement("host", 1, gpu) == "host"


def test_prefetch_raises_the_reader_error_and_stops_its_thread_when_closed():
    def items():
        yield 1
        yield 2
        raise OSError("the cache file is truncated")

    got = []
    with pytest.raises(OSError, match="truncated"):
        for i in prefetched(items()):
            got.append(i)
    assert got == [1, 2]
    before = threading.active_count()
    it = prefetched(iter(range(1000)), depth=2)
    assert next(it) == 0
    it.close()  # a loop that breaks early (a sweep cell's last step) leaves no reader behind
    assert threading.active_count() <= before


def test_training_reads_only_the_rows_of_its_batches(tmp_path, monkeypatch):
    """The host path never materialises the source: every read is one batch's rows."""
    import convae.data.sources as sources

    ds = _cached_set(tmp_path, n=40)
    sizes = []
    real = sources.gather
    monkeypatch.setattr(
        sources,
        "gather",
        lambda images, rows, file, pin=False: sizes.append(len(rows)) or real(images, rows, file, pin),
    )
    b = DeviceBatches.of(
        ds.subset(torch.arange(3, 40)),
        torch.device("cpu"),
        batch_size=8,
        shuffle=True,
        placement="host",
        rank=1,
        world_size=2,
    )
    b.set_epoch(1)
    list(b)
    assert sizes == [4, 4, 4, 4, 2]  # rank 1's half of each batch of 8 (37 images: the last batch has 5)


def _read_shards(rank: int, world: int, path: str, port: int, out) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    import time
    from pathlib import Path

    from convae.utils.distributed import Dist

    def first_rank_first() -> None:  # rank 0 (the decoder) finishes before any other rank starts
        if rank == 0:
            time.sleep(0.5)
        with open(Path(path).parent / "turns.txt", "a") as f:
            f.write(f"{rank}\n")

    Dist(rank, world, rank).in_turn(first_rank_first, torch.device("cpu"))

    def fails_on_rank_0() -> None:
        if rank == 0:
            raise ValueError("no images")

    try:  # rank 0's failure stops the others instead of leaving them waiting
        Dist(rank, world, rank).in_turn(fails_on_rank_0, torch.device("cpu"))
    except Exception as e:
        Path(path).parent.joinpath(f"error{rank}.txt").write_text(type(e).__name__)
    d = read_cache(Path(path), print)
    ds = ImageSet(d["images"], d["labels"], d["classes"], d["files"], file=d["file"])
    b = DeviceBatches.of(
        ds, torch.device("cpu"), batch_size=10, shuffle=True, seed=2, rank=rank, world_size=world, placement="host"
    )
    b.set_epoch(3)
    mine = [y.tolist() for _, y in b]
    every = [None] * world
    torch.distributed.all_gather_object(every, mine)
    if rank == 0:
        out.put(every)
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_gloo_ranks_read_disjoint_shards_of_one_cache(tmp_path):
    import socket

    import torch.multiprocessing as mp

    _cached_set(tmp_path, n=45)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_read_shards, args=(r, 2, str(tmp_path / "c"), port, q)) for r in range(2)]
    for p in procs:
        p.start()
    every = q.get(timeout=120)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    whole = DeviceBatches(torch.zeros(45, 1, 1, 1, dtype=torch.uint8), torch.arange(45), 10, shuffle=True, seed=2)
    whole.set_epoch(3)
    for (_, y), r0, r1 in zip(whole, *every, strict=True):
        assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(y.tolist())  # disjoint, covering the batch
    assert np.unique(sum(every[0], []) + sum(every[1], [])).size == 45
    assert (tmp_path / "turns.txt").read_text().split() == ["0", "1"]  # rank 0 prepared the data first
    assert [(tmp_path / f"error{r}.txt").read_text() for r in range(2)] == ["ValueError", "ConvaeError"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_remainder_too_short_for_batch_norm_joins_the_batch_before(world_size):
    """25 images in batches of 8 leave one: with ``min_last`` 2 per rank it is read with the batch
    before, every image still once an epoch, and a resumed epoch replays the same batches."""
    images = torch.arange(25, dtype=torch.uint8).view(25, 1, 1, 1).expand(25, 1, 2, 2).contiguous()
    sizes = {}
    for min_last in (1, 2 * world_size):
        seen = []
        for rank in range(world_size):
            b = DeviceBatches(images, None, batch_size=8, shuffle=True, seed=3, rank=rank, world_size=world_size)
            b.min_last = min_last
            b.set_epoch(1)
            batches = [x[:, 0, 0, 0] for x, _ in b]
            assert len(batches) == len(b)
            assert [b.global_size(i) for i in range(len(b))] == ([8, 8, 8, 1] if min_last == 1 else [8, 8, 9])
            assert all(len(x) >= min_last // world_size for x in batches)
            replay = [x[:, 0, 0, 0] for x, _ in b.iterate(len(b) - 1)]
            assert len(replay) == 1 and torch.equal(replay[0], batches[-1])
            seen += batches
        assert sorted(torch.cat(seen).mul(255).round().long().tolist()) == list(range(25))
        sizes[min_last] = len(b)
    assert sizes == {1: 4, 2 * world_size: 3}


def test_a_remainder_long_enough_or_a_single_batch_is_left_as_it_is():
    images = torch.zeros(26, 1, 2, 2, dtype=torch.uint8)
    b = DeviceBatches(images, None, batch_size=8, shuffle=True)
    b.min_last = 2
    assert [b.global_size(i) for i in range(len(b))] == [8, 8, 8, 2]
    one = DeviceBatches(images[:1], None, batch_size=8)
    one.min_last = 2
    assert len(one) == 1 and one.global_size(0) == 1  # nothing to join: the loop's error says so
