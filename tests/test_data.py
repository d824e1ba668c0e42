import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder
from convae.data import DeviceBatches, load_source, per_class_subset, split_indices
from convae.data import archives as archives_mod
from convae.data import images as images_mod
from convae.utils.errors import ConvaeError


def test_labelled_folder(image_folder, cache_dir):
    ds = load_source(str(image_folder), 3, 16, 16, cache_dir, log=lambda m: None)
    assert ds.images.shape == (30, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert ds.classes == ["class_0", "class_1", "class_2"]
    assert torch.bincount(ds.labels).tolist() == [10, 10, 10]
    # the red class is red: the decode kept colours and channel order
    red = ds.images[ds.labels == 0].float().mean((0, 2, 3))
    assert red[0] > 150 and red[1] < 100 and red[2] < 100


def test_unlabelled_folder(tmp_path, cache_dir):
    root = make_image_folder(tmp_path / "u", classes=2, per_class=5, labelled=False)
    ds = load_source(str(root), 3, 16, 16, cache_dir, log=lambda m: None)
    assert len(ds) == 10 and ds.labels is None and not ds.labelled


def test_images_are_converted_to_the_configured_format(tmp_path, cache_dir):
    root = tmp_path / "mixed" / "a"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8), "L").save(root / "gray.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 4), dtype=np.uint8), "RGBA").save(root / "alpha.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).convert("P").save(root / "palette.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "big.jpg")
    Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)).save(root / "deep.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "bitmap.bmp")
    logs = []
    ds = load_source(str(tmp_path / "mixed"), 3, 16, 16, cache_dir, log=logs.append)
    assert ds.images.shape == (6, 3, 16, 16)
    assert any("resized 2" in m for m in logs), logs
    gray = ds.images[ds.files.index("a/gray.png")]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    ds1 = load_source(str(tmp_path / "mixed"), 1, 8, 8, cache_dir, log=lambda m: None)
    assert ds1.images.shape == (6, 1, 8, 8)


def test_corrupt_files_are_skipped_and_listed(image_folder, cache_dir):
    (image_folder / "class_0" / "broken.png").write_bytes(b"not an image at all")
    (image_folder / "class_1" / "empty.jpg").write_bytes(b"")
    ds = load_source(str(image_folder), 3, 16, 16, cache_dir, log=lambda m: None)
    assert len(ds) == 30
    assert sorted(s.split(":")[0] for s in ds.skipped) == ["class_0/broken.png", "class_1/empty.jpg"]


def test_empty_or_missing_folders_are_clear_errors(tmp_path, cache_dir):
    with pytest.raises(ConvaeError, match="not found"):
        load_source(str(tmp_path / "nope"), cache_dir=cache_dir)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ConvaeError, match="no images"):
        load_source(str(tmp_path / "empty"), cache_dir=cache_dir)


def test_decoded_tensor_is_cached(image_folder, cache_dir, monkeypatch):
    first = load_source(str(image_folder), 3, 16, 16, cache_dir, log=lambda m: None)

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(images_mod, "decode_file", boom)
    second = load_source(str(image_folder), 3, 16, 16, cache_dir, log=lambda m: None)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    # a changed folder is a new cache key
    (image_folder / "class_0" / "img_0_000.png").unlink()
    monkeypatch.undo()
    assert len(load_source(str(image_folder), 3, 16, 16, cache_dir, log=lambda m: None)) == 29


def _tar(src_root: Path, out: Path, arcname: str) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        tf.add(src_root, arcname=arcname)
    return out


def test_tar_gz_with_a_single_top_folder(tmp_path, image_folder, cache_dir):
    archive = _tar(image_folder, tmp_path / "d.tar.gz", "train")  # like the CIFAR-10 archive: train/<class>/
    ds = load_source(str(archive), 3, 16, 16, cache_dir, log=lambda m: None)
    assert len(ds) == 30 and ds.classes == ["class_0", "class_1", "class_2"]
    # extracted once, keyed by content
    assert len(list((cache_dir / "extracted").iterdir())) == 1


def test_zip_archive(tmp_path, image_folder, cache_dir):
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(image_folder.rglob("*.png")):
            zf.write(f, f.relative_to(image_folder))
    ds = load_source(str(archive), 3, 16, 16, cache_dir, log=lambda m: None)
    assert len(ds) == 30 and ds.labelled


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", ["../evil.png", "/abs/evil.png", "a/../../evil.png"])
def test_tar_members_outside_the_target_are_refused(tmp_path, cache_dir, name):
    archive = tmp_path / "bad.tar"
    payload = _png_bytes()
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    with pytest.raises(ConvaeError, match="refused"):
        load_source(str(archive), cache_dir=cache_dir)
    assert not (tmp_path / "evil.png").exists()


