"""Hostile input through the CLI, as a user (or an attacker) would give it.

Every case must end the same way: exit code 2, one line on stderr starting ``convae: error:``,
no traceback, nothing changed outside the named output, no temporary file left behind.
Generated cases (hypothesis) cover config files, flags, checkpoints and run folders.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import make_image_folder
from convae.cli import main
from convae.config import Config, build_config
from convae.data.cache import CACHE_VERSION
from convae.models import AutoEncoder, ModelConfig
from convae.outputs.checkpoint import FORMAT
from convae.utils.errors import ConvaeError

SMALL = [
    "--height",
    "16",
    "--width",
    "16",
    "--channels",
    "8",
    "16",
    "--latent-dim",
    "16",
    "--batch-size",
    "8",
    "--val-fraction",
    "0.5",
    "--device",
    "cpu",
]
RUN = SMALL + ["--pretrain-epochs", "1", "--finetune-epochs", "1"]
PRE = SMALL + ["--pretrain-epochs", "1"]
HOSTILE_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([math.inf, -math.inf, math.nan, -1.0, 0.0, 1e300, 10**11, 2**63, 100_000]),
    st.text(max_size=300),
    st.sampled_from(["", "x" * 5000, "é\n\x00", "../../etc"]),
    st.lists(st.integers(-5, 5), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
FIELDS = sorted(f for f in Config.__dataclass_fields__ if f not in ("out", "preset", "device", "data", "cache_dir"))


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``roots`` with its size and modification time."""
    out = {}
    for root in roots:
        for p in Path(root).rglob("*"):
            if p.is_file():
                st_ = p.stat()
                out[str(p)] = (st_.st_size, st_.st_mtime_ns)
    return out


def temporaries(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]


def refused(argv: list[str], capsys, match: str | None = None, untouched: tuple[Path, ...] = ()) -> str:
    """Run the CLI and assert the one-line refusal; returns the line."""
    before = snapshot(*untouched)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert err.startswith("convae: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err and len(err) < 600, err
    if match:
        assert match in err, err
    assert snapshot(*untouched) == before, "a file outside the output changed"
    return err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data = make_image_folder(root / "data", classes=2, per_class=6)
    cache = root / "cache"
    assert main(["pretrain", "--data", str(data), "--cache-dir", str(cache), "--out", str(root / "pre")] + PRE) == 0
    return root, data, cache


# ----------------------------------------------------------------------------- rule 1: every read is untrusted


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(FIELDS), value=HOSTILE_VALUES, yaml_file=st.booleans())
def test_generated_config_files_are_refused_in_one_line(world, capsys, key, value, yaml_file):
    root, data, cache = world
    text = json.dumps({key: value})
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        path = Path(tmp) / ("c.yaml" if yaml_file else "c.json")
        path.write_text(text)
        # JSON is YAML, but not always the same mapping (YAML reads Infinity, NaN and 1e+300 as strings, and
        # a numeric string is a number to a float knob): the case is judged by the config the file gives
        try:
            build_config("seed", str(path), {})
            valid = True
        except ConvaeError:
            valid = False
        except Exception as e:
            pytest.fail(f"{key}: {value!r} raised {type(e).__name__}, not ConvaeError")
        assume(not valid)  # a valid value is not a hostile case
        out = Path(tmp) / "out"
        refused(
            ["pretrain", "--config", str(path), "--data", str(data), "--cache-dir", str(cache), "--out", str(out)],
            capsys,
            untouched=(data, cache),
        )
        assert not out.exists(), "a folder was made before the config was refused"


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--seed", str(10**30)], "seed must be an integer in [0, 2**32)"),
        (["--height", "100000", "--width", "100000"], "more than this machine's"),
        (["--latent-dim", str(10**11)], "more than this machine's"),
        (["--lr", "inf"], "lr must be a number > 0 and finite"),
        (["--lr", "nan"], "lr must be a number > 0 and finite"),
        (["--weight-decay", "inf"], "weight_decay must be a number >= 0 and finite"),
        (["--channels"] + ["8"] * 9, "channels must be a list of 1 to 8 integers"),
        (["--patch-size", "64"], "patch_size must be at most the input size 16"),
    ],
)
def test_absurd_flags_are_refused_before_any_folder_is_made(world, tmp_path, capsys, flags, match):
    root, data, cache = world
    out = tmp_path / "out"
    refused(
        ["run", "--data", str(data), "--cache-dir", str(cache), "--out", str(out)] + RUN + flags,
        capsys,
        match,
        untouched=(data, cache),
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "content, match",
    [
        (b"lr: 0.01\nnote: caf\xe9\n", "is not UTF-8 text"),
        (b"test_data: 123\n", "test_data must be a path or null"),
        (b"cache_dir: null\n", "cache_dir must be a non-empty path"),
        (b"out: 5\n", "out must be a path or null"),
        (b"channels: [8, 16.5]\n", "channels must be a list of 1 to 8 integers"),
        (b"[1, 2]\n", "must hold a mapping"),
        (b"lr: [\n", "could not be parsed"),
        (b"latentdim: 8\n", "did you mean latent_dim"),
    ],
)
def test_config_files_of_every_kind_of_wrong(world, tmp_path, capsys, content, match):
    root, data, cache = world
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    argv = ["pretrain", "--config", str(path), "--data", str(data)]
    argv += [] if content.startswith(b"cache_dir") else ["--cache-dir", str(cache)]  # a flag would win
    argv += [] if content.startswith(b"out") else ["--out", str(tmp_path / "out")]
    refused(argv, capsys, match, untouched=(data, cache))
    assert not (tmp_path / "out").exists()


def _payload(**change) -> dict:
    ae = AutoEncoder(ModelConfig(in_channels=3, height=16, width=16, channels=(8, 16), latent_dim=16))
    payload = {
        "format": FORMAT,
        "version": 1,
        "kind": "autoencoder",
        "model": ae.state_dict(),
        "config": ae.config.to_dict(),
        "classes": ["class_0", "class_1"],
        "run_config": {},
    }
    for key, value in change.items():
        if key.startswith("config."):
            payload["config"][key[7:]] = value
        else:
            payload[key] = value
    return payload


