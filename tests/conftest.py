"""Shared fixtures: tiny real models and corpora made in the test (nothing from ../shared)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from rnngen.model.config import ModelConfig
from rnngen.model.file import make_metadata
from rnngen.model.loop_graph import build_model, expected_weight_shapes
from rnngen.model.tokenizers import ByteTokenizer, CharTokenizer

# Keep test processes from fighting over the two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

CORPUS_LINES = [
    "the quick brown fox jumps over the lazy dog.",
    "a stitch in time saves nine, said the tailor.",
    "to be or not to be, that is the question.",
    "all that glitters is not gold; all that wander are not lost.",
]


def corpus_text(repeats: int = 40) -> str:
    return "\n".join(CORPUS_LINES[i % len(CORPUS_LINES)] for i in range(repeats * len(CORPUS_LINES))) + "\n"


def random_weights(config: ModelConfig, seed: int = 0, scale: float = 0.5) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(seed)
    return {k: (gen.standard_normal(s) * scale).astype(np.float32) for k, s in expected_weight_shapes(config).items()}


def write_model(path: Path, config: ModelConfig, tokenizer, seed: int = 0, training: dict | None = None) -> Path:
    """A real rnngen model file with random weights, built without torch."""
    meta = make_metadata(config, tokenizer, training or {"corpus": "test", "val_loss": 1.5})
    path.write_bytes(build_model(config, random_weights(config, seed), meta).SerializeToString())
    return path


def is_split_character(tokens, n):
    """Byte tokens n-1 and n are the two bytes of one UTF-8 character (a stream cut after n tokens splits it)."""
    return 0xC2 <= tokens[n - 1] <= 0xDF and 0x80 <= tokens[n] <= 0xBF


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer.from_text(corpus_text(1))


@pytest.fixture(params=["rnn", "lstm", "gru"])
def cell(request) -> str:
    return request.param


@pytest.fixture
def char_model_file(tmp_path: Path, char_tokenizer) -> Path:
    config = ModelConfig(cell="lstm", vocab_size=char_tokenizer.vocab_size, hidden_size=16, num_layers=2)
    return write_model(tmp_path / "char.onnx", config, char_tokenizer)


@pytest.fixture
def byte_model_file(tmp_path: Path) -> Path:
    config = ModelConfig(cell="gru", vocab_size=256, hidden_size=16, num_layers=1, embedding_size=8)
    return write_model(tmp_path / "byte.onnx", config, ByteTokenizer())


def invoke(*args, **kwargs):
    """The CLI run in-process, as a user would type it (every argument a string)."""
    from typer.testing import CliRunner

    from rnngen.cli import create_app

    return CliRunner().invoke(create_app(), [str(a) for a in args], **kwargs)


def one_line_error(result, needle, code=1):
    """A refusal as the CLI gives it: exit `code`, one `error:` line naming the problem, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert needle in lines[0], lines[0]
