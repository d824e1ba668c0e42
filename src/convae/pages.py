"""The report's page parts: its style sheet, inlined figures, tables, and the run folder's files
read as untrusted (a file may be truncated, edited, or planted as a link)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .errors import ConvaeError, clip, first_line
from .files import read_file

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1320px; padding: 0 1.5em; color: #222;
       line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
figure { display: inline-block; margin: .4em 1em .4em 0; vertical-align: top; max-width: 100%; }
figure img { width: 600px; max-width: 100%; border: 1px solid #eee; } figcaption { font-size: .85em; color: #555; }
figure.small img { width: 400px; } figure.native img { width: auto; }
.warn { background: #fff4d6; border-left: 4px solid #e0a800; padding: .4em .8em; }
.note { color: #555; font-size: .9em; } .big { font-size: 1.3em; font-weight: 600; }
"""


def img(path: Path, caption: str, size: str = "") -> str:
    """An inlined figure; ``size`` is "small" (kernel grids), "" (600 px) or "native" (drawn at its own
    size, never scaled down: many small numbers or thumbnails)."""
    if not path.is_file():
        return ""
    data = base64.b64encode(read_file(path, path.parent.parent)).decode()  # never through a link
    return (f'<figure class="{size}"><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def table(headers: list[str], rows: list[list], table_id: str = "", left: int = 1, text: tuple[int, ...] = ()) -> str:
    """Numbers right-aligned; the first ``left`` columns and the ``text`` columns left-aligned."""
    attr = f' id="{table_id}"' if table_id else ""
    cls = lambda i: "l" if i < left or i in text else ""  # noqa: E731
    head = "".join(f'<th class="{cls(i)}">{html.escape(str(h))}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td class="{cls(i)}">{html.escape(str(c))}</td>' for i, c in enumerate(r))
        + "</tr>" for r in rows)
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def pct(v) -> str:
    return "" if v is None else f"{100 * v:.2f} %"


def read_json(path: Path) -> dict | None:
    """A run-folder JSON file (untrusted: it may be truncated, edited or from another tool)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(read_file(path).decode("utf-8"))
    except (ValueError, OSError) as e:
        raise ConvaeError(f"{path} is not readable JSON ({clip(first_line(e), 80)})") from None
    if not isinstance(data, dict):
        raise ConvaeError(f"{path} is not a convae file (it holds a {type(data).__name__}, not a mapping)")
    return data


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(read_file(path).decode("utf-8", "replace").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            raise ConvaeError(f"{path} line {n} is not JSON (a damaged metrics file)") from None
        if row is not None:
            if not isinstance(row, dict):
                raise ConvaeError(f"{path} line {n} is not a metrics record")
            rows.append(row)
    return rows
