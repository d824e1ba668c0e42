"""The run folder (config, metrics, results, figures), the epoch line, and TensorBoard."""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import Config, save_config
from ..utils.errors import ConvaeError, clip
from ..utils.files import append_line, atomic_write_text, read_file, refuse_links
from ..utils.records import EpochRecord, Log, loss_terms


class RunDir:
    """One run's folder: ``config.json``, ``metrics.jsonl``, ``results.json``, ``checkpoints/``, ``figures/``."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        self.check_free(self.path)
        try:  # checkpoints/ and figures/ appear with their first file: no empty folders
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConvaeError(
                f"could not create the run folder {self.path}: {e.strerror}", advice="choose another --out"
            ) from None

    @classmethod
    def open(cls, path: str | Path | None) -> RunDir:
        """An existing run folder, to continue it."""
        if path is None or not (Path(path) / "config.json").is_file():
            raise ConvaeError(
                f"{path} is not a run folder to continue (no config.json)",
                advice="--resume needs --out DIR of an earlier run",
            )
        run = cls.__new__(cls)
        run.path = Path(path)
        return run

    @classmethod
    def claim(cls, path: str | Path | None, hold: ExitStack, what: str) -> RunDir:
        """A new run folder, locked for the rest of ``hold``, and checked again under the lock: of two
        processes started on one new ``--out`` at once, the second is refused before it writes."""
        run = cls(path)
        hold.enter_context(locked(run.path, what))
        cls.check_free(run.path)
        return run

    @classmethod
    def start(cls, cfg: Config, hold: ExitStack, what: str) -> tuple[RunDir, Config]:
        """A new run folder for ``cfg`` (a timestamp when ``out`` is not set), locked for the rest of
        ``hold``; the config, with ``out`` the folder, saved in it and returned."""
        run = cls.claim(cfg.out, hold, what)
        cfg = replace(cfg, out=str(run.path))
        run.save_config(cfg)
        return run, cfg

    @staticmethod
    def check_free(path: str | Path | None) -> None:
        """Refuse a folder that already holds files: an earlier run is never overwritten. The lock's
        note of a process that holds (or, killed, held) the folder is no run: the lock says which."""
        if path is None:
            return
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise ConvaeError(f"the output folder {p} exists and is not a folder", advice="choose a new --out")
        if p.is_dir() and any(f.name != LOCK_NAME and not f.name.startswith(f".{LOCK_NAME}.") for f in p.iterdir()):
            raise ConvaeError(
                f"the output folder {p} already holds files; an earlier run is never overwritten",
                advice="choose a new --out",
            )
        check_writable(p)

    @property
    def checkpoints(self) -> Path:
        return refuse_links(self.path, self.path / "checkpoints")

    @property
    def figures(self) -> Path:
        return refuse_links(self.path, self.path / "figures")

    def file(self, name: str) -> Path:
        """``RUN/name``, refused when it (or a folder on the way) is a link."""
        return refuse_links(self.path, self.path / name)

    def save_config(self, cfg: Config) -> None:
        save_config(cfg, self.path / "config.json")

    def log_metrics(self, record: EpochRecord | dict[str, Any]) -> None:
        append_line(self.file("metrics.jsonl"), json.dumps(record) + "\n")

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_text(self.file(name), json.dumps(obj, indent=2) + "\n")

    def write_lines(self, name: str, lines: list[str]) -> Path:
        """Replace ``name`` whole (or not at all)."""
        return atomic_write_text(self.file(name), "".join(line + "\n" for line in lines))


def check_writable(path: Path) -> None:
    """Refuse, before any work, an output path that cannot be created: a path component that
    is a file, a read-only file system, a folder without write permission."""
    parent = Path(os.path.abspath(path))
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConvaeError(f"cannot create {path}: {parent} is a file, not a folder", advice="choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConvaeError(
            f"cannot create {path}: {parent} is not writable (permissions or a read-only file system)",
            advice="choose another --out",
        )


LOCK_NAME = ".lock"


@contextmanager
def locked(path: str | Path, what: str) -> Iterator[None]:
    """Hold ``path``'s exclusive lock while a process uses the run folder (train, resume, report).

    The lock is the kernel's (``flock``) on the folder itself: it goes with the process, so a
    killed run never leaves its folder locked, and no file can be deleted to take it away. A
    second process is refused with one line naming the holder, whose pid, host and task are in
    ``RUN/.lock`` while it holds the folder (removed when it lets go).
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; one process per folder is on the user
        yield
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise ConvaeError(f"could not lock the run folder {path}: {e.strerror}") from None
    note = refuse_links(Path(path), Path(path) / LOCK_NAME)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                yield  # a file system without locks (some network mounts): run unlocked, as before
                return
            raise ConvaeError(
                f"the run folder {path} is in use by {_holder(note)}", advice="wait for it to finish, or stop it first"
            ) from None
        atomic_write_text(
            note, f"pid {os.getpid()} on {socket.gethostname()} ({what}, since {time.strftime('%H:%M:%S')})\n"
        )
        yield
    finally:
        if held:
            note.unlink(missing_ok=True)  # a note left behind would read as a live lock
        os.close(fd)


