"""Beam search: exact against exhaustive search, deterministic, streams only settled text."""

import itertools

import numpy as np
import pytest

from rnngen.decoding.beam import BeamSearch
from rnngen.decoding.stops import stop_safe_length
from rnngen.model.config import ModelConfig
from rnngen.decoding.generation import Generation, generate
from rnngen.model.runtime import RnnModel
from rnngen.decoding.params import GenerationParams
from rnngen.model.tokenizers import CharTokenizer

from conftest import write_model


@pytest.fixture
def tiny(tmp_path):
    tok = CharTokenizer(list("abcd"))
    config = ModelConfig(cell="lstm", vocab_size=4, hidden_size=8, num_layers=1)
    return RnnModel.load(write_model(tmp_path / "tiny.onnx", config, tok, seed=5), device="cpu")


def sequence_logprob(rnn, prompt_ids, tokens):
    logits, state = rnn.run(np.array([prompt_ids]), rnn.initial_state(1))
    total = 0.0
    for t in tokens:
        x = logits[0, -1].astype(np.float64)
        total += x[t] - (x.max() + np.log(np.exp(x - x.max()).sum()))
        logits, state = rnn.run(np.array([[t]]), state)
    return total


def test_enough_beams_find_the_true_best_sequence(tiny):
    length, vocab = 4, 4
    prompt = [0]
    scores = {seq: sequence_logprob(tiny, prompt, seq) for seq in itertools.product(range(vocab), repeat=length)}
    best = max(scores, key=scores.get)
    search = BeamSearch(tiny, prompt, GenerationParams(max_new_tokens=length, num_beams=vocab ** (length - 1), num_return_sequences=3))
    list(search)
    top = search.results
    assert tuple(top[0].tokens) == best
    assert top[0].logprob == pytest.approx(scores[best], abs=1e-5)
    ranked = sorted(scores.values(), reverse=True)
    assert [h.logprob for h in top] == pytest.approx(ranked[:3], abs=1e-5)


def test_one_beam_is_greedy(tiny):
    greedy = generate(tiny, "a", GenerationParams(max_new_tokens=12, temperature=0)).text
    search = BeamSearch(tiny, tiny.tokenizer.encode("a"), GenerationParams(max_new_tokens=12, num_beams=1))
    streamed = "".join(search)
    assert search.results[0].text == greedy
    assert greedy.startswith(streamed)


def test_beam_search_is_deterministic_and_ranked(char_model_file):
    rnn = RnnModel.load(char_model_file, device="cpu")
    params = GenerationParams(max_new_tokens=40, num_beams=5, num_return_sequences=3, length_penalty=0.7)
    a, b = generate(rnn, "the ", params), generate(rnn, "the ", params)
    assert [s.text for s in a.sequences] == [s.text for s in b.sequences]
    scores = [s.beam_score for s in a.sequences]
    assert scores == sorted(scores, reverse=True)


def test_streamed_beam_text_is_a_prefix_of_every_returned_sequence(char_model_file):
    rnn = RnnModel.load(char_model_file, device="cpu")
    gen = Generation(rnn, "to be", GenerationParams(max_new_tokens=80, num_beams=4, num_return_sequences=2, stop=("e s",)))
    streamed = {0: "", 1: ""}
    first_emission_step = None
    for i, chunk in enumerate(gen):
        streamed[chunk.index] += chunk.text
        if first_emission_step is None:
            first_emission_step = i
    for seq in gen.sequences:
        assert streamed[seq.index] == seq.text
        assert "e s" not in seq.text
    assert first_emission_step is not None


def test_beam_search_streams_settled_text_before_it_ends(char_model_file):
    rnn = RnnModel.load(char_model_file, device="cpu")
    ids = rnn.tokenizer.encode("to be")
    search = BeamSearch(rnn, ids, GenerationParams(max_new_tokens=120, num_beams=3))
    deltas = []
    for delta in search:
        if not deltas:
            assert search.results == []  # the search is still running when text first comes out
        deltas.append(delta)
    assert len(deltas) > 3 and search.results
    assert search.results[0].text.startswith("".join(deltas))


