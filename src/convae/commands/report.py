"""``convae report``: ``report.html`` written again from a run folder's files."""

from __future__ import annotations

from pathlib import Path

from ..outputs.report import write_report
from ..outputs.rundir import locked
from ..utils.errors import ConvaeError
from ..utils.records import Log


def main(run_dir: str, log: Log) -> Path:
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise ConvaeError(f"{run} is not a convae run folder (no config.json)")
    with locked(run, "writing the report"):
        path = write_report(run)
    log(f"wrote {path}")
    return path