def _holder(note: Path) -> str:
    try:
        text = read_file(note)[:400].decode("utf-8", "replace").strip()
    except (OSError, ConvaeError):  # no note (yet), or a link where it should be: say no more
        text = ""
    return clip(text, 200) or "another process"


def epoch_line(rec: EpochRecord) -> str:
    """One line per epoch and phase, e.g. ``pretrain  epoch 2/5  train_loss 0.021 ...``."""
    parts = [f"{rec['phase']:<8}", f"epoch {rec['epoch']}/{rec['epochs']}", f"train_loss {rec['train_loss']:.6f}"]
    if terms := loss_terms(rec):  # the criterion's named terms (joint training's two)
        parts.append("(" + ", ".join(f"{k} {v:.4f}" for k, v in terms.items()) + ")")
    if "val_loss" in rec:
        parts.append(f"val_loss {rec['val_loss']:.6f}")
    if "val_accuracy" in rec:
        parts.append(f"val_acc {100 * rec['val_accuracy']:.2f}%")
    parts.append(f"{rec['seconds']:.1f}s")
    parts.append(f"{rec['images_per_s']:.0f} img/s")
    return "  ".join(parts)


class TensorBoardLog:
    """Scalars and images under ``RUN/tensorboard`` when the optional ``tensorboard`` package is installed."""

    def __init__(self, run_path: Path, enabled: bool = True) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            str(run_path).encode("utf-8")
        except UnicodeEncodeError:  # TensorBoard writes its paths as UTF-8: such a run logs no events
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional extra is not installed: log nothing
            return
        self.writer = SummaryWriter(log_dir=str(refuse_links(run_path, run_path / "tensorboard")))

    def scalars(self, rec: EpochRecord) -> None:
        if self.writer is None:
            return
        step = rec["epoch"]
        terms = [f"train_{k}" for k in loss_terms(rec)]
        for key in ("train_loss", *terms, "val_loss", "val_accuracy", "images_per_s", "lr"):
            if key in rec:
                self.writer.add_scalar(f"{rec['phase']}/{key}", rec[key], step)
        self.writer.flush()

    def image(self, tag: str, image, step: int = 0) -> None:
        """``image`` (C, H, W) in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


HEARTBEAT_SECONDS = 60.0  # in a log file, a progress line at most this often


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class Heartbeat:
    """Where no progress bar is drawn (output to a file, a scheduler, CI), a line every
    ``HEARTBEAT_SECONDS`` with the step and the time left in the whole phase; on a terminal the
    bar shows the epoch and :meth:`desc` the phase's time left."""

    def __init__(self, log: Log, phase: str, epochs: int, steps: int, on: bool) -> None:
        self.log, self.phase, self.epochs, self.steps, self.on = log, phase, epochs, steps, on
        self.epoch = self.step = self.done = 0
        self.start = self.last = time.perf_counter()

    def begin(self, epoch: int, step: int) -> None:
        self.epoch, self.step = epoch, step

    def left(self) -> float | None:
        """Seconds left in the phase at this process's pace so far (None before a step)."""
        if not self.done:
            return None
        pace = (time.perf_counter() - self.start) / self.done
        return pace * ((self.epochs - self.epoch) * self.steps + self.steps - self.step)

    def desc(self) -> str:
        left = self.left()
        return f"{self.phase} {self.epoch}/{self.epochs}" + (f" (phase: {_minutes(left)} left)" if left else "")

    def __call__(self) -> None:
        self.step += 1
        self.done += 1
        now = time.perf_counter()
        if self.on and now - self.last >= HEARTBEAT_SECONDS:
            self.last = now
            self.log(
                f"{self.phase}  epoch {self.epoch}/{self.epochs}  step {self.step}/{self.steps}  "
                f"about {_minutes(self.left() or 0)} left in {self.phase}"
            )
