"""Beam search, deterministic, with streaming of the text every candidate already shares.

Beams are rows of a DecodeEngine, so each row's penalties, n-gram bans,
processors, stop strings and introspection work as for samples. Each step scores
every (beam, token) extension by its summed log-probability (the engine's
`log_probs`: after the row's processing), keeps the best `num_beams` live ones
(one `select`: a gather of slots, copying a beam where it has several children)
and steps them with their chosen tokens; hypotheses that hit a stop string are
set aside. A hypothesis' score is its
log-probability divided by length ** length_penalty. Without stop strings all
beams run to max_new_tokens.

Streaming: after each step, the text common to every live beam and every
finished hypothesis can no longer change, whichever of them wins; that prefix
is emitted at once (less any tail that could still begin a stop string).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np

from rnngen.decoding.engine import FINISH_LENGTH, FINISH_STOP, DecodeEngine
from rnngen.decoding.params import GenerationParams
from rnngen.decoding.rows import Row
from rnngen.decoding.stops import stop_safe_length
from rnngen.model.runtime import RnnModel


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens
    logprob: float  # summed (processed) log-probabilities
    text: str  # complete characters, cut before a stop string
    finish_reason: str
    length_penalty: float
    details: list[dict] = field(default_factory=list)  # per token, with params.introspect

    @property
    def score(self) -> float:
        return self.logprob / (max(len(self.tokens), 1) ** self.length_penalty)


@dataclass
class _Beam:
    row: Row  # its row in the engine
    tokens: list[int]
    logprob: float
    text: str  # the text its row passed through its stop filter
    details: list[dict]

    @property
    def raw_text(self) -> str:
        """Its text with what the stop filter still holds back."""
        return self.text + self.row.stops.held


def _common_prefix(texts: list[str]) -> str:
    if not texts:
        return ""
    first, last = min(texts), max(texts)  # the common prefix of all equals that of the extremes
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


class BeamSearch:
    """Iterate to receive the shared prefix as it grows; `results` holds the best hypotheses after.

    Every returned hypothesis' text starts with all that was yielded. `processors`: the
    params' processors already built (default: built from the built-in ones).
    """

    def __init__(self, model: RnnModel, prompt_ids: list[int], params: GenerationParams,
                 processors: list | None = None):
        self.model = model
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.processors = list(processors or [])
        self.results: list[Hypothesis] = []
        self.emitted = ""

    def __iter__(self) -> Iterator[str]:
        p = self.params
        k, vocab = p.num_beams, self.model.config.vocab_size
        engine = DecodeEngine(self.model)
        # Beams choose by score: the rows only apply their penalties, bans and processors.
        row_params = replace(p, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
        first = Row.start(row_params, np.random.default_rng(0), self.model.tokenizer, self.prompt_ids,
                          keep_text=False, logit_processors=list(self.processors))
        engine.add([first], *engine.prefill(self.prompt_ids))
        beams = [_Beam(first, [], 0.0, "", [])]
        finished: list[Hypothesis] = []
        for step in range(p.max_new_tokens):
            totals = (np.array([b.logprob for b in beams])[:, None] + engine.log_probs()).ravel()
            # Best 2k candidates, ties broken by (beam, token) index so the search is deterministic.
            top = min(2 * k, totals.size)
            cand = np.argpartition(-totals, top - 1)[:top]
            cand = cand[np.lexsort((cand, -totals[cand]))]
            cand = cand[np.isfinite(totals[cand])]
            if not p.stop:
                cand = cand[:k]  # no candidate can stop: the best k are the survivors
            parents, tokens = np.divmod(cand, vocab)
            # One gather: candidate j in slot j; a beam's first child is its row, the others clones.
            taken: set[int] = set()
            rows = []
            for b in parents.tolist():
                rows.append(beams[b].row if b not in taken else beams[b].row.clone())
                taken.add(b)
            engine.select(parents.tolist(), rows=rows)
            updates = engine.step(tokens)
            survivors: list[_Beam] = []
            for rank, update in enumerate(updates):
                parent = beams[int(parents[rank])]
                beam = _Beam(update.row, parent.tokens + [update.token], float(totals[cand[rank]]),
                             parent.text + update.text,
                             parent.details + [update.details] if update.details is not None else parent.details)
                if update.row.finish_reason == FINISH_STOP and len(survivors) < k:
                    if rank < k:  # as in common beam search: only top-ranked candidates may finish
                        finished.append(self._hypothesis(beam, FINISH_STOP))
                elif update.row.finish_reason is None and len(survivors) < k:
                    survivors.append(beam)
                elif update.finished and len(survivors) < k:  # the last step: the row ended at its length
                    survivors.append(beam)
                    finished.append(self._hypothesis(beam, FINISH_LENGTH))
            if step + 1 == p.max_new_tokens or not survivors:
                break
            if len(survivors) < len(engine):  # candidates beyond the survivors leave
                position = {id(row): i for i, row in enumerate(engine.rows)}
                engine.select([position[id(b.row)] for b in survivors])
            beams = survivors
            if self._done(finished, beams, k, step + 1):
                break
            delta = self._shared_delta(beams, finished)
            if delta:
                yield delta
        finished.sort(key=lambda h: (-h.score, h.tokens))
        self.results = finished[: p.num_return_sequences]

    def _hypothesis(self, beam: _Beam, reason: str) -> Hypothesis:
        return Hypothesis(beam.tokens, beam.logprob, beam.text, reason, self.params.length_penalty, beam.details)

    def _done(self, finished: list[Hypothesis], beams: list[_Beam], k: int, length: int) -> bool:
        if len(finished) < k:
            return False
        if self.params.early_stopping:
            return True
        worst_kept = sorted((h.score for h in finished), reverse=True)[k - 1]
        best_live = max(b.logprob for b in beams) / (length ** self.params.length_penalty)
        return best_live <= worst_kept

    def _shared_delta(self, beams: list[_Beam], finished: list[Hypothesis]) -> str:
        shared = _common_prefix([b.raw_text for b in beams] + [h.text for h in finished])
        safe = shared[: stop_safe_length(shared, self.params.stop)] if self.params.stop else shared
        if len(safe) <= len(self.emitted):
            return ""
        delta = safe[len(self.emitted) :]
        self.emitted = safe
        return delta
