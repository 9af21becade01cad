"""Logits processors over a batch of rows, each row with its own parameters.

Applied in a fixed order, each only when some row in the batch needs it:
  1. repetition penalty (CTRL): logits of tokens already in the row's text are
     divided by the penalty when positive, multiplied when negative;
  2. presence and frequency penalties (OpenAI): logit -= presence * [count > 0]
     + frequency * count, counting generated tokens;
  3. no-repeat n-gram: tokens that would repeat an n-gram of the row's text are banned;
     then the row's registered processors (`--processor`, built-in or from plugins), per row;
  4. temperature (rows with temperature 0 are greedy and skip 4-7);
  5. top-k; 6. top-p (nucleus); 7. min-p (keep p >= min_p * max p).
Then one token per row: argmax for greedy rows, otherwise an inverse-CDF draw
with the row's own random generator, so a row samples the same text alone or
among any other rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEG_INF = -np.inf


def log_sum_exp(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x))) over the last axis, computed stably (the largest value shifted to 0)."""
    peak = x.max(axis=-1, keepdims=True)
    return peak[..., 0] + np.log(np.exp(x - peak).sum(axis=-1))


def log_softmax(x: np.ndarray) -> np.ndarray:
    """The one log-softmax: log-probabilities over the last axis (keeps -inf where x is -inf)."""
    return x - log_sum_exp(x)[..., None]


@dataclass
class RowParams:
    """Per-row sampling parameters as arrays, one entry per row (built once per batch change)."""

    temperature: np.ndarray  # (B,) float64
    top_k: np.ndarray  # (B,) int, 0 = off
    top_p: np.ndarray  # (B,) float64, 1 = off
    min_p: np.ndarray  # (B,) float64, 0 = off
    repetition: np.ndarray  # (B,) float64, 1 = off
    presence: np.ndarray  # (B,) float64, 0 = off
    frequency: np.ndarray  # (B,) float64, 0 = off
    no_repeat_ngram: np.ndarray  # (B,) int, 0 = off
    custom: np.ndarray  # (B,) bool: the row has plugin/built-in logits processors (--processor)
    any_introspect: bool = False  # some row reports per-token details

    def __post_init__(self) -> None:
        # Which processors any row needs, decided once per batch change rather than every step.
        self.greedy = self.temperature == 0.0
        self.any_greedy, self.all_greedy = bool(self.greedy.any()), bool(self.greedy.all())
        self.sampling_temperature = np.where(self.greedy, 1.0, self.temperature)[:, None]
        self.uses_repetition = bool(np.any(self.repetition != 1.0))
        self.uses_counts = bool(np.any(self.presence != 0.0) or np.any(self.frequency != 0.0))
        self.uses_ngrams = bool(np.any(self.no_repeat_ngram > 0))
        self.uses_top_k = bool(np.any(self.top_k > 0))
        self.uses_top_p = bool(np.any(self.top_p < 1.0))
        self.uses_min_p = bool(np.any(self.min_p > 0.0))
        self.uses_custom = bool(np.any(self.custom))
        # Rows that need nothing but temperature: the step graph samples their next token itself.
        self.simple = ((self.top_k == 0) & (self.top_p >= 1.0) & (self.min_p == 0.0) & (self.repetition == 1.0)
                       & (self.presence == 0.0) & (self.frequency == 0.0) & (self.no_repeat_ngram == 0) & ~self.custom)
        self.graph_sampled = np.flatnonzero(self.simple & ~self.greedy).tolist()  # rows that draw for the graph
        self.row_index = np.arange(len(self.temperature))  # reused by the engine every step

    def take(self, index: np.ndarray) -> "RowParams":
        """The parameters of some rows only."""
        return RowParams(self.temperature[index], self.top_k[index], self.top_p[index], self.min_p[index],
                         self.repetition[index], self.presence[index], self.frequency[index], self.no_repeat_ngram[index], self.custom[index],
                         self.any_introspect)

    @classmethod
    def from_params(cls, params: list) -> "RowParams":
        def arr(name, dtype):
            return np.array([getattr(p, name) for p in params], dtype=dtype)

        return cls(arr("temperature", np.float64), arr("top_k", np.int64), arr("top_p", np.float64),
                   arr("min_p", np.float64), arr("repetition_penalty", np.float64),
                   arr("presence_penalty", np.float64), arr("frequency_penalty", np.float64),
                   arr("no_repeat_ngram_size", np.int64), np.array([bool(p.processors) for p in params], dtype=bool),
                   any(p.introspect for p in params))