@pytest.mark.parametrize(
    "change, match",
    [
        ({"config.channels": []}, "channels must be a list of 1 to 8 integers"),
        ({"config.latent_dim": -4}, "latent_dim must be an integer > 0"),
        ({"config.latent_dim": 10**11}, "more than this machine's"),
        ({"config.height": "16"}, "height must be an integer > 0"),
        ({"config.upsample": "magic"}, "upsample must be one of"),
        ({"config.surprise": 1}, "unknown model config key"),
        ({"config": [1, 2]}, "the model config is not a mapping"),
        ({"model": torch.zeros(3)}, "its model is not a mapping of names to tensors"),
        ({"classes": "ab"}, "its classes are not a list of names"),
    ],
)
def test_the_config_inside_a_checkpoint_is_untrusted(world, tmp_path, capsys, change, match):
    root, data, cache = world
    path = tmp_path / "bad.pt"
    torch.save(_payload(**change), path)
    for argv in (
        [
            "evaluate",
            "--checkpoint",
            str(path),
            "--data",
            str(data),
            "--train-data",
            str(data),
            "--cache-dir",
            str(cache),
        ],
        ["export", "--checkpoint", str(path), "--format", "safetensors", "--out", str(tmp_path / "x.st")],
        [
            "finetune",
            "--checkpoint",
            str(path),
            "--data",
            str(data),
            "--cache-dir",
            str(cache),
            "--out",
            str(tmp_path / "ft"),
        ],
    ):
        refused(argv, capsys, match, untouched=(data, cache, path))
    assert not (tmp_path / "ft").exists() and not (tmp_path / "x.st").exists()


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("results.json", '{"accuracy": 0.5, "per_cl', "is not readable JSON"),
        ("config.json", "[1, 2, 3]", "not a mapping"),
        ("metrics.jsonl", '{"phase": "pretrain"}\nnot json\n', "line 2 is not JSON"),
        (
            "results.json",
            '{"per_class": {"a": 5}, "accuracy": "x", "num_images": 1, "classes": ["a"]}',
            "damaged results",
        ),
        ("results.json", b'{"eval_set": "caf\xe9"}', "is not readable JSON"),
    ],
)
def test_convae_report_reads_run_folders_as_untrusted(world, tmp_path, capsys, name, content, match):
    root, data, cache = world
    run = tmp_path / "run"
    shutil.copytree(root / "pre", run)
    (run / "report.html").unlink()
    (run / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    refused(["report", str(run)], capsys, match)
    assert not (run / "report.html").exists()


# ----------------------------------------------------------------------------- rule 2: every write can fail


def test_an_output_that_cannot_be_created_is_refused_before_decoding(world, tmp_path, capsys):
    root, data, cache = world
    blocker = tmp_path / "a"
    blocker.mkdir()
    (blocker / "config.json").write_text("{}")
    refused(
        [
            "run",
            "--data",
            str(data),
            "--cache-dir",
            str(tmp_path / "fresh-cache"),
            "--out",
            str(blocker / "config.json" / "x"),
        ]
        + RUN,
        capsys,
        "is a file, not a folder",
        untouched=(data,),
    )
    assert not (tmp_path / "fresh-cache").exists(), "the data was decoded before the output was checked"
    refused(
        [
            "export",
            "--checkpoint",
            str(root / "pre" / "checkpoints" / "autoencoder.pt"),
            "--format",
            "onnx",
            "--out",
            str(blocker / "config.json" / "m.onnx"),
        ],
        capsys,
        "config.json",
        untouched=(blocker,),
    )


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    from convae.utils.files import atomic_write_text

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".state.pt.{pid}.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    mine = tmp_path / f".state.pt.{os.getpid()}.def456.tmp"  # a live process's write in flight
    mine.write_bytes(b"y")
    atomic_write_text(tmp_path / "state.pt", "new")
    assert not stale.exists() and mine.exists()
    assert (tmp_path / "state.pt").read_text() == "new"


def _mount_tmpfs(path: Path, size: str, readonly: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or shutil.which("mount") is None:
        return False
    opts = f"size={size}" + (",ro" if readonly else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    if not _mount_tmpfs(mnt, "300k"):
        pytest.skip("mounting a small tmpfs needs Linux and the right to mount")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_real_full_disk_is_one_line_and_leaves_no_temporary(world, small_disk, capsys):
    """On a 300 KiB file system the state of a larger model does not fit: torch.save fails for real."""
    root, data, cache = world
    out = small_disk / "run"
    big = ["--channels", "32", "64", "--latent-dim", "256"]  # ~1 MB of state
    refused(
        ["run", "--data", str(data), "--cache-dir", str(cache), "--out", str(out)] + RUN + big,
        capsys,
        "could not write",
        untouched=(data, cache),
    )
    assert not temporaries(small_disk)
    # the decoded-data cache on a full disk: the same line, and no half file left filling it
    (small_disk / "cache" / "tensors").mkdir(parents=True)
    with open(small_disk / "filler", "wb", buffering=0) as f:  # fill the disk to the last byte
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    refused(
        ["pretrain", "--data", str(data), "--cache-dir", str(small_disk / "cache"), "--out", str(small_disk / "never")]
        + PRE,
        capsys,
        "could not write",
        untouched=(data,),
    )
    assert not temporaries(small_disk)


def test_a_read_only_file_system_is_refused_before_decoding(world, tmp_path, capsys):
    root, data, cache = world
    mnt = tmp_path / "ro"
    if not _mount_tmpfs(mnt, "1m", readonly=True):
        pytest.skip("mounting a read-only tmpfs needs Linux and the right to mount")
    try:
        refused(
            ["run", "--data", str(data), "--cache-dir", str(tmp_path / "c2"), "--out", str(mnt / "run")] + RUN,
            capsys,
            "is not writable",
            untouched=(data,),
        )
        assert not (tmp_path / "c2").exists()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ----------------------------------------------------------------------------- rules 3-6: one owner, exact resume


def _stop_after_first_epoch(monkeypatch, phase: str = "pretrain", signum: int = 15):
    """As if SIGTERM arrived during the first epoch of ``phase``: fit saves and stops at its end."""
    from convae.training.fit import RunContext

    real = RunContext.record

    def record(self, rec):
        real(self, rec)
        if rec["phase"] == phase and rec["epoch"] == 1:
            self.stop.signum = signum

    monkeypatch.setattr(RunContext, "record", record)


def _stopped_run(world, tmp_path, monkeypatch, capsys, data=None) -> Path:
    root, data0, cache = world
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _stop_after_first_epoch(m)
        code = main(
            ["run", "--data", str(data or data0), "--cache-dir", str(cache), "--out", str(out)]
            + SMALL
            + ["--pretrain-epochs", "2", "--finetune-epochs", "1"]
        )
    assert code == 128 + 15, capsys.readouterr().err
    capsys.readouterr()
    return out


def test_a_run_folder_has_one_owner(world, tmp_path, monkeypatch, capsys):
    from convae.outputs.rundir import locked

    run = _stopped_run(world, tmp_path, monkeypatch, capsys)
    with locked(run, "a test holding it"):
        line = refused(["report", str(run)], capsys, "is in use by pid")
        assert f"pid {os.getpid()}" in line and "a test holding it" in line
        refused(["run", "--out", str(run), "--resume"], capsys, "is in use by pid")
    assert main(["report", str(run)]) == 0  # released with its holder


def test_resume_continues_the_folder_named_even_after_a_move(world, tmp_path, monkeypatch, capsys):
    run = _stopped_run(world, tmp_path, monkeypatch, capsys)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    monkeypatch.chdir(moved.parent)
    assert main(["run", "--out", "moved", "--resume"]) == 0, capsys.readouterr().err
    assert not run.exists(), "the path stored inside the folder was used"
    results = json.loads((moved / "results.json").read_text())
    assert "finished" in results and "representation" in results
    assert (moved / "figures" / "embedding_map.png").is_file()


def test_resume_refuses_changed_inputs(world, tmp_path, monkeypatch, capsys):
    root, data0, cache = world
    data = make_image_folder(tmp_path / "data", classes=2, per_class=6)
    run = _stopped_run(world, tmp_path, monkeypatch, capsys, data=data)
    next(data.rglob("*.png")).unlink()
    refused(["run", "--out", str(run), "--resume"], capsys, f"the training data {data} changed")
    make_image_folder(tmp_path / "data", classes=2, per_class=6)  # the same files again
    cfg = json.loads((run / "config.json").read_text())
    cfg["latent_dim"] = 32
    (run / "config.json").write_text(json.dumps(cfg))
    refused(["run", "--out", str(run), "--resume"], capsys, "config.json was edited")


@pytest.mark.parametrize("where", ["measure_representation", "write_report"])
def test_a_signal_after_the_last_epoch_stops_and_resume_finishes(world, tmp_path, monkeypatch, capsys, where):
    import convae.commands.run as pipeline

    root, data, cache = world
    out = tmp_path / "run"
    real = getattr(pipeline, where)
    calls = []

    def signalled(*a, **k):
        if where == "write_report":
            calls.append(1)
            if len(calls) == 1:
                import signal

                os.kill(os.getpid(), signal.SIGTERM)  # a real signal, during the report
        else:
            a[2].stop.signum = 2  # SIGINT as the probes start
        return real(*a, **k)

    monkeypatch.setattr(pipeline, where, signalled)
    code = main(["run", "--data", str(data), "--cache-dir", str(cache), "--out", str(out)] + RUN)
    err = capsys.readouterr().err
    assert code in (128 + 2, 128 + 15) and "Resume with" in err, err
    assert "finished" not in json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else True
    monkeypatch.setattr(pipeline, where, real)
    assert main(["run", "--out", str(out), "--resume"]) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert "finished" in results and "representation" in results and (out / "report.html").is_file()
    assert (out / "figures" / "embedding_map.png").is_file()
    refused(["run", "--out", str(out), "--resume"], capsys, "has already finished")


# ----------------------------------------------------------------------------- rule 7: data edge cases finish the run


def test_an_evaluation_set_too_small_for_a_map_still_finishes(world, tmp_path, capsys):
    root, data, cache = world
    tiny = make_image_folder(tmp_path / "test", classes=2, per_class=1)  # 2 evaluation images
    out = tmp_path / "run"
    assert (
        main(["run", "--data", str(data), "--test-data", str(tiny), "--cache-dir", str(cache), "--out", str(out)] + RUN)
        == 0
    )
    assert "warning: the embedding map was not drawn" in capsys.readouterr().out
    assert not (out / "figures" / "embedding_map.png").exists()
    results = json.loads((out / "results.json").read_text())
    assert "finished" in results and "representation" in results and (out / "report.html").is_file()


def test_file_names_of_any_bytes_are_recorded_faithfully(world, tmp_path, capsys):
    if sys.platform != "linux":
        pytest.skip("file names of arbitrary bytes are a POSIX matter")
    root, _, cache = world
    data = make_image_folder(tmp_path / "data", classes=2, per_class=6)
    shutil.copy(next((data / "class_0").iterdir()), data / "class_0" / os.fsdecode(b"ok_\xfe.png"))
    (data / "class_0" / os.fsdecode(b"bad_\xff.png")).write_bytes(b"not an image")
    (data / "class_1" / "bad\nline.png").write_bytes(b"not an image either")
    out = tmp_path / "run"
    assert main(["run", "--data", str(data), "--cache-dir", str(cache), "--out", str(out)] + RUN) == 0
    skipped = (out / "skipped.txt").read_text(encoding="utf-8").splitlines()
    assert len(skipped) == 2, skipped  # one line per file, whatever its name holds
    assert any(line.startswith("class_0/bad_\\xff.png: ") for line in skipped)
    assert any(line.startswith("class_1/bad\\nline.png: ") for line in skipped)
    npy = tmp_path / "emb.npy"
    assert (
        main(
            [
                "encode",
                "--checkpoint",
                str(out / "checkpoints" / "autoencoder.pt"),
                "--data",
                str(data),
                "--cache-dir",
                str(cache),
                "--out",
                str(npy),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    table = npy.with_suffix(".csv").read_text(encoding="utf-8")
    assert "class_0/ok_\\xfe.png" in table


def test_links_to_folders_are_never_followed_at_any_level(tmp_path):
    from convae.data import load_source

    data = make_image_folder(tmp_path / "data", classes=2, per_class=3)
    outside = make_image_folder(tmp_path / "outside", classes=1, per_class=3, labelled=False)
    os.symlink(".", data / "loop")  # would duplicate every image under a fake class
    os.symlink(outside, data / "foreign")  # a class read from outside the source
    os.symlink(outside, data / "class_0" / "nested")  # deeper down too
    ds = load_source(str(data), 3, 16, 16, cache_dir=tmp_path / "cache", log=lambda m: None)
    assert ds.classes == ["class_0", "class_1"] and len(ds) == 6
    notes = "\n".join(ds.skipped)
    for name in ("loop/", "foreign/", "class_0/nested/"):
        assert f"{name}: a link to a folder; left out" in notes


def test_a_zip_with_a_bad_crc_is_one_line(world, tmp_path, capsys):
    import zipfile

    root, data, cache = world
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(data.rglob("*.png")):
            zf.write(p, str(p.relative_to(data)))
    raw = bytearray(archive.read_bytes())
    first = zipfile.ZipFile(archive).infolist()[0]
    raw[first.header_offset + 30 + len(first.filename) + 40] ^= 0xFF  # a byte inside the first member's data
    archive.write_bytes(bytes(raw))
    refused(
        ["pretrain", "--data", str(archive), "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o")] + PRE,
        capsys,
        "is damaged",
        untouched=(archive,),
    )
    assert not temporaries(tmp_path / "c")


def test_jpeg_exif_orientation_is_applied(tmp_path):
    import numpy as np
    from PIL import Image

    from convae.data import decode_file

    arr = np.zeros((8, 16, 3), np.uint8)  # 16 wide, 8 high: red left half, blue right half
    arr[:, :8] = (255, 0, 0)
    arr[:, 8:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    img.save(path, quality=95, exif=exif)
    t, _ = decode_file(path, 3)
    assert tuple(t.shape) == (3, 16, 8)  # upright: now 8 wide, 16 high
    top, bottom = t[:, 2, 4].tolist(), t[:, 13, 4].tolist()
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red on top after the turn


def test_a_damaged_cache_is_decoded_again_and_a_killed_extraction_is_swept(tmp_path):
    import tarfile

    from convae.data import load_source

    data = make_image_folder(tmp_path / "data", classes=2, per_class=3)
    cache = tmp_path / "cache"
    first = load_source(str(data), 3, 16, 16, cache_dir=cache, log=lambda m: None)
    first.store = first.images.clone()  # it maps the file that is now damaged in place
    (cached,) = (cache / "tensors").glob("*/images.npy")
    cached.write_bytes(cached.read_bytes()[:200])  # a truncated cache file
    lines = []
    again = load_source(str(data), 3, 16, 16, cache_dir=cache, log=lines.append)
    assert any("unreadable (" in m and "decoding again" in m for m in lines)
    assert torch.equal(first.images, again.images)
    # a cache of another format version is rebuilt with a line in the log, never misread
    meta = cached.parent / "meta.json"
    meta.write_text(meta.read_text().replace(f'"version": {CACHE_VERSION}', '"version": 3'))
    lines.clear()
    again = load_source(str(data), 3, 16, 16, cache_dir=cache, log=lines.append)
    assert any(f"is format 3, this convae reads {CACHE_VERSION}: decoding again" in m for m in lines)
    assert torch.equal(first.images, again.images) and f'"version": {CACHE_VERSION}' in meta.read_text()
    # the temporary folder of an extraction killed with -9: removed by the next extraction
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cache / "extracted" / f".tmp-{int(dead.stdout)}-abcd"
    (stale / "half").mkdir(parents=True)
    archive = tmp_path / "d.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(data, arcname="d")
    assert len(load_source(str(archive), 3, 16, 16, cache_dir=cache, log=lambda m: None)) == 6
    assert not stale.exists() and not temporaries(cache)


def test_resume_refuses_a_changed_initial_checkpoint(world, tmp_path, monkeypatch, capsys):
    root, data, cache = world
    ckpt = tmp_path / "ae.pt"
    shutil.copy(root / "pre" / "checkpoints" / "autoencoder.pt", ckpt)
    out = tmp_path / "ft"
    with monkeypatch.context() as m:
        _stop_after_first_epoch(m, phase="finetune")
        code = main(
            [
                "finetune",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(data),
                "--cache-dir",
                str(cache),
                "--out",
                str(out),
                "--finetune-epochs",
                "2",
                "--batch-size",
                "8",
                "--val-fraction",
                "0.5",
                "--device",
                "cpu",
            ]
        )
    assert code == 128 + 15
    capsys.readouterr()
    payload = torch.load(ckpt, weights_only=True)
    payload["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in payload["model"].items()}
    torch.save(payload, ckpt)  # another autoencoder under the same name
    refused(["finetune", "--out", str(out), "--resume"], capsys, f"the initial checkpoint {ckpt} changed")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"phase": 5}, "damaged training state (phase)"),
        ({"epoch": "x", "metrics": None}, "damaged training state (epoch, metrics)"),
        ({"model": {"encoder.fc.0.weight": torch.zeros(2, 2)}}, "does not match the model architecture"),
        ({"optimizer": {"state": {}, "param_groups": []}}, "does not match this run's optimizer"),
    ],
)
def test_a_hostile_training_state_is_refused_on_resume(world, tmp_path, monkeypatch, capsys, change, match):
    run = _stopped_run(world, tmp_path, monkeypatch, capsys)
    path = run / "checkpoints" / "state.pt"
    state = torch.load(path, weights_only=True)
    state.update(change)
    torch.save(state, path)
    refused(["run", "--out", str(run), "--resume"], capsys, match)


def test_files_written_whole_get_the_usual_permissions(tmp_path):
    from convae.utils.files import UMASK, atomic_write_text

    path = atomic_write_text(tmp_path / "results.json", "{}")
    assert path.stat().st_mode & 0o777 == 0o666 & ~UMASK  # not mkstemp's private 0600


def test_a_file_system_without_locks_runs_unlocked(tmp_path, monkeypatch):
    import errno
    import fcntl

    from convae.outputs.rundir import locked

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with locked(tmp_path, "training"):  # not "in use": the mount cannot lock at all
        ran.append(1)
    assert ran == [1]


# ----------------------------------------------------------------------------- links and the lock (hardening)


@pytest.fixture
def finished_run(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=6)
    run = tmp_path / "run"
    assert main(["run", "--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--out", str(run)] + RUN) == 0
    return data, run


@pytest.mark.parametrize("name", [".lock", "figures", "figures/confusion_matrix.png", "metrics.jsonl", "config.json"])
def test_a_link_in_a_run_folder_is_never_followed(finished_run, tmp_path, capsys, name):
    """A link planted in a run folder (to a user's file, a folder, a secret) is refused, not written
    through or read: the target is untouched and nothing of it reaches report.html."""
    _, run = finished_run
    target = tmp_path / "elsewhere"
    if name == "figures":
        target.mkdir()
        (target / "kernels_initial.png").write_bytes(b"a user's own figure")
        shutil.rmtree(run / name)
    else:
        target.write_bytes(b"SECRET-" * 10)
        (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(target)
    before = snapshot(target) if target.is_dir() else {str(target): target.read_bytes()}
    code = main(["report", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "is a symbolic link" in err and err.count("\n") == 1
    assert (snapshot(target) if target.is_dir() else {str(target): target.read_bytes()}) == before
    if (run / "report.html").is_file():
        assert "SECRET" not in (run / "report.html").read_text()


def test_a_link_planted_before_a_resume_is_refused_and_its_target_kept(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=6)
    run = tmp_path / "run"
    argv = ["run", "--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--out", str(run)] + RUN
    argv[argv.index("--finetune-epochs") + 1] = "2"
    assert main(argv) == 0
    results = json.loads((run / "results.json").read_text())
    results.pop("finished")  # as if killed before the end
    (run / "results.json").write_text(json.dumps(results))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "kernels_initial.png").write_bytes(b"mine")
    shutil.rmtree(run / "figures")
    (run / "figures").symlink_to(mine)
    assert main(["run", "--out", str(run), "--resume"]) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert (mine / "kernels_initial.png").read_bytes() == b"mine" and len(list(mine.iterdir())) == 1


def test_the_lock_cannot_be_deleted_away(tmp_path):
    """The lock is held on the folder itself: removing RUN/.lock does not free the folder."""
    from convae.outputs.rundir import locked

    run = tmp_path / "run"
    run.mkdir()
    with locked(run, "training"):
        assert "training" in (run / ".lock").read_text()
        (run / ".lock").unlink()
        with pytest.raises(ConvaeError, match="is in use by"), locked(run, "resuming a run"):
            pass
    assert not (run / ".lock").exists()  # no note left behind to read as a live lock
    with locked(run, "writing the report"):  # free again once the holder let go
        pass


# ----------------------------------------------------------------------------- the cache as untrusted input


def _cache_entry(cache: Path) -> Path:
    (entry,) = [p for p in (cache / "tensors").iterdir() if p.is_dir() and not p.name.endswith(".partial")]
    return entry


def _tamper_labels_range(entry):
    np_labels = __import__("numpy").load(entry / "labels.npy")
    np_labels[0] = 7
    __import__("numpy").save(entry / "labels.npy", np_labels)


def _tamper_labels_dtype(entry):
    import numpy as np

    np.save(entry / "labels.npy", np.load(entry / "labels.npy").astype(np.int32))


def _tamper_meta(key, value):
    def tamper(entry):
        meta = json.loads((entry / "meta.json").read_text())
        meta[key] = value(meta[key])
        (entry / "meta.json").write_text(json.dumps(meta))

    return tamper


def _tamper_images(entry):
    import numpy as np

    images = np.load(entry / "images.npy")
    np.save(entry / "images.npy", 255 - images)  # another array of the same shape and dtype


@pytest.mark.parametrize(
    "tamper",
    [
        _tamper_labels_range,
        _tamper_labels_dtype,
        _tamper_images,
        _tamper_meta("classes", lambda c: c + ["ghost"]),
        _tamper_meta("classes", lambda c: 5),
        _tamper_meta("files", lambda f: f[:-3]),
        _tamper_meta("shape", lambda s: [s[0], 3, 8, 8]),
        _tamper_meta("skipped", lambda s: {"a": 1}),
    ],
    ids=[
        "label-range",
        "label-dtype",
        "images-replaced",
        "ghost-class",
        "classes-int",
        "files-cut",
        "shape",
        "skipped",
    ],
)
def test_a_tampered_cache_is_decoded_again_with_a_log_line(tmp_path, capsys, tamper):
    from convae.data import load_source

    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    cache = tmp_path / "cache"
    first = load_source(str(data), 3, 16, 16, cache, log=lambda m: None)
    expected = first.images.clone()  # a memory map of the file tampered with in place
    tamper(_cache_entry(cache))
    lines = []
    again = load_source(str(data), 3, 16, 16, cache, log=lines.append)
    assert any("decoding again" in line for line in lines), lines
    assert again.classes == first.classes and torch.equal(again.labels, first.labels)
    assert torch.equal(again.images, expected) and again.files == first.files
    lines.clear()
    load_source(str(data), 3, 16, 16, cache, log=lines.append)
    assert not any("decoding again" in line for line in lines)  # rebuilt whole: trusted again


def test_a_damaged_partial_chunk_is_decoded_again(tmp_path, monkeypatch):
    import convae.data.decode as decode
    from convae.data import load_source
    from convae.utils.files import atomic_torch_save

    monkeypatch.setattr(decode, "CHUNK", 4)
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    cache = tmp_path / "cache"
    reference = load_source(str(data), 3, 16, 16, tmp_path / "ref", log=lambda m: None)
    key = _cache_entry(tmp_path / "ref").name
    partial = cache / "tensors" / f"{key}.partial"
    bad = {
        "images": torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
        "keep": [0, 9],
        "skipped": ["x", "y"],
        "n_mode": 0,
        "n_size": 0,
    }  # position 9 in a chunk of 4 files
    atomic_torch_save(bad, partial / "0000000.pt")
    got = load_source(str(data), 3, 16, 16, cache, log=lambda m: None)
    assert torch.equal(got.images, reference.images) and torch.equal(got.labels, reference.labels)


def test_two_processes_decoding_one_source_into_one_cache_both_succeed(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=30)
    code = (
        "import sys; from convae.data import load_source; "
        "s = load_source(sys.argv[1], 3, 16, 16, sys.argv[2], log=lambda m: None); print(len(s))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(data), str(tmp_path / "cache")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outs]
    assert [o.strip() for o, _ in outs] == ["60"] * 3
    assert (_cache_entry(tmp_path / "cache") / "meta.json").is_file()


# ----------------------------------------------------------------------------- outputs, sizes, native code


def test_an_output_written_meanwhile_by_another_process_is_never_overwritten(world, tmp_path, monkeypatch):
    import convae.commands.export as export_module

    root, _, _ = world
    out = tmp_path / "enc.safetensors"
    real = export_module.export_safetensors

    def racing(module, cfg, part, tmp, classes):
        out.write_bytes(b"the other process's export")  # lands between the check and the write
        real(module, cfg, part, tmp, classes)

    monkeypatch.setattr(export_module, "export_safetensors", racing)
    with pytest.raises(ConvaeError, match="another process wrote it meanwhile"):
        export_module.export(root / "pre" / "checkpoints" / "autoencoder.pt", "safetensors", "encoder", out)
    assert out.read_bytes() == b"the other process's export" and temporaries(tmp_path) == []
    from convae.utils.files import atomic_write_bytes

    (tmp_path / "e.npy").write_bytes(b"first")
    with pytest.raises(ConvaeError, match="already exists"):
        atomic_write_bytes(tmp_path / "e.npy", b"second", exclusive=True)
    assert (tmp_path / "e.npy").read_bytes() == b"first"


def test_a_killed_exports_folder_is_swept_and_exports_get_the_usual_mode(world, tmp_path):
    root, _, _ = world
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-{dead.stdout.strip()}-abcd"
    stale.mkdir()
    (stale / "enc.safetensors").write_bytes(b"half")
    out = tmp_path / "enc.safetensors"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(root / "pre" / "checkpoints" / "autoencoder.pt"),
                "--format",
                "safetensors",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert not stale.exists() and (out.stat().st_mode & 0o777) == 0o666 & ~convae_umask()


def convae_umask() -> int:
    from convae.utils.files import UMASK

    return UMASK


def test_sizes_from_small_inputs_are_bounded(tmp_path):
    from PIL import Image

    from convae.outputs.figures import save_confusion_matrix

    k = 1100
    save_confusion_matrix(
        [[1 if i == j else 0 for j in range(k)] for i in range(k)], [f"c{i}" for i in range(k)], tmp_path / "cm.png"
    )
    with Image.open(tmp_path / "cm.png") as im:
        assert max(im.size) < 2500
    # a YAML alias bomb under a known key: 9**9 leaves if expanded, 330 bytes on disk
    bomb = "test_data:\n  - &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"  - &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    (tmp_path / "bomb.yaml").write_text(bomb)
    assert len(bomb) < 400
    proc = subprocess.run(
        [sys.executable, "-m", "convae", "run", "--config", str(tmp_path / "bomb.yaml"), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "test_data must be a path or null" in proc.stderr and len(proc.stderr) < 600
    from convae.utils.errors import short

    nested = [1]
    for _ in range(40):
        nested = [nested] * 10  # 10**40 leaves, shared
    assert len(short(nested)) <= 60


def test_a_model_config_with_a_huge_head_is_refused_before_allocation(tmp_path):
    import convae

    folder = convae.save_pretrained(
        AutoEncoder(ModelConfig(channels=(8, 16), latent_dim=16, height=16, width=16)), tmp_path / "m"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(convae_kind="classifier", num_classes=10**9)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvaeError, match="num_classes must be an integer in \\[1, 1000000\\]"):
        convae.from_pretrained(folder)
    config.update(num_classes=10**6, latent_dim=2**16)  # within the bound, beyond the memory
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvaeError, match="1000000 classes\\) needs at least"):
        convae.from_pretrained(folder)


def test_identical_images_skip_the_embedding_map_with_a_warning(world, tmp_path):
    from PIL import Image

    root, _, _ = world
    data = tmp_path / "black"
    data.mkdir()
    for i in range(16):
        Image.new("RGB", (16, 16)).save(data / f"{i}.png")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "convae",
            "encode",
            "--checkpoint",
            str(root / "pre" / "checkpoints" / "autoencoder.pt"),
            "--data",
            str(data),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "e.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert "the embedding map was not drawn" in proc.stdout + proc.stderr and "distinct" in proc.stdout + proc.stderr
    assert (tmp_path / "e.npy").is_file() and not (tmp_path / "e_map.png").exists()


def test_float_tiffs_in_0_1_are_scaled_and_names_with_dollars_are_drawn(tmp_path):
    import numpy as np
    from PIL import Image

    from convae.data.images import load_image
    from convae.outputs.figures import save_confusion_matrix, save_embedding_map

    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(tmp_path / "f.tif")
    img, _, _ = load_image(tmp_path / "f.tif", 1, 8, 8)
    assert int(img.float().mean().round()) == 128
    classes = ["$", "a$b", "$x$y$"]
    save_confusion_matrix([[1, 0, 0], [0, 1, 0], [0, 0, 1]], classes, tmp_path / "cm.png")
    rng = np.random.default_rng(0)
    save_embedding_map(rng.normal(size=(30, 4)), np.arange(30) % 3, classes, tmp_path / "map.png", "a $ title")
    assert (tmp_path / "cm.png").is_file() and (tmp_path / "map.png").is_file()


def _zip_with(tmp_path: Path, flag_bits: int = 0, method: int | None = None) -> Path:
    import io
    import zipfile

    from conftest import make_image

    buf = io.BytesIO()
    make_image(__import__("numpy").random.default_rng(0), (200, 10, 10)).save(buf, "PNG")
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for k in range(2):
            zf.writestr(zipfile.ZipInfo(f"c{k}/img.png"), buf.getvalue())
    # what Python's zipfile will not write (an encryption flag, another method): patched into the headers
    raw = bytearray(path.read_bytes())
    for sig, flags_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = raw.find(sig)
        while at >= 0:
            raw[at + flags_at] |= flag_bits
            if method is not None:
                raw[at + method_at : at + method_at + 2] = method.to_bytes(2, "little")
            at = raw.find(sig, at + 4)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("kind, match", [("encrypted", "is encrypted"), ("method", "compression method 99")])
def test_zip_members_python_cannot_read_are_one_line(tmp_path, capsys, kind, match):
    archive = _zip_with(tmp_path, flag_bits=1) if kind == "encrypted" else _zip_with(tmp_path, method=99)
    refused(
        ["pretrain", "--data", str(archive), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r")]
        + PRE,
        capsys,
        match,
    )


@pytest.mark.parametrize(
    "damage, match",
    [
        ("sparse", "not a mapping of names to tensors"),
        ("meta", "not a mapping of names to tensors"),
        ("classes", "class names for a classifier of 2 outputs"),
        ("nan", "NaN or infinite"),
    ],
)
def test_checkpoints_with_unusable_tensors_or_classes_are_refused(world, tmp_path, capsys, damage, match):
    root, data, _ = world
    clf_ckpt = tmp_path / "clf.pt"
    from convae.models import Classifier
    from convae.outputs.checkpoint import read_checkpoint, save_checkpoint

    ae = AutoEncoder(ModelConfig(channels=(8, 16), latent_dim=16, height=16, width=16))
    save_checkpoint(clf_ckpt, Classifier.from_autoencoder(ae, 2), "classifier", ["a", "b"])
    payload = read_checkpoint(clf_ckpt)
    name = "head.weight"
    if damage == "sparse":
        payload["model"][name] = payload["model"][name].to_sparse()
    elif damage == "meta":
        payload["model"][name] = torch.empty_like(payload["model"][name], device="meta")
    elif damage == "classes":
        payload["classes"] = ["a"]
    else:
        payload["model"][name][0, 0] = float("nan")
    torch.save(payload, clf_ckpt)
    refused(["predict", "--checkpoint", str(clf_ckpt), str(data)], capsys, match)


def test_one_image_per_class_is_refused_before_any_folder(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=1)
    refused(
        ["run", "--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r")] + RUN,
        capsys,
        "leaves",
    )
    assert not (tmp_path / "r").exists()


def test_a_path_that_is_not_utf8_runs_and_reports(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=6)
    out = tmp_path / os.fsdecode(b"run-\xff")
    assert main(["run", "--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--out", str(out)] + RUN) == 0
    assert (out / "report.html").is_file() and "\\xff" in capsys.readouterr().out


def test_infinity_in_metrics_still_reports(world, tmp_path, capsys):
    root, _, _ = world
    run = tmp_path / "run"
    shutil.copytree(root / "pre", run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec.update(seconds=float("inf"), train_loss=float("inf"))
    (run / "metrics.jsonl").write_text(json.dumps(rec) + "\n")  # json writes Infinity
    assert main(["report", str(run)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    "images, kwargs, match",
    [
        (__import__("numpy").empty((0, 16, 16, 3), "uint8"), {}, "no images given"),
        (__import__("numpy").array([[[object()]]], dtype=object), {}, "numpy array of object"),
        (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), {"labels": [0, 1, 0, 1], "classes": [0, 1]}, "class names"),
        (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), {"labels": ["a", "b", "a", "b"]}, "labels must be 4 integers"),
    ],
)
def test_the_api_refuses_unusable_images_labels_and_classes_before_training(tmp_path, images, kwargs, match):
    import convae

    with pytest.raises(ConvaeError, match=match):
        convae.finetune(
            images,
            init="scratch",
            quiet=True,
            out=str(tmp_path / "r"),
            height=16,
            width=16,
            channels=[8, 16],
            latent_dim=16,
            **kwargs,
        )
    assert not (tmp_path / "r").exists()


def test_duplicate_sweep_budgets_are_refused(world, capsys, tmp_path):
    root, data, cache = world
    refused(
        [
            "sweep",
            "--data",
            str(data),
            "--cache-dir",
            str(cache),
            "--out",
            str(tmp_path / "s"),
            "--labels-per-class",
            "2",
            "2",
            "--seeds",
            "1",
        ]
        + SMALL,
        capsys,
        "given twice",
    )


def test_encode_marks_the_training_runs_own_split(tmp_path):
    import csv

    from convae.data import load_source, split_indices

    data = make_image_folder(tmp_path / "data", classes=2, per_class=8)
    run = tmp_path / "run"
    args = [a if a != "0.5" else "0.25" for a in PRE] + ["--seed", "3"]
    assert (
        main(["pretrain", "--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--out", str(run)] + args) == 0
    )
    assert (
        main(
            [
                "encode",
                "--checkpoint",
                str(run / "checkpoints" / "autoencoder.pt"),
                "--data",
                str(data),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--out",
                str(tmp_path / "e.npy"),
                "--no-map",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "e.csv")))
    ds = load_source(str(data), 3, 16, 16, tmp_path / "cache", log=lambda m: None)
    _, val = split_indices(ds.labels, len(ds), 0.25, 3)
    assert {i for i, r in enumerate(rows) if r["split"] == "val"} == set(val.tolist())


def test_markup_and_formulas_from_files_are_escaped(world, tmp_path, capsys):
    import csv

    root, _, _ = world
    run = tmp_path / "run"
    shutil.copytree(root / "pre", run)
    (run / "results.json").write_text(
        json.dumps(
            {
                "phase": "pretrain",
                "accuracy": 0.5,
                "per_class": {},
                "num_images": "<script>alert(1)</script>",
                "timing": {"<b>x</b>_s": 1.0},
                "classes": [],
            }
        )
    )
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    page = (run / "report.html").read_text()
    assert "<script>" not in page and "<b>x</b>" not in page
    data = tmp_path / "data"
    for name in ("=HYPERLINK(1)", "@sum"):
        make_image_folder(data / name, classes=1, per_class=3)
    assert (
        main(
            [
                "encode",
                "--checkpoint",
                str(root / "pre" / "checkpoints" / "autoencoder.pt"),
                "--data",
                str(data),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--out",
                str(tmp_path / "e.npy"),
                "--no-map",
            ]
        )
        == 0
    )
    classes = {r["class"] for r in csv.DictReader(open(tmp_path / "e.csv"))}
    assert classes == {"'=HYPERLINK(1)", "'@sum"}


def test_a_file_name_with_a_newline_keeps_one_row(world, tmp_path, capsys):
    from PIL import Image

    from convae.models import Classifier
    from convae.outputs.checkpoint import save_checkpoint

    ae = AutoEncoder(ModelConfig(channels=(8, 16), latent_dim=16, height=16, width=16))
    save_checkpoint(tmp_path / "clf.pt", Classifier.from_autoencoder(ae, 2), "classifier", ["a", "b"])
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "two\nlines.png")
    Image.new("RGB", (16, 16)).save(folder / "plain.png")
    assert main(["predict", "--checkpoint", str(tmp_path / "clf.pt"), str(folder)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # the header and one row per image


def test_sigterm_during_a_parallel_decode_leaves_no_worker(tmp_path):
    import signal
    import time

    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for k in range(2):
        (data / f"c{k}").mkdir(parents=True)
        for i in range(1500):
            Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(data / f"c{k}" / f"{i}.png")
    marker = tmp_path / "decode-marker-out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "convae",
            "pretrain",
            "--data",
            str(data),
            "--workers",
            "2",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(marker),
        ]
        + PRE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("decoding"):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in err and "Traceback" not in err, err

    def survivors() -> list[str]:
        found = []
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and str(marker) in (p / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(p.name)
            except OSError:
                pass
        return found

    deadline = time.time() + 10
    while survivors() and time.time() < deadline:
        time.sleep(0.2)
    assert survivors() == []


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--test-data", "NaN"],
        ["evaluate", "--train-data", "NaN"],
    ],
)
def test_every_path_is_checked_before_anything_is_decoded(world, tmp_path, capsys, argv):
    root, data, _ = world
    cache = tmp_path / "fresh-cache"
    extra = (
        ["--checkpoint", str(root / "pre" / "checkpoints" / "autoencoder.pt")]
        if argv[0] == "evaluate"
        else ["--out", str(tmp_path / "r")] + RUN
    )
    refused(argv + ["--data", str(data), "--cache-dir", str(cache)] + extra, capsys, "data source not found: NaN")
    assert not cache.exists()  # the training data was not decoded first


@pytest.mark.parametrize("command", ["run", "sweep", "evaluate"])
def test_a_new_output_folder_claimed_by_another_process_is_refused_before_any_write(world, tmp_path, capsys, command):
    from convae.outputs.rundir import locked

    root, data, cache = world
    out = tmp_path / "claimed"
    out.mkdir()
    args = {
        "run": ["run"] + RUN,
        "sweep": ["sweep", "--labels-per-class", "2", "--seeds", "1", "--steps", "1"] + PRE,
        "evaluate": [
            "evaluate",
            "--checkpoint",
            str(root / "pre" / "checkpoints" / "autoencoder.pt"),
            "--train-data",
            str(data),
        ],
    }[command]
    with locked(out, "training"):  # another process started on the same --out a moment earlier
        refused(args + ["--data", str(data), "--cache-dir", str(cache), "--out", str(out)], capsys, "is in use by")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_a_hub_folder_with_the_wrong_class_names_or_nan_weights_is_refused(tmp_path):
    import convae
    from convae.models import Classifier

    clf = Classifier(ModelConfig(channels=(8, 16), latent_dim=16, height=16, width=16, num_classes=2))
    clf.classes = ["a", "b"]
    folder = convae.save_pretrained(clf, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "classes": ["a"]}))
    with pytest.raises(ConvaeError, match="damaged class names"):
        convae.from_pretrained(folder)
    with torch.no_grad():
        clf.head.bias.fill_(float("nan"))
    folder = convae.save_pretrained(clf, tmp_path / "n")
    with pytest.raises(ConvaeError, match="NaN or infinite"):
        convae.from_pretrained(folder)