def test_tar_links_are_refused(tmp_path, cache_dir):
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("cls/link.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(ConvaeError, match="not a regular file"):
        load_source(str(archive), cache_dir=cache_dir)


def test_zip_traversal_is_refused(tmp_path, cache_dir):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../evil.png", _png_bytes())
    with pytest.raises(ConvaeError, match="outside"):
        load_source(str(archive), cache_dir=cache_dir)


def test_offline_cifar10_is_one_clear_error(cache_dir, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, root, *a, **k):
            Path(root).mkdir(parents=True)  # as torchvision does before it fails
            (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"")
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(ConvaeError, match="could not download CIFAR-10.*offline") as info:
        load_source("cifar10", cache_dir=cache_dir)
    # the library speaks of the problem; the flag that fixes it is advice the CLI prints
    assert "--" not in str(info.value) and "--data PATH" in info.value.advice
    assert not (Path(cache_dir) / "cifar10").exists()  # no "0 B CIFAR-10 download" left in the cache


def test_cifar10_arrays_become_nchw(cache_dir, monkeypatch):
    import torchvision.datasets

    class Fake:
        classes = ["a", "b"]

        def __init__(self, root, train, download):
            self.data = np.zeros((4, 32, 32, 3), dtype=np.uint8)
            self.data[:, :, :, 0] = 255  # red
            self.targets = [0, 1, 0, 1]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Fake)
    ds = load_source("cifar10", cache_dir=cache_dir)
    assert ds.images.shape == (4, 3, 32, 32) and ds.images[:, 0].min() == 255 and ds.images[:, 1].max() == 0
    assert ds.labels.tolist() == [0, 1, 0, 1]


def test_split_is_stratified_disjoint_covering_and_seeded():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    tr, va = split_indices(labels, 100, 0.1, seed=3)
    assert torch.bincount(labels[va]).tolist() == [5, 3, 2]
    assert set(tr.tolist()).isdisjoint(va.tolist()) and len(tr) + len(va) == 100
    tr2, va2 = split_indices(labels, 100, 0.1, seed=3)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    _, va3 = split_indices(labels, 100, 0.1, seed=4)
    assert not torch.equal(va, va3)


def test_tiny_classes_keep_an_image_on_both_sides():
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    tr, va = split_indices(labels, 10, 0.1, seed=0)
    assert 0 in labels[va].tolist() and 0 in labels[tr].tolist()


def test_unlabelled_split():
    tr, va = split_indices(None, 50, 0.2, seed=0)
    assert len(va) == 10 and len(set(tr.tolist()) | set(va.tolist())) == 50


def test_per_class_subset():
    labels = torch.tensor([0] * 10 + [1] * 3)
    keep = per_class_subset(labels, torch.arange(13), 4, seed=0)
    assert torch.bincount(labels[keep]).tolist() == [4, 3]


def test_device_batches_cover_every_image_once_per_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    labels = torch.arange(10)
    b = DeviceBatches(images, labels, batch_size=4, shuffle=True, seed=1)
    b.set_epoch(1)
    seen = [(x, y) for x, y in b]
    assert [len(y) for _, y in seen] == [4, 4, 2] and len(b) == 3
    ys = torch.cat([y for _, y in seen])
    assert sorted(ys.tolist()) == list(range(10))
    xs = torch.cat([x for x, _ in seen])
    torch.testing.assert_close(xs[:, 0, 0, 0], ys.float() / 255)  # images travel with their labels
    b.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in b]), ys)  # the same epoch replays
    b.set_epoch(2)
    assert not torch.equal(torch.cat([y for _, y in b]), ys)


def test_a_slice_of_the_shared_cifar10_archive(tmp_path):
    from conftest import SHARED_ARCHIVE

    if not SHARED_ARCHIVE.is_file():
        pytest.skip("the shared CIFAR-10 archive is not beside this checkout")
    # a small slice: the first 20 images of two classes, repacked
    root = tmp_path / "slice"
    with tarfile.open(SHARED_ARCHIVE) as tf:
        wanted = {}
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 3 and parts[1] in ("cat", "ship") and wanted.get(parts[1], 0) < 20:
                wanted[parts[1]] = wanted.get(parts[1], 0) + 1
                out = root / parts[1] / parts[2]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tf.extractfile(m).read())
            if sum(wanted.values()) == 40:
                break
    ds = load_source(str(root), 3, 32, 32, tmp_path / "cache", log=lambda m: None)
    assert ds.images.shape == (40, 3, 32, 32) and ds.classes == ["cat", "ship"]
    assert 20 < ds.images.float().mean() < 235  # real photos, not blank
    shutil.rmtree(root)


