"""``convae cache list|clean``: what the decoded-source cache holds, and removing what no run reads again."""

from __future__ import annotations

from pathlib import Path

from ..data.inventory import entries, human, in_use, remove
from ..utils.errors import ConvaeError
from ..utils.records import Log


def main(action: str, cache_dir: str, everything: bool, log: Log) -> int:
    """``convae cache list``: what the cache holds, with sizes; ``clean``: remove what no run reads
    again (older formats, stopped decodes; ``everything``: all of it). Returns the bytes freed."""
    root = Path(cache_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise ConvaeError(f"the cache folder {root} is not a folder", advice="pass the folder with --cache-dir")
    found = entries(root)
    if action == "list":
        for e in found:
            images = f"{e.images} images" if e.images is not None else ""
            log(f"{human(e.bytes):>10}  {e.kind:<18}  {e.state:<16}  {images:>14}  {e.path}")
        stale = [e for e in found if e.stale]
        log(
            f"{human(sum(e.bytes for e in found))} in {len(found)} entries under {root}"
            + (
                f"; 'convae cache clean' removes the {len(stale)} stale one(s), {human(sum(e.bytes for e in stale))}"
                if stale
                else ""
            )
        )
        return 0
    freed = 0
    for e in found:
        if not (everything or e.stale):
            continue
        if in_use(e):
            log(f"kept {e.path}: a process is writing it now")
            continue
        if not remove(e):
            log(f"{e.path} was removed meanwhile by another process")
            continue
        freed += e.bytes
        log(f"removed {e.path} ({human(e.bytes)})")
    log(f"freed {human(freed)} under {root}")
    return freed
