"""Scoring in constant memory gives the same number as one call over the whole text."""

import math

import numpy as np
import pytest

import rnngen.scoring as scoring
from rnngen.errors import DataError, TokenizerError
from rnngen.model.runtime import RnnModel
from rnngen.scoring import score_file


def direct_nll(rnn, text):
    ids = rnn.tokenizer.start_ids()[-1:] + rnn.tokenizer.encode(text)
    logits, _ = rnn.run(np.array([ids[:-1]]), rnn.initial_state(1))
    x = logits[0].astype(np.float64)
    lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    return float((lse - x[np.arange(len(ids) - 1), ids[1:]]).sum())


def test_score_matches_direct_computation_and_ignores_segmenting(char_model_file, tmp_path, monkeypatch):
    rnn = RnnModel.load(char_model_file, device="cpu")
    text = "the quick brown fox.\nto be or not to be.\n" * 30
    path = tmp_path / "t.txt"
    path.write_text(text)
    want = direct_nll(rnn, text)
    big = score_file(rnn, path)
    monkeypatch.setattr(scoring, "READ_CHARS", 37)  # many pieces, split mid-line
    small = score_file(rnn, path, segment_tokens=7)
    assert big.tokens == small.tokens == len(text) == big.chars
    assert big.nats == pytest.approx(want, rel=1e-6)
    assert small.nats == pytest.approx(want, rel=1e-6)
    assert big.bits_per_char == pytest.approx(want / len(text) / math.log(2), rel=1e-6)
    assert big.perplexity == pytest.approx(math.exp(want / len(text)), rel=1e-6)


def test_byte_model_reports_per_token_and_per_char(byte_model_file, tmp_path):
    rnn = RnnModel.load(byte_model_file, device="cpu")
    path = tmp_path / "u.txt"
    path.write_text("ünïcödé " * 10, encoding="utf-8")
    result = score_file(rnn, path)
    assert result.chars == 80 and result.tokens == len(("ünïcödé " * 10).encode())
    assert result.nats_per_char == pytest.approx(result.nats / 80)


def test_score_errors(char_model_file, tmp_path):
    rnn = RnnModel.load(char_model_file, device="cpu")
    with pytest.raises(DataError, match="not found"):
        score_file(rnn, tmp_path / "missing.txt")
    (tmp_path / "q.txt").write_text("QQQ")
    with pytest.raises(TokenizerError, match="'Q'"):
        score_file(rnn, tmp_path / "q.txt")
    (tmp_path / "bad.txt").write_bytes(b"abc \xff\xfe def")
    with pytest.raises(DataError, match="not UTF-8"):
        score_file(rnn, tmp_path / "bad.txt")
