"""Generation parameters: one type, validated once where a request enters (CLI, API, server).

Errors name the parameter, the value and the allowed range, as one message that
each door renders in its own words (InvalidParameterError.in_terms_of: CLI
options, proto fields, these parameter names). The decoding engine trusts a
GenerationParams it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from rnngen.checks import check_choice, check_int, check_number
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

_refused = InvalidParameterError.about  # a message naming parameters as {name}


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
        check_int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS_LIMIT)
        check_number("temperature", self.temperature, 0.0, 100.0)
        check_int("top_k", self.top_k, 0, 10_000_000)
        check_number("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_number("min_p", self.min_p, 0.0, 1.0)
        check_number("repetition_penalty", self.repetition_penalty, 0.0, 10.0, lo_open=True)
        check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, 64)
        if self.seed is not None:
            check_int("seed", self.seed, 0, MAX_SEED)
        if not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if len(self.stop) > MAX_STOP_STRINGS:
            raise _refused("{stop}: {count} strings given, at most {limit} allowed", count=len(self.stop), limit=MAX_STOP_STRINGS)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise _refused("{stop}: {value!r} is not a non-empty string", value=s)
        if not isinstance(self.processors, tuple):
            object.__setattr__(self, "processors", tuple(self.processors))
        if len(self.processors) > MAX_PROCESSORS:
            raise _refused("{processors}: {count} given, at most {limit} allowed", count=len(self.processors), limit=MAX_PROCESSORS)
        if not all(isinstance(p, str) and p for p in self.processors):
            raise _refused("{processors}: {value!r} must be non-empty strings NAME[:ARGUMENT]", value=self.processors)
        check_choice("on_unknown", self.on_unknown, UNKNOWN_POLICIES)
        check_int("n", self.n, 1, MAX_SAMPLES)
        check_int("num_beams", self.num_beams, 1, MAX_BEAMS)
        check_number("length_penalty", self.length_penalty, -10.0, 10.0)
        if not isinstance(self.early_stopping, bool):
            raise _refused("{early_stopping}: {value!r} is not true or false", value=self.early_stopping)
        check_int("num_return_sequences", self.num_return_sequences, 1, MAX_BEAMS)
        if not isinstance(self.introspect, bool):
            raise _refused("{introspect}: {value!r} is not true or false", value=self.introspect)
        check_int("top_alternatives", self.top_alternatives, 0, MAX_ALTERNATIVES)
        if not isinstance(self.units, tuple):
            object.__setattr__(self, "units", tuple(self.units))
        if len(self.units) > MAX_UNITS:
            raise _refused("{units}: {count} given, at most {limit} allowed", count=len(self.units), limit=MAX_UNITS)
        if self.units and not self.introspect:
            raise _refused("{units}: unit activations are reported with {introspect} on")
        if self.num_beams > 1 and self.n > 1:
            raise _refused("{n}: several samples cannot be combined with beam search ({num_beams}); "
                           "use {num_return_sequences} for several beams")
        if self.num_return_sequences > self.num_beams:
            raise _refused("{num_return_sequences}: {value} is more than {num_beams} ({beams})"
                           + ("; for several samples use {n}" if self.num_beams == 1 else ""),
                           value=self.num_return_sequences, beams=self.num_beams)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def beam_search(self) -> bool:
        return self.num_beams > 1

    def check_for_vocab(self, vocab_size: int) -> None:
        if self.top_k > vocab_size:
            raise _refused("{top_k}: {value} is larger than the model's vocabulary ({size})", value=self.top_k, size=vocab_size)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_prompt_length(tokens: int, limit: int) -> None:
    """A prompt's token count within the limit the CLI or the server was given (`--max-prompt-tokens`)."""
    if tokens > limit:
        raise InvalidParameterError(f"prompt: {tokens:,} tokens is more than the limit of {limit:,} tokens "
                                    "(--max-prompt-tokens)")