# ----------------------------------------------------------------------------- bad input


def test_empty_class_folders_are_left_out_with_a_note(image_folder, cache_dir):
    (image_folder / "class_9").mkdir()
    logs = []
    ds = load_source(str(image_folder), 3, 16, 16, cache_dir, log=logs.append)
    assert ds.classes == ["class_0", "class_1", "class_2"]
    assert any("class_9/: class folder without images" in s for s in ds.skipped)
    assert any("warning: class_9/" in m for m in logs)


def test_link_loops_do_not_hang(image_folder, cache_dir):
    (image_folder / "class_0" / "loop").symlink_to(image_folder, target_is_directory=True)
    (image_folder / "class_1" / "dangling.png").symlink_to(image_folder / "nowhere.png")
    ds = load_source(str(image_folder), 3, 16, 16, cache_dir, log=lambda m: None)
    assert len(ds) == 30


def test_very_large_jpeg_is_decoded_reduced_and_bombs_are_skipped(tmp_path, cache_dir, monkeypatch):
    root = tmp_path / "big" / "a"
    root.mkdir(parents=True)
    Image.new("RGB", (3000, 2000), (10, 200, 30)).save(root / "photo.jpg", quality=80)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "small.png")
    ds = load_source(str(tmp_path / "big"), 3, 16, 16, cache_dir, log=lambda m: None)
    assert ds.images.shape == (2, 3, 16, 16)
    green = ds.images[ds.files.index("a/photo.jpg")].float().mean((1, 2))
    assert abs(green[1] - 200) < 8 and green[0] < 30
    # past Pillow's pixel limit the file is treated as a decompression bomb and skipped
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    ds = load_source(str(tmp_path / "big"), 3, 16, 16, tmp_path / "cache2", log=lambda m: None)
    assert len(ds) == 1 and "photo.jpg" in ds.skipped[0] and "decompression bomb" in ds.skipped[0].lower()


def test_device_members_are_refused(tmp_path, cache_dir):
    archive = tmp_path / "dev.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("cls/null.png")
        info.type = tarfile.CHRTYPE
        info.devmajor, info.devminor = 1, 3
        tf.addfile(info)
    with pytest.raises(ConvaeError, match="not a regular file or folder; refused"):
        load_source(str(archive), cache_dir=cache_dir)


def test_archive_bombs_are_refused_before_extraction(tmp_path, cache_dir, monkeypatch):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cls/zeros.png", b"\0" * (64 << 20))  # 64 MiB of zeros in ~64 KiB
    assert archive.stat().st_size < 1 << 20
    monkeypatch.setattr(archives_mod, "RATIO_MIN_BYTES", 32 << 20)  # a 1 GiB bomb is too slow for a test
    with pytest.raises(ConvaeError, match="would expand .*x to .* GiB; refused as a possible archive bomb"):
        load_source(str(archive), cache_dir=cache_dir)
    extracted = cache_dir / "extracted"
    assert not any(p.is_file() for p in extracted.rglob("*"))  # nothing was written


def test_member_count_bombs_are_refused(tmp_path, cache_dir, monkeypatch):
    archive = tmp_path / "many.tar"
    payload = _png_bytes()
    with tarfile.open(archive, "w") as tf:
        for i in range(20):
            info = tarfile.TarInfo(f"cls/{i}.png")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    monkeypatch.setattr(archives_mod, "MAX_MEMBERS", 10)
    with pytest.raises(ConvaeError, match="holds over 10 members"):
        load_source(str(archive), cache_dir=cache_dir)


def test_an_archive_larger_than_the_free_disk_is_refused(tmp_path, image_folder, cache_dir, monkeypatch):
    archive = _tar(image_folder, tmp_path / "d.tar.gz", "train")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 10))
    with pytest.raises(ConvaeError, match="only 0.00 GiB are free"):
        load_source(str(archive), cache_dir=cache_dir)


def test_unreadable_files_are_skipped(image_folder, cache_dir, monkeypatch):
    from PIL import Image as PILImage

    real_open = PILImage.open
    locked = image_folder / "class_2" / "img_2_000.png"

    def guarded(fp, *a, **k):
        if str(fp) == str(locked):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(PILImage, "open", guarded)
    ds = load_source(str(image_folder), 3, 16, 16, cache_dir, log=lambda m: None)
    assert len(ds) == 29 and "Permission denied" in ds.skipped[0]


