"""Generation parameters: one type, validated once where a request enters (CLI, API, server).

Errors name the field, the value and the allowed range. The decoding engine
trusts a GenerationParams it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from rnngen.errors import InvalidParameterError
from rnngen.model.tokenizers import UNKNOWN_POLICIES

MAX_NEW_TOKENS_LIMIT = 100_000_000  # state is fixed-size, so long streams are fine
MAX_STOP_STRINGS = 16
MAX_SEED = 2**63 - 1
MAX_SAMPLES = 256
MAX_BEAMS = 64
MAX_PROCESSORS = 16
MAX_ALTERNATIVES = 50
MAX_UNITS = 64
DEFAULT_MAX_PROMPT_TOKENS = 1_000_000  # prompts prefill in constant memory; the limit bounds their time


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 500  # tokens to generate after the prompt
    temperature: float = 0.8  # softmax temperature; 0 means greedy (always the most likely token)
    top_k: int = 0  # keep only the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1 keeps all
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one; 0 keeps all
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the text (CTRL); 1 is off
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence in the generated text
    no_repeat_ngram_size: int = 0  # never repeat an n-gram of this size; 0 is off
    seed: int | None = None  # same seed, same text; None draws a fresh one
    stop: tuple[str, ...] = field(default_factory=tuple)  # generation ends before any of these strings
    processors: tuple[str, ...] = field(default_factory=tuple)  # logits processors "NAME[:ARGUMENT]" (names checked when built)
    on_unknown: str = "error"  # prompt characters outside the vocabulary: error, replace or skip
    n: int = 1  # independent samples of the same prompt (sampling only)
    num_beams: int = 1  # beam search when > 1 (deterministic; ignores temperature, top-k/p, min-p)
    length_penalty: float = 1.0  # beam score = log-probability / length ** length_penalty
    early_stopping: bool = False  # beam search ends as soon as num_beams hypotheses have finished
    num_return_sequences: int = 1  # beam search: how many of the best hypotheses to return
    introspect: bool = False  # per token: the top alternatives, the entropy and the selected units
    top_alternatives: int = 5  # with introspect: how many of the most likely tokens to list
    units: tuple[str, ...] = field(default_factory=tuple)  # with introspect: state units such as "l1.c[42]"

    def __post_init__(self) -> None:
        _int_in("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS_LIMIT)
        _float_in("temperature", self.temperature, 0.0, 100.0)
        _int_in("top_k", self.top_k, 0, 10_000_000)
        _float_in("top_p", self.top_p, 0.0, 1.0)
        if self.top_p <= 0.0:
            raise InvalidParameterError(f"top_p: {self.top_p} is outside (0, 1]")
        _float_in("min_p", self.min_p, 0.0, 1.0)
        _float_in("repetition_penalty", self.repetition_penalty, 0.0, 10.0)
        if self.repetition_penalty <= 0.0:
            raise InvalidParameterError(f"repetition_penalty: {self.repetition_penalty} is outside (0, 10]")
        _float_in("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _float_in("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _int_in("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, 64)
        if self.seed is not None:
            _int_in("seed", self.seed, 0, MAX_SEED)
        if not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParameterError(f"stop: {len(self.stop)} strings given, at most {MAX_STOP_STRINGS} allowed")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidParameterError(f"stop: {s!r} is not a non-empty string")
        if not isinstance(self.processors, tuple):
            object.__setattr__(self, "processors", tuple(self.processors))
        if len(self.processors) > MAX_PROCESSORS:
            raise InvalidParameterError(f"processors: {len(self.processors)} given, at most {MAX_PROCESSORS} allowed")
        if not all(isinstance(p, str) and p for p in self.processors):
            raise InvalidParameterError(f"processors: {self.processors!r} must be non-empty strings NAME[:ARGUMENT]")
        if self.on_unknown not in UNKNOWN_POLICIES:
            raise InvalidParameterError(f"on_unknown: {self.on_unknown!r} is not one of {', '.join(UNKNOWN_POLICIES)}")
        _int_in("n", self.n, 1, MAX_SAMPLES)
        _int_in("num_beams", self.num_beams, 1, MAX_BEAMS)
        _float_in("length_penalty", self.length_penalty, -10.0, 10.0)
        if not isinstance(self.early_stopping, bool):
            raise InvalidParameterError(f"early_stopping: {self.early_stopping!r} is not true or false")
        _int_in("num_return_sequences", self.num_return_sequences, 1, MAX_BEAMS)
        if not isinstance(self.introspect, bool):
            raise InvalidParameterError(f"introspect: {self.introspect!r} is not true or false")
        _int_in("top_alternatives", self.top_alternatives, 0, MAX_ALTERNATIVES)
        if not isinstance(self.units, tuple):
            object.__setattr__(self, "units", tuple(self.units))
        if len(self.units) > MAX_UNITS:
            raise InvalidParameterError(f"units: {len(self.units)} given, at most {MAX_UNITS} allowed")
        if self.units and not self.introspect:
            raise InvalidParameterError("units: unit activations are reported with introspect on")
        if self.num_beams > 1 and self.introspect:
            raise InvalidParameterError("introspect: per-token details are for sampling and greedy decoding, not beam search")
        if self.num_beams > 1 and self.processors:
            raise InvalidParameterError("processors: logits processors apply to sampling and greedy decoding, not beam search")
        if self.num_beams > 1 and self.n > 1:
            raise InvalidParameterError("n: several samples cannot be combined with beam search; use num_return_sequences")
        if self.num_return_sequences > self.num_beams:
            raise InvalidParameterError(
                f"num_return_sequences: {self.num_return_sequences} is more than num_beams ({self.num_beams})"
                + ("; for several samples use n" if self.num_beams == 1 else "")
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def beam_search(self) -> bool:
        return self.num_beams > 1

    def check_for_vocab(self, vocab_size: int) -> None:
        if self.top_k > vocab_size:
            raise InvalidParameterError(f"top_k: {self.top_k} is larger than the model's vocabulary ({vocab_size})")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_prompt_length(tokens: int, limit: int) -> None:
    """A prompt's token count within the limit the CLI or the server was given (`--max-prompt-tokens`)."""
    if tokens > limit:
        raise InvalidParameterError(f"prompt: {tokens:,} tokens is more than the limit of {limit:,} tokens "
                                    "(--max-prompt-tokens)")


def _int_in(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not (lo <= value <= hi):
        raise InvalidParameterError(f"{name}: {value!r} is not an integer in [{lo}, {hi}]")


def _float_in(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (lo <= value <= hi):
        raise InvalidParameterError(f"{name}: {value!r} is not a finite number in [{lo}, {hi}]")
