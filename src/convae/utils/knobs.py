"""Config fields declared once: each field carries its rule, its help and its command-line group.

A knob is a dataclass field whose metadata says what a valid value is (a :class:`Rule`), what
the ``--flag`` of the same name does (``help``) and which group of flags it belongs to. The
validation, the command line, the float parsing of config files and the report's sections all
read these, so a new knob is one field in one dataclass.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Iterator
from dataclasses import Field, dataclass, field, fields
from typing import Any

from .errors import ConvaeError, short

GROUPS = ("data", "model", "pretrain", "augment", "optim", "finetune", "exec")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return is_int(v) or (isinstance(v, float) and math.isfinite(v))


class Rule:
    """What a valid value is: ``rule(name, value)`` raises :class:`ConvaeError` naming the valid range."""

    joint = ","  # before "got VALUE" in the message

    def ok(self, v: Any) -> bool:  # pragma: no cover - every rule gives its own
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, name: str, v: Any, where: str = "") -> None:
        if not self.ok(v):
            raise ConvaeError(f"{where}{name} must be {self.describe()}{self.joint} got {short(v)}")


@dataclass(frozen=True)
class Int(Rule):
    """An integer >= ``lo`` (and <= ``hi``); ``text`` replaces the stated range, ``note`` follows it."""

    lo: int = 1
    hi: int | None = None
    note: str = ""
    text: str = ""

    def ok(self, v: Any) -> bool:
        return is_int(v) and v >= self.lo and (self.hi is None or v <= self.hi)

    def describe(self) -> str:
        if self.text:
            rng = self.text
        elif self.hi is not None:
            rng = f"an integer in [{self.lo}, {self.hi}]"
        else:
            rng = "an integer > 0" if self.lo == 1 else f"an integer >= {self.lo}"
        return rng + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class Num(Rule):
    """A finite number above ``lo`` (``lo_open``: strictly; None: any) and below ``hi`` (strictly)."""

    lo: float | None = 0.0
    lo_open: bool = False
    hi: float | None = None

    def ok(self, v: Any) -> bool:
        return (
            is_num(v)
            and (self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
            and (self.hi is None or v < self.hi)
        )

    def describe(self) -> str:
        if self.lo is None:
            return "a finite number"
        if self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g})"
        return f"a number {'>' if self.lo_open else '>='} {self.lo:g} and finite"


@dataclass(frozen=True)
class Among(Rule):
    """One of a few integers, described by ``text``."""

    values: tuple[int, ...] = ()
    text: str = ""

    def ok(self, v: Any) -> bool:
        return is_int(v) and v in self.values

    def describe(self) -> str:
        return self.text


@dataclass(frozen=True)
class Choice(Rule):
    """One of a fixed tuple of names, or of a registry's names (``values`` a callable)."""

    values: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()
    joint = ";"

    def names(self) -> tuple[str, ...]:
        return tuple(self.values()) if callable(self.values) else self.values

    def ok(self, v: Any) -> bool:
        return isinstance(v, str) and v in self.names()

    def describe(self) -> str:
        return f"one of {', '.join(self.names())}"


@dataclass(frozen=True)
class Flag(Rule):
    def ok(self, v: Any) -> bool:
        return isinstance(v, bool)

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class PathRule(Rule):
    optional: bool = False

    def ok(self, v: Any) -> bool:
        return (self.optional and v is None) or (isinstance(v, str) and v != "")

    def describe(self) -> str:
        return "a path or null" if self.optional else "a non-empty path"


@dataclass(frozen=True)
class Widths(Rule):
    """A list of 1 to ``most`` integers > 0 (the conv widths)."""

    most: int = 8

    def ok(self, v: Any) -> bool:
        return isinstance(v, (list, tuple)) and 0 < len(v) <= self.most and all(is_int(c) and c > 0 for c in v)

    def describe(self) -> str:
        return f"a list of 1 to {self.most} integers > 0"


@dataclass(frozen=True)
class Optional(Rule):
    """None, or a value ``rule`` accepts."""

    rule: Rule = Flag()

    def __call__(self, name: str, v: Any, where: str = "") -> None:
        if v is not None:
            self.rule(name, v, where)


def knob(
    default: Any, rule: Rule, help: str = "", *, group: str = "", metavar: str | None = None, flag: bool = True
) -> Any:
    """A config field: its default, its rule, the help of its ``--flag`` (``flag=False``: none) and
    the group of flags it is listed with."""
    assert not group or group in GROUPS, group
    meta = {"rule": rule, "help": help, "group": group, "metavar": metavar, "flag": flag and bool(help)}
    return field(default=default, metadata=meta)


def knobs(cls: type) -> Iterator[Field]:
    """The fields of dataclass ``cls`` that are knobs (carry a rule), in declaration order."""
    return (f for f in fields(cls) if "rule" in f.metadata)


def check_all(obj: Any, where: str = "") -> None:
    """Every knob of ``obj`` against its rule."""
    for f in knobs(type(obj)):
        f.metadata["rule"](f.name, getattr(obj, f.name), where)


def check_values(cls: type, values: dict[str, Any], where: str = "") -> None:
    """The knobs of ``cls`` present in ``values`` (untrusted data) against their rules."""
    for f in knobs(cls):
        if f.name in values:
            f.metadata["rule"](f.name, values[f.name], where)


def value_type(cls: type, name: str) -> type:
    """The plain type of field ``name`` (``float`` for ``float | None``; ``tuple`` for widths)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple
    return args[0] if args and origin is not None else hint


def float_fields(cls: type) -> tuple[str, ...]:
    """Knobs that hold a number with a fraction: YAML 1.1 reads ``1e-3`` as a string, parsed back."""
    return tuple(f.name for f in knobs(cls) if value_type(cls, f.name) is float)


def group_fields(cls: type, group: str) -> list[str]:
    return [f.name for f in knobs(cls) if f.metadata["group"] == group]