def test_hard_links_and_mixed_layouts_and_damaged_archives(tmp_path, image_folder, cache_dir):
    archive = tmp_path / "hard.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("cls/hard.png")
        info.type = tarfile.LNKTYPE
        info.linkname = "cls/other.png"
        tf.addfile(info)
    with pytest.raises(ConvaeError, match="not a regular file or folder"):
        load_source(str(archive), cache_dir=cache_dir)
    Image.new("RGB", (16, 16)).save(image_folder / "stray.png")
    with pytest.raises(ConvaeError, match="mixes images and sub-folders"):
        load_source(str(image_folder), cache_dir=cache_dir)
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(ConvaeError, match="could not be read"):
        load_source(str(broken), cache_dir=cache_dir)


def test_no_progress_bar_fragments_when_stderr_is_not_a_terminal(image_folder, cache_dir, monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    load_source(str(image_folder), cache_dir=cache_dir, log=lambda m: None)
    assert "decoding" not in capsys.readouterr().err


def test_parallel_decoding_gives_what_one_process_gives(tmp_path, monkeypatch):
    import convae.data.decode as decode

    data = make_image_folder(tmp_path / "d", classes=3, per_class=10)
    (data / "class_1" / "broken.png").write_bytes(b"not a png")
    monkeypatch.setattr(decode, "CHUNK", 7)  # 31 files: five chunks
    monkeypatch.setattr(decode, "PARALLEL_MIN", 10)
    one = load_source(str(data), 3, 16, 16, tmp_path / "c1", log=lambda m: None, workers=1)
    two = load_source(str(data), 3, 16, 16, tmp_path / "c2", log=lambda m: None, workers=2)
    assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)
    assert one.files == two.files and one.skipped == two.skipped and len(one.skipped) == 1


def test_a_killed_decode_continues_where_it_stopped(tmp_path, monkeypatch):
    import convae.data.decode as decode

    data = make_image_folder(tmp_path / "d", classes=3, per_class=10)
    monkeypatch.setattr(decode, "CHUNK", 7)  # 30 files: five chunks
    real, calls, kill = decode.decode_chunk, [], [True]

    def killed_after_two(*a):
        calls.append(1)
        if kill[0] and len(calls) == 3:
            raise KeyboardInterrupt  # as a kill in the middle of the third chunk
        return real(*a)

    monkeypatch.setattr(decode, "decode_chunk", killed_after_two)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        load_source(str(data), 3, 16, 16, cache, log=lambda m: None, workers=1)
    assert len(list((cache / "tensors").glob("*.partial/*.pt"))) == 2
    calls.clear()
    kill[0] = False
    lines = []
    ds = load_source(str(data), 3, 16, 16, cache, log=lines.append, workers=1)
    assert len(calls) == 3 and any("2 of 5 chunks already done" in m for m in lines)  # only the missing ones
    fresh = load_source(str(data), 3, 16, 16, tmp_path / "fresh", log=lambda m: None, workers=1)
    assert torch.equal(ds.images, fresh.images) and ds.files == fresh.files
    assert not list((cache / "tensors").glob("*.partial"))  # gone once the source is cached whole


def test_a_cached_source_opens_as_a_memory_map(image_folder, cache_dir):
    first = load_source(str(image_folder), 3, 16, 16, cache_dir, log=lambda m: None)
    again = load_source(str(image_folder), 3, 16, 16, cache_dir, log=lambda m: None)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    (npy,) = Path(cache_dir).glob("tensors/*/images.npy")
    if Path("/proc/self/maps").is_file():  # mapped from images.npy, not read into memory
        assert str(npy.resolve()) in Path("/proc/self/maps").read_text()
    again.images[0] += 1  # copy-on-write: the cache file itself is never changed
    third = load_source(str(image_folder), 3, 16, 16, cache_dir, log=lambda m: None)
    assert torch.equal(third.images, first.images)


def test_a_decode_keeps_its_chunks_on_disk_not_in_memory(tmp_path, monkeypatch):
    from convae.data import decode

    data = make_image_folder(tmp_path / "data", classes=2, per_class=5)
    files = sorted(data.rglob("*.png"))
    monkeypatch.setattr(decode, "CHUNK", 3)  # 10 files: 4 chunks
    kept, keep, _ = decode.decode_files(files, data, 3, 8, 8, lambda m: None, workers=1, partial=tmp_path / "part")
    assert len(kept.parts) == 4 and all(isinstance(p, Path) for p in kept.parts)  # read back only when written
    in_memory, keep2, _ = decode.decode_files(files, data, 3, 8, 8, lambda m: None, workers=1)
    assert keep == keep2 and kept.shape == (10, 3, 8, 8) and torch.equal(kept.tensor(), in_memory.tensor())


