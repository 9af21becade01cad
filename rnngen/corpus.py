"""Reading text corpora, with clear errors for files that cannot be trained on."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rnngen.errors import DataError, InvalidParameterError

SNIFF_BYTES = 65_536


def check_text_file(path: str | os.PathLike) -> Path:
    """The path, if it names a non-empty UTF-8 text file; otherwise a DataError saying why."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data path is not a file: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"data file is empty: {path}")
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DataError(f"data file looks binary (NUL byte at offset {nul}): {path}; rnngen trains on UTF-8 text")
    return path


def read_corpus(path: str | os.PathLike) -> str:
    path = check_text_file(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data file is not UTF-8 text (invalid byte at offset {exc.start}): {path}") from None


def split_train_val(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the end of the corpus for validation (as nanoGPT's shakespeare_char does)."""
    if not (0.0 < val_fraction < 1.0):
        raise InvalidParameterError.about("{val_fraction}: {value} is outside (0, 1)", value=val_fraction)
    n_train = int(len(ids) * (1.0 - val_fraction))
    return ids[:n_train], ids[n_train:]


def split_text_at_line(text: str, val_fraction: float) -> tuple[str, str]:
    """Hold out about the last `val_fraction` of a text, cut at the start of a line (never mid-line)."""
    if not (0.0 < val_fraction < 1.0):
        raise InvalidParameterError(f"val_fraction: {val_fraction} is outside (0, 1)")
    point = int(len(text) * (1.0 - val_fraction))
    cut = text.rfind("\n", 0, point) + 1  # the start of the line the exact point falls in
    if cut == 0:  # no line ends before the point: the next line start instead
        cut = text.find("\n", point) + 1
    if cut == 0 or cut >= len(text):
        raise DataError("the corpus has no line break to cut a validation part at; give --val-file "
                        "or a text with several lines")
    return text[:cut], text[cut:]
