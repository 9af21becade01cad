"""Beam search, deterministic, with streaming of the text every candidate already shares.

Beams are rows of one batched state; each step scores every (beam, token)
extension by its summed log-probability, keeps the best `num_beams` live ones
(a gather of state rows: an RNN beam is a cheap copy of a fixed-size state),
and sets aside hypotheses that hit a stop string. A hypothesis' score is its
log-probability divided by length ** length_penalty. Without stop strings all
beams run to max_new_tokens.

Streaming: after each step, the text common to every live beam and every
finished hypothesis can no longer change, whichever of them wins; that prefix
is emitted at once (less any tail that could still begin a stop string).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from rnngen.decoding.engine import FINISH_LENGTH, FINISH_STOP, BatchState
from rnngen.decoding.logits import RowParams, apply_penalties, banned_by_ngrams, log_softmax
from rnngen.decoding.params import GenerationParams
from rnngen.decoding.stops import find_stop, stop_safe_length
from rnngen.model.runtime import RnnModel
from rnngen.model.tokenizers import StreamDecoder


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens
    logprob: float  # summed (processed) log-probabilities
    text: str  # complete characters, cut before a stop string
    finish_reason: str
    length_penalty: float

    @property
    def score(self) -> float:
        return self.logprob / (max(len(self.tokens), 1) ** self.length_penalty)


@dataclass
class _Beam:
    tokens: list[int]
    logprob: float
    decoder: StreamDecoder
    text: str


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

    Every returned hypothesis' text starts with all that was yielded.
    """

    def __init__(self, model: RnnModel, prompt_ids: list[int], params: GenerationParams):
        self.model = model
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.results: list[Hypothesis] = []
        self.emitted = ""

    def __iter__(self) -> Iterator[str]:
        p = self.params
        k, stops, vocab = p.num_beams, p.stop, self.model.config.vocab_size
        logits, state = self.model.prefill(self.prompt_ids)
        state = BatchState(state)
        beams = [_Beam([], 0.0, self.model.tokenizer.stream_decoder(), "")]
        finished: list[Hypothesis] = []
        uses_penalties = p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        for step in range(p.max_new_tokens):
            x = logits.astype(np.float64)
            if uses_penalties:
                x = self._penalised(x, beams)
            if p.no_repeat_ngram_size:
                for i, beam in enumerate(beams):
                    banned = banned_by_ngrams(self.prompt_ids + beam.tokens, p.no_repeat_ngram_size)
                    x[i, banned] = -np.inf
            logp = log_softmax(x)
            totals = (np.array([b.logprob for b in beams])[:, None] + logp).ravel()
            # Best 2k candidates, ties broken by (beam, token) index so the search is deterministic.
            top = min(2 * k, totals.size)
            cand = np.argpartition(-totals, top - 1)[:top]
            cand = cand[np.lexsort((cand, -totals[cand]))]
            survivors: list[tuple[int, _Beam]] = []
            last_step = step + 1 == p.max_new_tokens
            for rank, flat in enumerate(cand.tolist()):
                if not np.isfinite(totals[flat]):
                    break
                b, token = divmod(flat, vocab)
                parent = beams[b]
                decoder = copy.deepcopy(parent.decoder)
                text = parent.text + decoder.push(token)
                beam = _Beam(parent.tokens + [token], float(totals[flat]), decoder, text)
                cut = find_stop(text, stops) if stops else -1
                if cut >= 0:
                    if rank < k:  # as in common beam search: only top-ranked candidates may finish
                        finished.append(Hypothesis(beam.tokens, beam.logprob, text[:cut], FINISH_STOP, p.length_penalty))
                    continue
                survivors.append((b, beam))
                if len(survivors) == k:
                    break
            if last_step or not survivors:
                for _, beam in survivors:
                    tail = beam.decoder.flush()
                    text = beam.text + tail
                    cut = find_stop(text, stops) if stops else -1
                    reason = FINISH_STOP if cut >= 0 else FINISH_LENGTH
                    finished.append(Hypothesis(beam.tokens, beam.logprob, text[:cut] if cut >= 0 else text, reason, p.length_penalty))
                break
            beams = [beam for _, beam in survivors]
            if self._done(finished, beams, k, step + 1):
                break
            delta = self._shared_delta(beams, finished)
            if delta:
                yield delta
            state = state.select([b for b, _ in survivors])
            tokens = np.array([beam.tokens[-1] for beam in beams], dtype=np.int64)
            logits, new_state = self.model.step(tokens, state.arrays)
            state = BatchState(new_state)
        finished.sort(key=lambda h: (-h.score, h.tokens))
        self.results = finished[: p.num_return_sequences]

    def _penalised(self, x: np.ndarray, beams: list[_Beam]) -> np.ndarray:
        p, vocab = self.params, self.model.config.vocab_size
        rp = RowParams.from_params([p] * len(beams))
        seen = np.zeros((len(beams), vocab), dtype=bool)
        counts = np.zeros((len(beams), vocab), dtype=np.int32)
        for i, beam in enumerate(beams):
            seen[i, self.prompt_ids + beam.tokens] = True
            np.add.at(counts[i], beam.tokens, 1)
        return apply_penalties(x, rp, seen, counts)

    def _done(self, finished: list[Hypothesis], beams: list[_Beam], k: int, length: int) -> bool:
        if len(finished) < k:
            return False
        if self.params.early_stopping:
            return True
        worst_kept = sorted((h.score for h in finished), reverse=True)[k - 1]
        best_live = max(b.logprob for b in beams) / (length ** self.params.length_penalty)
        return best_live <= worst_kept

    def _shared_delta(self, beams: list[_Beam], finished: list[Hypothesis]) -> str:
        shared = _common_prefix([b.text for b in beams] + [h.text for h in finished])
        safe = shared[: stop_safe_length(shared, self.params.stop)] if self.params.stop else shared
        if len(safe) <= len(self.emitted):
            return ""
        delta = safe[len(self.emitted) :]
        self.emitted = safe
        return delta
