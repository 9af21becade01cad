"""Sampling, stop strings and streaming generation on real onnxruntime sessions. No torch."""

import math

import numpy as np
import pytest

from rnngen.errors import InvalidParameterError, TokenizerError
from rnngen.generation import StopStringFilter, TextStream, generate
from rnngen.runtime import RnnModel
from rnngen.sampling import GenerationParams, next_token_distribution, sample_token


def probs(logits, **kw):
    return next_token_distribution(np.array(logits, dtype=np.float32), GenerationParams(**kw))


def test_temperature_scales_logits():
    logits = [1.0, 2.0, 3.0]
    p = probs(logits, temperature=0.5)
    e = np.exp(np.array(logits) / 0.5)
    np.testing.assert_allclose(p, e / e.sum())


def test_top_k_keeps_the_k_largest():
    p = probs([0.0, 3.0, 1.0, 2.0], temperature=1.0, top_k=2)
    e = np.exp([3.0, 2.0])
    np.testing.assert_allclose(p, [0, e[0] / e.sum(), 0, e[1] / e.sum()])


def test_top_p_keeps_smallest_set_reaching_p():
    base = np.log([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(probs(base, temperature=1.0, top_p=0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=1e-12)
    np.testing.assert_allclose(probs(base, temperature=1.0, top_p=0.8), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=1e-6)
    np.testing.assert_allclose(probs(base, temperature=1.0, top_p=0.1), [1, 0, 0, 0], atol=1e-12)


def test_top_k_then_top_p_in_that_order():
    base = np.log([0.4, 0.3, 0.2, 0.1])
    # top-k 3 renormalises to 4/9, 3/9, 2/9; top-p 0.7 then keeps the first two (7/9 >= 0.7).
    np.testing.assert_allclose(probs(base, temperature=1.0, top_k=3, top_p=0.7), [4 / 7, 3 / 7, 0, 0], atol=1e-6)


def test_greedy_is_argmax_and_sampling_follows_probabilities():
    rng = np.random.default_rng(0)
    logits = np.array([0.1, 2.0, 0.3], dtype=np.float32)
    assert sample_token(logits, GenerationParams(temperature=0), rng) == 1
    params = GenerationParams(temperature=1.0)
    counts = np.bincount([sample_token(logits, params, rng) for _ in range(6000)], minlength=3) / 6000
    np.testing.assert_allclose(counts, next_token_distribution(logits, params), atol=0.03)


@pytest.mark.parametrize("field,value,needle", [
    ("temperature", -0.1, "temperature: -0.1 is not a finite number in [0.0, 100.0]"),
    ("temperature", float("nan"), "temperature: nan"),
    ("temperature", float("inf"), "temperature: inf"),
    ("top_p", 0.0, "top_p: 0.0 is outside (0, 1]"),
    ("top_p", 1.5, "top_p: 1.5"),
    ("top_k", -1, "top_k: -1 is not an integer"),
    ("max_new_tokens", 0, "max_new_tokens: 0 is not an integer in [1, 100000000]"),
    ("seed", -5, "seed: -5"),
    ("stop", ("",), "stop: '' is not a non-empty string"),
    ("on_unknown", "drop", "on_unknown: 'drop'"),
])
def test_invalid_generation_parameters(field, value, needle):
    with pytest.raises(InvalidParameterError) as err:
        GenerationParams(**{field: value})
    assert needle in str(err.value)


def feed(filter_, chunks):
    out = [filter_.push(c) for c in chunks]
    out.append(filter_.flush())
    return out


def test_stop_string_inside_one_chunk():
    f = StopStringFilter(("END",))
    assert "".join(feed(f, ["hello END world"])) == "hello "
    assert f.stopped


def test_stop_string_straddling_chunks_never_leaks():
    f = StopStringFilter(("\n\n", "STOP"))
    out = feed(f, ["ab", "cS", "T", "O", "Px", "yz"])
    assert "".join(out) == "abc"
    assert not any("S" in piece for piece in out)
    assert f.stopped


def test_partial_match_that_fails_is_released():
    f = StopStringFilter(("STOP",))
    out = feed(f, ["abS", "T", "Ox"])
    assert "".join(out) == "abSTOx"
    assert out[0] == "ab"  # 'S' held back until it is known not to start STOP
    assert not f.stopped


def test_generation_is_deterministic_per_seed(char_model_file):
    rnn = RnnModel.load(char_model_file, device="cpu")
    a = generate(rnn, "the ", GenerationParams(max_new_tokens=60, seed=7))
    b = generate(rnn, "the ", GenerationParams(max_new_tokens=60, seed=7))
    c = generate(rnn, "the ", GenerationParams(max_new_tokens=60, seed=8))
    assert a.text == b.text and len(a.text) == 60
    assert a.text != c.text
    assert a.finish_reason == "length" and a.new_tokens == 60 and a.prompt_tokens == 4


def test_prompt_is_one_call_then_one_step_per_token(char_model_file):
    rnn = RnnModel.load(char_model_file, device="cpu")
    calls = []
    real_run = rnn.run

    def counting(tokens, state):
        calls.append(tokens.shape)
        return real_run(tokens, state)
    rnn.run = counting
    generate(rnn, "to be or not", GenerationParams(max_new_tokens=10, seed=1))
    assert calls == [(1, 12)] + [(1, 1)] * 9  # no model call after the last token


def test_greedy_generation_follows_the_argmax_path(char_model_file):
    rnn = RnnModel.load(char_model_file, device="cpu")
    result = generate(rnn, "a", GenerationParams(max_new_tokens=8, temperature=0))
    ids = rnn.tokenizer.encode("a")
    state = rnn.initial_state(1)
    expected = []
    for _ in range(8):
        logits, state = rnn.run(np.array([ids[-1:]] if expected else [ids]), state)
        ids.append(int(np.argmax(logits[0, -1])))
        expected.append(ids[-1])
    assert result.text == rnn.tokenizer.decode(expected)


def test_stop_string_ends_generation(char_model_file):
    rnn = RnnModel.load(char_model_file, device="cpu")
    free = generate(rnn, "", GenerationParams(max_new_tokens=200, seed=3)).text
    stop = free[20:22]
    cut = free.index(stop)
    result = generate(rnn, "", GenerationParams(max_new_tokens=200, seed=3, stop=(stop,)))
    assert result.text == free[:cut]
    assert result.finish_reason == "stop"


def test_unknown_prompt_characters(char_model_file):
    rnn = RnnModel.load(char_model_file, device="cpu")
    with pytest.raises(TokenizerError, match="'Z'"):
        TextStream(rnn, "Zebra", GenerationParams(max_new_tokens=5))
    result = generate(rnn, "Zebra", GenerationParams(max_new_tokens=5, on_unknown="replace", seed=0))
    assert result.prompt_tokens == 5 and result.new_tokens == 5


def test_top_k_larger_than_vocab_is_refused(char_model_file):
    rnn = RnnModel.load(char_model_file, device="cpu")
    with pytest.raises(InvalidParameterError, match="larger than the model's vocabulary"):
        TextStream(rnn, "a", GenerationParams(top_k=10_000))


def test_byte_model_streams_only_whole_characters(byte_model_file):
    rnn = RnnModel.load(byte_model_file, device="cpu")
    stream = TextStream(rnn, "héllo 東京", GenerationParams(max_new_tokens=300, seed=11, temperature=1.5))
    pieces = list(stream)
    ids = []
    # Re-run the same seed recording ids, then check the pieces decode exactly as the bytes do.
    rng = np.random.default_rng(11)
    logits, state = rnn.run(np.array([rnn.tokenizer.encode("héllo 東京")]), rnn.initial_state(1))
    for i in range(300):
        ids.append(sample_token(logits[0, -1], stream.params, rng))
        if i < 299:
            logits, state = rnn.run(np.array([[ids[-1]]]), state)
    assert "".join(pieces) == bytes(ids).decode("utf-8", errors="replace")
    for piece in pieces:
        piece.encode("utf-8")  # every piece is valid text on its own (no surrogates, no half characters)
