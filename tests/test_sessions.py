"""Exact sessions: N tokens, a snapshot through a session token, then M more == N+M uninterrupted."""

import hashlib
import hmac
import json
import struct

import numpy as np
import pytest

from rnngen.decoding.engine import DecodeEngine, resume
from rnngen.decoding.params import GenerationParams
from rnngen.decoding.rows import HISTORY_WINDOW, Row, row_generator
from rnngen.errors import SessionTokenError
from rnngen.model.runtime import RnnModel
from rnngen.model.config import ModelConfig
from rnngen.model.tokenizers import ByteTokenizer, CharTokenizer
from rnngen.serving.sessions import MAGIC, SessionCodec

from conftest import corpus_text, is_split_character, write_model

SECRET = b"test-secret-0123456789abcdef"
NEVER = "#"  # not in the char test vocabulary: a stop string ending in it never completes, but its start is held back

# Every parameter that carries state from one token to the next, alone and together.
COMBINATIONS = {
    "temperature": dict(temperature=0.9),
    "greedy": dict(temperature=0.0),
    "top_k_top_p_min_p": dict(temperature=1.1, top_k=6, top_p=0.9, min_p=0.02),
    "repetition": dict(temperature=0.9, repetition_penalty=1.4),
    "presence": dict(temperature=0.9, presence_penalty=0.9),
    "frequency": dict(temperature=0.9, frequency_penalty=0.7),
    "ngram": dict(temperature=0.9, no_repeat_ngram_size=2),
    "stop": dict(temperature=0.9, stop=("th" + NEVER,)),
    "processors": dict(temperature=0.9, processors=("ban:xyz",)),
    "all": dict(temperature=1.0, top_k=8, top_p=0.95, repetition_penalty=1.2, presence_penalty=0.3,
                frequency_penalty=0.2, no_repeat_ngram_size=3, stop=("th" + NEVER,), processors=("ban:q",)),
}
TOTAL = 70


def decode(model, params, prompt_ids=None, snapshot=None, capture=False):
    """One row decoded alone to its end: the row, its tokens and its streamed text."""
    engine = DecodeEngine(model)
    if snapshot is None:
        row = Row.start(params, row_generator(params.seed, 0), model.tokenizer, prompt_ids)
        logits, state = engine.prefill(prompt_ids)
    else:
        row, logits, state = resume(model, snapshot, params)
    row.capture_state = capture
    engine.add([row], logits, state)
    tokens, text = [], ""
    while len(engine):
        for update in engine.step():
            assert update.error is None
            tokens.append(update.token)
            text += update.text
    return row, tokens, text


def split_point(model, tokens):
    """Where to interrupt: in the middle of a byte model's two-byte character, else at 20."""
    if model.tokenizer.kind == "byte":
        return next((n for n in range(15, len(tokens) - 10) if is_split_character(tokens, n)), None)
    return 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The char (LSTM) and byte (GRU) test models, loaded once for the many combinations."""
    folder = tmp_path_factory.mktemp("models")
    char = CharTokenizer.from_text(corpus_text(1))
    char_file = write_model(folder / "char.onnx", ModelConfig(cell="lstm", vocab_size=char.vocab_size, hidden_size=16,
                                                               num_layers=2), char)
    byte_file = write_model(folder / "byte.onnx", ModelConfig(cell="gru", vocab_size=256, hidden_size=16, num_layers=1,
                                                               embedding_size=8), ByteTokenizer())
    return {"char": RnnModel.load(char_file, device="cpu"), "byte": RnnModel.load(byte_file, device="cpu")}


@pytest.mark.parametrize("name", list(COMBINATIONS))
@pytest.mark.parametrize("kind", ["char", "byte"])
def test_resumed_session_is_the_uninterrupted_run(kind, name, models):
    model = models[kind]
    codec = SessionCodec(SECRET)
    prompt_ids = model.tokenizer.encode("to be or not to be, the question" * 40)  # longer than the window
    params = GenerationParams(seed=7, **COMBINATIONS[name])

    def limited(count):
        return GenerationParams(**{**params.to_dict(), "max_new_tokens": count})

    whole_row, whole_tokens, whole_text = decode(model, limited(TOTAL), prompt_ids)
    n = split_point(model, whole_tokens)
    if name == "greedy" and n is None:  # the random byte model's greedy text has no two-byte character
        n = 20
    assert n is not None, "the test needs a point with an unfinished character"
    if params.stop and kind == "char":  # a stop string that begins with the last character before the split
        held = model.tokenizer.decode([whole_tokens[n - 1]])  # is held back there (it never completes)
        params = GenerationParams(**{**params.to_dict(), "stop": (held + NEVER, *params.stop)})
        whole_row, whole_tokens, whole_text = decode(model, limited(TOTAL), prompt_ids)

    first_row, first_tokens, first_text = decode(model, limited(n), prompt_ids, capture=True)
    snapshot = first_row.snapshot()
    if kind == "byte" and is_split_character(whole_tokens, n):
        assert snapshot.decoder_pending
    if params.stop and kind == "char":
        assert snapshot.stop_pending
    token = codec.encode("model", snapshot, model.state_names)
    restored = codec.decode(token, "model", model.state_names)
    rest_row, rest_tokens, rest_text = decode(model, limited(TOTAL - n), snapshot=restored)

    assert first_tokens + rest_tokens == whole_tokens
    assert first_text + rest_text == whole_text
    assert rest_row.logprob == whole_row.logprob  # the same sums in the same order: bit for bit
    assert rest_row.generated_before + rest_row.count == TOTAL


def test_snapshot_holds_the_whole_history_bounded_by_the_vocabulary(models):
    """The seen set covers a prompt longer than the window; counts cover every generated token."""
    model = models["char"]
    tok = model.tokenizer
    prompt_ids = tok.encode("q" + "to be " * 400)  # 'q' only at the very start, far outside the window
    params = GenerationParams(seed=1, max_new_tokens=300, repetition_penalty=1.3, presence_penalty=0.5)
    row, tokens, _ = decode(model, params, prompt_ids, capture=True)
    snapshot = row.snapshot()
    assert tok.encode("q")[0] in snapshot.seen
    assert len(snapshot.seen) <= tok.vocab_size and len(snapshot.counts) <= tok.vocab_size
    assert snapshot.counts == {t: tokens.count(t) for t in set(tokens)}
    assert snapshot.window == (prompt_ids + tokens)[-len(snapshot.window):] and len(snapshot.window) == HISTORY_WINDOW


def test_an_older_token_format_is_refused_with_a_clear_error():
    codec = SessionCodec(SECRET)
    head = json.dumps({"model": "m"}).encode()
    data = MAGIC + bytes([1]) + struct.pack(">I", len(head)) + head
    old = data + hmac.new(SECRET, data, hashlib.sha256).digest()  # a version-1 token, correctly signed
    with pytest.raises(SessionTokenError, match="token format 1 is from another rnngen version .* start a new stream"):
        codec.decode(old, "m", ("h",))


def test_a_row_without_capture_cannot_be_snapshotted(models):
    model = models["char"]
    row, _, _ = decode(model, GenerationParams(seed=1, max_new_tokens=3), [1, 2])
    with pytest.raises(ValueError, match="capture_state"):
        row.snapshot()
    assert np.isfinite(row.logprob)
