"""Generation from a prompt on real onnxruntime sessions: samples, stop strings, streaming. No torch."""

import numpy as np
import pytest

from rnngen.decoding.stops import StopStringFilter
from rnngen.errors import InvalidParameterError, TokenizerError
from rnngen.decoding.generation import Generation, generate, stream_text
from rnngen.model.runtime import RnnModel
from rnngen.decoding.params import GenerationParams


@pytest.fixture
def rnn(char_model_file):
    return RnnModel.load(char_model_file, device="cpu")


@pytest.mark.parametrize("field,value,needle", [
    ("temperature", -0.1, "temperature: -0.1 is outside [0, 100]"),
    ("temperature", float("nan"), "temperature: nan is not a number in [0, 100]"),
    ("temperature", float("inf"), "temperature: inf"),
    ("top_p", 0.0, "top_p: 0.0 is outside (0, 1]"),
    ("top_p", 1.5, "top_p: 1.5 is outside (0, 1]"),
    ("top_k", -1, "top_k: -1 is outside [0, 10000000]"),
    ("min_p", 2.0, "min_p: 2.0 is outside [0, 1]"),
    ("repetition_penalty", 0.0, "repetition_penalty: 0.0 is outside (0, 10]"),
    ("presence_penalty", 3.0, "presence_penalty: 3.0 is outside [-2, 2]"),
    ("frequency_penalty", float("-inf"), "frequency_penalty: -inf"),
    ("no_repeat_ngram_size", -1, "no_repeat_ngram_size: -1"),
    ("max_new_tokens", 0, "max_new_tokens: 0 is outside [1, 100000000]"),
    ("max_new_tokens", 2.5, "max_new_tokens: 2.5 is not an integer in [1, 100000000]"),
    ("seed", -5, "seed: -5"),
    ("stop", ("",), "stop: '' is not a non-empty string"),
    ("stop", tuple("abcdefghijklmnopq"), "stop: 17 strings given, at most 16"),
    ("on_unknown", "drop", "on_unknown: 'drop'"),
    ("n", 0, "n: 0 is outside [1, 256]"),
    ("num_beams", 65, "num_beams: 65 is outside [1, 64]"),
    ("length_penalty", float("nan"), "length_penalty: nan"),
    ("early_stopping", "yes", "early_stopping: 'yes' is not true or false"),
    ("num_return_sequences", 2, "num_return_sequences: 2 is more than num_beams (1); for several samples use n"),
])
def test_invalid_generation_parameters(field, value, needle):
    with pytest.raises(InvalidParameterError) as err:
        GenerationParams(**{field: value})
    assert needle in str(err.value)


def test_samples_and_beams_do_not_mix():
    with pytest.raises(InvalidParameterError, match="cannot be combined with beam search"):
        GenerationParams(n=2, num_beams=3)


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


def test_generation_is_deterministic_per_seed(rnn):
    a = generate(rnn, "the ", GenerationParams(max_new_tokens=60, seed=7))
    b = generate(rnn, "the ", GenerationParams(max_new_tokens=60, seed=7))
    c = generate(rnn, "the ", GenerationParams(max_new_tokens=60, seed=8))
    assert a.text == b.text and len(a.text) == 60
    assert a.text != c.text
    assert a.finish_reason == "length" and a.new_tokens == 60 and a.prompt_tokens == 4


def test_prompt_is_one_prefill_then_one_step_per_token(rnn):
    calls = []
    real_prefill, real_step = rnn.prefill, rnn.step_bound
    rnn.prefill = lambda ids: calls.append(("prefill", len(ids))) or real_prefill(ids)
    rnn.step_bound = lambda binding, *a: calls.append("step") or real_step(binding, *a)
    for other in ("run", "step", "step_sample"):  # any other model call would be noted too
        setattr(rnn, other, lambda *a, name=other: calls.append(name))
    generate(rnn, "to be or not", GenerationParams(max_new_tokens=10, seed=1))
    assert calls == [("prefill", 12)] + ["step"] * 9  # no model call after the last token


def test_greedy_generation_follows_the_argmax_path(rnn):
    result = generate(rnn, "a", GenerationParams(max_new_tokens=8, temperature=0))
    ids = rnn.tokenizer.encode("a")
    logits, state = rnn.run(np.array([ids]), rnn.initial_state(1))
    expected = []
    for _ in range(8):
        expected.append(int(np.argmax(logits[0, -1])))
        logits, state = rnn.run(np.array([[expected[-1]]]), state)
    assert result.text == rnn.tokenizer.decode(expected)


def test_stop_string_ends_generation(rnn):
    free = generate(rnn, "", GenerationParams(max_new_tokens=200, seed=3)).text
    stop = free[20:22]
    cut = free.index(stop)
    result = generate(rnn, "", GenerationParams(max_new_tokens=200, seed=3, stop=(stop,)))
    assert result.text == free[:cut]
    assert result.finish_reason == "stop"
    assert result.sequences[0].tokens == cut + len(stop)


def test_several_samples_each_returned_and_reproducible(rnn):
    params = GenerationParams(max_new_tokens=40, seed=5, n=3)
    result = generate(rnn, "the ", params)
    assert [s.index for s in result.sequences] == [0, 1, 2]
    assert len({s.text for s in result.sequences}) == 3
    assert all(s.tokens == 40 and s.logprob < 0 for s in result.sequences)
    # Sample 0 of n = 3 is the same text as the single sample with that seed.
    assert generate(rnn, "the ", GenerationParams(max_new_tokens=40, seed=5)).text == result.sequences[0].text


def test_stream_chunks_add_up_to_each_sequence(rnn):
    gen = Generation(rnn, "the ", GenerationParams(max_new_tokens=50, seed=2, n=2, stop=("e t",)))
    texts = {0: "", 1: ""}
    for chunk in gen:
        texts[chunk.index] += chunk.text
    assert texts == {s.index: s.text for s in gen.sequences}
    assert "".join(stream_text(rnn, "the ", GenerationParams(max_new_tokens=50, seed=2, n=2, stop=("e t",)))) == texts[0]


def test_unknown_prompt_characters(rnn):
    with pytest.raises(TokenizerError, match="'Z'"):
        Generation(rnn, "Zebra", GenerationParams(max_new_tokens=5))
    result = generate(rnn, "Zebra", GenerationParams(max_new_tokens=5, on_unknown="replace", seed=0))
    assert result.prompt_tokens == 5 and result.new_tokens == 5


def test_top_k_larger_than_vocab_is_refused(rnn):
    with pytest.raises(InvalidParameterError, match="larger than the model's vocabulary"):
        Generation(rnn, "a", GenerationParams(top_k=10_000))


def test_byte_model_streams_only_whole_characters(byte_model_file):
    rnn = RnnModel.load(byte_model_file, device="cpu")
    gen = Generation(rnn, "héllo 東京", GenerationParams(max_new_tokens=400, seed=11, temperature=1.5))
    pieces = [c.text for c in gen]
    assert "".join(pieces) == gen.sequences[0].text
    for piece in pieces:
        piece.encode("utf-8")  # each piece is valid text on its own: no half characters, no surrogates
    multi_byte = [ch for ch in gen.sequences[0].text if len(ch.encode("utf-8")) > 1]
    assert multi_byte, "the test should see some multi-byte output from a random byte model"