def test_beam_stop_strings_end_hypotheses(char_model_file):
    rnn = RnnModel.load(char_model_file, device="cpu")
    free = generate(rnn, "the", GenerationParams(max_new_tokens=60, num_beams=3)).text
    stop = free[10:12]
    result = generate(rnn, "the", GenerationParams(max_new_tokens=60, num_beams=3, stop=(stop,), early_stopping=True))
    assert stop not in result.text
    assert result.finish_reason == "stop"
    assert result.sequences[0].tokens == len(result.text) + len(stop)  # char model: it ended right on the stop string


def test_stop_safe_length_holds_back_possible_stop_starts():
    assert stop_safe_length("hello wor", ("world",)) == 6
    assert stop_safe_length("hello", ("xyz",)) == 5
    assert stop_safe_length("ab\n", ("\n\n",)) == 2


def exhaustive_best(rnn, prompt, length, process):
    """The best sequence by summed log-probabilities of `process(logits, history)`, over every sequence."""
    best = None
    for seq in itertools.product(range(rnn.config.vocab_size), repeat=length):
        logits, state = rnn.run(np.array([prompt]), rnn.initial_state(1))
        total, history = 0.0, list(prompt)
        for t in seq:
            x = process(logits[0, -1].astype(np.float64), history)
            total += x[t] - (x.max() + np.log(np.exp(x - x.max()).sum()))
            history.append(t)
            logits, state = rnn.run(np.array([[t]]), state)
        if np.isfinite(total) and (best is None or total > best[1]):
            best = (seq, total)
    return best


def test_beams_with_a_repetition_penalty_find_the_best_penalised_sequence(tiny):
    def penalised(x, history):  # CTRL on the raw logits of tokens in prompt or output
        seen = list(set(history))
        x[seen] = np.where(x[seen] > 0, x[seen] / 1.8, x[seen] * 1.8)
        return x

    seq, total = exhaustive_best(tiny, [0], 4, penalised)
    search = BeamSearch(tiny, [0], GenerationParams(max_new_tokens=4, num_beams=64, repetition_penalty=1.8))
    list(search)
    assert tuple(search.results[0].tokens) == seq
    assert search.results[0].logprob == pytest.approx(total, abs=1e-5)


def test_beams_with_a_ban_processor_find_the_best_sequence_without_it(tiny):
    def banned(x, history):
        x[1] = -np.inf  # "b"
        return x

    seq, total = exhaustive_best(tiny, [0], 4, banned)
    gen = Generation(tiny, "a", GenerationParams(max_new_tokens=4, num_beams=27, num_return_sequences=3, processors=("ban:b",)))
    list(gen)
    assert all("b" not in s.text for s in gen.sequences)
    assert gen.sequences[0].text == tiny.tokenizer.decode(list(seq))
    assert gen.sequences[0].logprob == pytest.approx(total, abs=1e-5)


def test_beams_report_introspection_per_token(char_model_file):
    rnn = RnnModel.load(char_model_file, device="cpu")
    params = GenerationParams(max_new_tokens=12, num_beams=3, num_return_sequences=2, introspect=True,
                              top_alternatives=2, units=("l1.c[0]",))
    result = generate(rnn, "the ", params)
    for seq in result.sequences:
        assert len(seq.details) == seq.tokens
        assert "".join(d["text"] for d in seq.details) == seq.text
        assert all(len(d["top"]) == 2 and "l1.c[0]" in d["units"] for d in seq.details)
    first = result.sequences[0].details[0]  # the first token's details: the model's own view after the prompt
    plain = generate(rnn, "the ", GenerationParams(max_new_tokens=1, temperature=0, introspect=True, top_alternatives=2,
                                                   units=("l1.c[0]",))).sequences[0].details[0]
    assert first["top"] == plain["top"] and first["units"] == plain["units"] and first["entropy"] == plain["entropy"]
