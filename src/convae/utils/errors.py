"""The exceptions convae raises on purpose: user mistakes and a clean stop on a signal."""

from __future__ import annotations


class ConvaeError(Exception):
    """Bad input, bad config or a mismatched checkpoint: a user mistake, not a bug.

    ``str(e)`` describes the problem in library terms; ``advice`` (optional) names the
    command-line flag that fixes it, and the CLI prints both on one line.
    """

    def __init__(self, message: str, advice: str | None = None) -> None:
        super().__init__(message)
        self.advice = advice


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM; ``signum`` says which. ``resumable``: the state was saved
    and ``--resume`` continues (a sweep is not resumable: it stops where it is)."""

    def __init__(self, signum: int | None, where: str, run_path: str, resumable: bool = True) -> None:
        super().__init__(where)
        self.signum, self.where, self.run_path, self.resumable = signum, where, run_path, resumable


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first line (its type name when it has no message), for one-line reports."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def clip(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters: untrusted input never makes an error line unbounded."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(v: object, limit: int = 60) -> str:
    """``repr(v)`` cut to ``limit`` characters, for error messages about untrusted values; built with
    bounded depth and length (``reprlib``), so a huge or deeply shared value (a YAML alias bomb)
    costs no more to describe than a small one."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 3, limit, limit, limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 8
    return clip(r.repr(v), limit)