def apply_penalties(logits: np.ndarray, rp: RowParams, seen: np.ndarray | None, counts: np.ndarray | None) -> np.ndarray:
    """Steps 1-2 on float64 logits (B, V); `seen` (B, V) bool: in prompt or output; `counts` (B, V): output counts."""
    if seen is not None and rp.uses_repetition:
        pen = rp.repetition[:, None]
        penalised = np.where(logits > 0, logits / pen, logits * pen)
        logits = np.where(seen, penalised, logits)
    if counts is not None and rp.uses_counts:
        logits = logits - rp.presence[:, None] * (counts > 0) - rp.frequency[:, None] * counts
    return logits


def banned_by_ngrams(history: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `history` (HF's no_repeat_ngram_size)."""
    if n <= 0 or len(history) < n:
        return []
    prefix = tuple(history[len(history) - n + 1 :]) if n > 1 else ()
    banned = []
    for i in range(len(history) - n + 1):
        if tuple(history[i : i + n - 1]) == prefix:
            banned.append(history[i + n - 1])
    return banned


def filtered_probs(logits: np.ndarray, rp: RowParams) -> np.ndarray:
    """Steps 4-7 for sampling rows: probabilities (B, V), each row summing to 1 (float32 or float64).

    Greedy rows (temperature 0) are computed at temperature 1; the caller takes their argmax instead.
    """
    x = logits / rp.sampling_temperature
    rows = np.arange(len(x))
    # One descending sort serves top-k (each row's k-th largest logit) and top-p (probabilities in
    # rank order: exp and division are elementwise, so sorting logits first gives the same numbers).
    ranked_x = np.sort(x, axis=1)[:, ::-1] if rp.uses_top_k or rp.uses_top_p else None
    peak = x.max(axis=1, keepdims=True)  # top-k never removes the largest logit
    probs = np.exp(x - peak)  # before top-k's cut, which would put -inf in: numpy's exp is 5-9x slower on -inf
    kth = None
    if rp.uses_top_k:
        k, vocab = rp.top_k, x.shape[1]
        active = (k > 0) & (k < vocab)
        if np.any(active):
            kth = np.where(active, ranked_x[rows, np.clip(k - 1, 0, vocab - 1)], NEG_INF)[:, None]
            probs = np.where(x >= kth, probs, 0.0)
    total = probs.sum(axis=1, keepdims=True)
    probs /= total
    if rp.uses_top_p:
        # Every row under top-k keeps at most its k largest (and their ties, which share the k-th
        # value): the first max(k) ranks decide the cut. Ranks past a row's own k hold tokens top-k
        # removed; the floor found there is below every kept token, so it keeps them all, as it should.
        width = int(rp.top_k.max()) if kth is not None and np.all(active) else ranked_x.shape[1]
        ranked = np.exp(ranked_x[:, :width] - peak)
        ranked /= total
        before = np.cumsum(ranked, axis=1)
        before -= ranked  # mass of the tokens ranked above each token
        count = (before < rp.top_p[:, None]).sum(axis=1)  # the smallest prefix whose mass reaches top_p
        floor = ranked[rows, count - 1]
        probs = np.where(probs >= floor[:, None], probs, 0.0)
        probs /= probs.sum(axis=1, keepdims=True)
    if rp.uses_min_p:
        floor = rp.min_p[:, None] * probs.max(axis=1, keepdims=True)
        probs = np.where(probs >= floor, probs, 0.0)
        probs /= probs.sum(axis=1, keepdims=True)
    return probs


def draw(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling: one token per row from probs (B, V) with uniforms (B,) in [0, 1)."""
    cdf = np.cumsum(probs, axis=1)
    targets = uniforms * cdf[:, -1]
    tokens = (cdf <= targets[:, None]).sum(axis=1)  # first index whose cdf exceeds the target
    return np.minimum(tokens, probs.shape[1] - 1)