def test_cache_list_and_clean_remove_only_what_no_run_reads(tmp_path, capsys):
    from convae.cli import main

    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    cache = tmp_path / "cache"
    load_source(str(data), 3, 16, 16, cache, log=lambda m: None)
    tensors = cache / "tensors"
    old = tensors / "0123456789abcdef01234567"
    old.mkdir()
    (old / "images.npy").write_bytes(b"x" * 5000)
    (old / "meta.json").write_text(json.dumps({"version": 3}))
    partial = tensors / "fedcba9876543210fedcba98.partial"
    partial.mkdir()
    (partial / "0000000.pt").write_bytes(b"y" * 300)
    # an archive extraction in progress (this process's), and one whose process is gone
    (cache / "extracted").mkdir()
    extracting = cache / "extracted" / f".tmp-{os.getpid()}-abc"
    killed = cache / "extracted" / ".tmp-999999999-abc"
    for folder in (extracting, killed):
        folder.mkdir()
        (folder / "img.png").write_bytes(b"z" * 100)
    assert main(["cache", "list", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "older format 3" in out and "partial decode" in out and "8 images" in out
    assert "removes the 4 stale one(s)" in out
    assert main(["cache", "clean", "--cache-dir", str(cache)]) == 0
    assert not old.exists() and not partial.exists() and not killed.exists()
    assert extracting.exists()  # its extracting run would fail half-way: kept
    assert f"kept {extracting}: a process is writing it now" in capsys.readouterr().out
    shutil.rmtree(extracting)
    lines = []
    again = load_source(str(data), 3, 16, 16, cache, log=lines.append)  # the current entry was kept
    assert len(again) == 8 and not any("decoding" in m for m in lines)
    assert main(["cache", "clean", "--all", "--cache-dir", str(cache)]) == 0
    assert not [p for p in tensors.iterdir() if p.is_dir()]
    assert "freed" in capsys.readouterr().out


def test_stopping_the_decode_workers_ends_their_processes_and_the_pools_thread(monkeypatch):
    """A signal during a parallel decode: the workers and the pool's manager thread are gone before the
    exit handlers run (concurrent.futures' handler writes to a pipe that thread closes; the two raced on
    a loaded machine and the exit printed a traceback after convae's one line). The thread is made as
    slow to finish as a loaded machine makes it."""
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor, process

    from convae.data.decode import _stop_workers

    real = process._ExecutorManagerThread.join_executor_internals

    def slowly(self):
        time.sleep(0.5)
        real(self)

    monkeypatch.setattr(process._ExecutorManagerThread, "join_executor_internals", slowly)
    methods = multiprocessing.get_all_start_methods()
    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork" if "fork" in methods else "spawn"))
    jobs = [pool.submit(time.sleep, 30) for _ in range(4)]
    deadline = time.time() + 30
    while not jobs[0].running() and time.time() < deadline:
        time.sleep(0.01)
    processes, manager = list(pool._processes.values()), pool._executor_manager_thread
    _stop_workers(pool)
    assert not any(p.is_alive() for p in processes)
    assert not manager.is_alive()  # its pipe is closed: nothing left for the exit handler to race with


def test_cache_clean_refuses_a_file_and_three_at_once_all_end_cleanly(tmp_path, capsys):
    """--cache-dir naming a file is one line, not "freed 0 B"; three cleans at once: each entry is removed
    by one of them, the others say so, none fails on a file another removed."""
    import threading

    from convae.cli import main

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert main(["cache", "clean", "--cache-dir", str(not_a_folder)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    tensors = tmp_path / "cache" / "tensors"
    for k in range(6):
        old = tensors / f"{k:024x}"
        for d in range(20):
            (old / f"d{d}").mkdir(parents=True)
            for f in range(10):
                (old / f"d{d}" / f"{f}.npy").write_bytes(b"x" * 100)
        (old / "meta.json").write_text(json.dumps({"version": 3}))
    codes = []
    threads = [
        threading.Thread(target=lambda: codes.append(main(["cache", "clean", "--cache-dir", str(tmp_path / "cache")])))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [0, 0, 0] and not [p for p in tensors.iterdir() if p.is_dir()]
    assert "Traceback" not in capsys.readouterr().err
