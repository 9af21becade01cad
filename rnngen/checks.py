"""Checks of what users give: parameter ranges (each worded one way wherever checked) and output files.

A refusal is an InvalidParameterError whose message names the parameter, so
each door (CLI, gRPC, Python) spells it in its own words:
"{top_p}: 1.5 is outside (0, 1]", "{top_p}: nan is not a number in (0, 1]".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

from rnngen.errors import InvalidParameterError, OverwriteRefusedError


def check_int(name: str, value: object, lo: int, hi: int) -> None:
    """`value` is an int (not a bool) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError.about(f"{{{name}}}: {{value!r}} is not an integer in [{lo}, {hi}]", value=value)
    if not lo <= value <= hi:
        raise InvalidParameterError.about(f"{{{name}}}: {{value!r}} is outside [{lo}, {hi}]", value=value)


def check_number(name: str, value: object, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
    """`value` is a finite int or float in the interval from lo to hi (each end open or closed)."""
    interval = f"{'(' if lo_open else '['}{_bound(lo)}, {_bound(hi)}{')' if hi_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameterError.about(f"{{{name}}}: {{value!r}} is not a number in {interval}", value=value)
    if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
        raise InvalidParameterError.about(f"{{{name}}}: {{value!r}} is outside {interval}", value=value)


def check_choice(name: str, value: object, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise InvalidParameterError.about(f"{{{name}}}: {{value!r}} is not one of {{choices}}", value=value,
                                          choices=", ".join(choices))


def _bound(x: float) -> str:
    """1.0 -> "1", 1e6 -> "1000000", 0.9 -> "0.9": a range reads the same whatever types bound it."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def check_output_file(path: Path, *, force: bool) -> None:
    """`path` can be written as a file: not a directory, in a directory that exists, replaced only with `force`."""
    if path.is_dir():
        raise OverwriteRefusedError(f"{path} is a directory; give a file name in it, such as {path / 'model.onnx'}")
    if path.exists() and not force:
        raise OverwriteRefusedError(f"{path} already exists; use --force to replace it")
    if not path.parent.is_dir():
        raise OverwriteRefusedError(f"{path}: the directory {path.parent} does not exist; create it first")
