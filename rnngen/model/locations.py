"""Where named models are found: the one place that reads RNNGEN_MODEL_DIRS.

`--model lstm` means `lstm.onnx` in the folders of RNNGEN_MODEL_DIRS (joined
with ':' as in PATH), then in ./exported; `rnngen serve --model-dir` takes the
same variable as its default.
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_DIRS_ENV = "RNNGEN_MODEL_DIRS"
DEFAULT_MODEL_DIR = Path("exported")


def split_dirs(entries: list[str] | tuple[str, ...]) -> list[Path]:
    """Folders from entries that may each hold several joined with os.pathsep."""
    return [Path(d) for entry in entries for d in entry.split(os.pathsep) if d]


def model_dirs() -> list[Path]:
    """The folders searched for a model name, in order."""
    return split_dirs([os.environ.get(MODEL_DIRS_ENV, "")]) + [DEFAULT_MODEL_DIR]


def models_in(folders: list[Path]) -> list[Path]:
    """Every .onnx file in the folders that exist, sorted within each folder."""
    return [path for folder in folders if folder.is_dir() for path in sorted(folder.glob("*.onnx"))]


def find_named_model(name: str) -> Path | None:
    for folder in model_dirs():
        candidate = folder / f"{name}.onnx"
        if candidate.is_file():
            return candidate
    return None
