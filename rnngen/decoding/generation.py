"""Generation from a prompt: samples or beam search, streamed or all at once.

    gen = Generation(model, "ROMEO:", GenerationParams(n=2, seed=1))
    for chunk in gen:                 # StreamChunk(index, text) as text is made
        ...
    gen.sequences                     # one SequenceResult per sample / returned beam

Sampling decodes the n samples as rows of one batch in the decoding engine
(the prompt is prefilled once and its state copied to every row). Beam search
streams the text all beams already share, then each returned sequence's rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator

from rnngen.decoding.beam import BeamSearch
from rnngen.decoding.engine import FINISH_LENGTH, FINISH_STOP, DecodeEngine
from rnngen.decoding.rows import Row, resolve_seed, row_generator
from rnngen.decoding.params import DEFAULT_MAX_PROMPT_TOKENS, GenerationParams, check_prompt_length
from rnngen.decoding.processors import ProcessorFactories, build_processors
from rnngen.model.runtime import RnnModel

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "Generation", "GenerationResult", "SequenceResult", "StreamChunk",
           "generate", "stream_text"]


@dataclass
class StreamChunk:
    index: int  # which sequence (sample or returned beam) the text belongs to
    text: str


@dataclass
class SequenceResult:
    index: int
    text: str
    tokens: int  # generated tokens
    finish_reason: str  # "length" or "stop"
    logprob: float  # total log-probability of the generated tokens (samples: the model's; beams: after penalties)
    beam_score: float | None = None  # beams: logprob / tokens ** length_penalty, what they are ranked by
    details: list[dict] = field(default_factory=list)  # per token, with params.introspect

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.beam_score is None:
            del out["beam_score"]
        if not self.details:
            del out["details"]
        return out


@dataclass
class GenerationResult:
    sequences: list[SequenceResult]
    prompt_tokens: int

    @property
    def text(self) -> str:
        return self.sequences[0].text

    @property
    def finish_reason(self) -> str:
        return self.sequences[0].finish_reason

    @property
    def new_tokens(self) -> int:
        return sum(s.tokens for s in self.sequences)


class Generation:
    """`processors`: the names `params.processors` may use (default: the built-ins; the CLI
    passes the plugins' too); a prompt may have up to `max_prompt_tokens` tokens. Everything
    is checked here, before any work."""

    def __init__(self, model: RnnModel, prompt: str, params: GenerationParams,
                 processors: ProcessorFactories | None = None, max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS):
        params.check_for_vocab(model.config.vocab_size)
        self.model, self.params = model, params
        tokenizer = model.tokenizer
        self._processors = build_processors(params.processors, tokenizer, processors)
        ids = tokenizer.encode(prompt, on_unknown=params.on_unknown)  # checks the prompt before any work
        check_prompt_length(len(ids), max_prompt_tokens)
        # An empty prompt starts the model the way texts start: after a newline (not shown).
        self.prompt_ids = ids if ids else tokenizer.start_ids()
        self.prompt_tokens = len(ids)
        self.seed = resolve_seed(params.seed)
        self.sequences: list[SequenceResult] = []

    def __iter__(self) -> Iterator[StreamChunk]:
        if self.params.beam_search:
            yield from self._beams()
        else:
            yield from self._samples()

    @property
    def result(self) -> GenerationResult:
        return GenerationResult(self.sequences, self.prompt_tokens)

    def _samples(self) -> Iterator[StreamChunk]:
        engine = DecodeEngine(self.model)
        logits, state = engine.prefill(self.prompt_ids)
        n = self.params.n
        rows = [Row.start(self.params, row_generator(self.seed, i), self.model.tokenizer, self.prompt_ids,
                          tag=i, logit_processors=list(self._processors)) for i in range(n)]
        engine.add(rows, logits[[0] * n], state.select([0] * n))  # one prefill, n copies of its state
        details: list[list[dict]] = [[] for _ in range(n)]
        while len(engine):
            for update in engine.step():
                if update.error is not None:
                    raise update.error
                if update.details is not None:
                    details[update.row.tag].append(update.details)
                if update.text:
                    yield StreamChunk(update.row.tag, update.text)
        self.sequences = [SequenceResult(r.tag, r.text, r.count, r.finish_reason, r.logprob, details=details[r.tag]) for r in rows]

    def _beams(self) -> Iterator[StreamChunk]:
        search = BeamSearch(self.model, self.prompt_ids, self.params, self._processors)
        returned = self.params.num_return_sequences
        for delta in search:
            for i in range(returned):
                yield StreamChunk(i, delta)
        self.sequences = []
        for i, hyp in enumerate(search.results):
            rest = hyp.text[len(search.emitted) :]
            if rest:
                yield StreamChunk(i, rest)
            self.sequences.append(SequenceResult(i, hyp.text, len(hyp.tokens), hyp.finish_reason, hyp.logprob, hyp.score,
                                                 details=hyp.details))


def generate(model: RnnModel, prompt: str, params: GenerationParams,
             processors: ProcessorFactories | None = None) -> GenerationResult:
    gen = Generation(model, prompt, params, processors)
    for _ in gen:
        pass
    return gen.result


def stream_text(model: RnnModel, prompt: str, params: GenerationParams,
                processors: ProcessorFactories | None = None) -> Iterator[str]:
    """The text of the first sequence as it is generated (the common case: one sample)."""
    for chunk in Generation(model, prompt, params, processors):
        if chunk.index == 0:
            yield chunk.text
