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
        # Which processors any row needs, decided once per batch change rather than every step
        # (array methods, not np.any: this runs whenever a row joins or leaves).
        self.greedy = self.temperature == 0.0
        self.any_greedy, self.all_greedy = bool(self.greedy.any()), bool(self.greedy.all())
        self.sampling_temperature = np.where(self.greedy, 1.0, self.temperature)[:, None]
        repetition, top_k, top_p = self.repetition != 1.0, self.top_k > 0, self.top_p < 1.0
        min_p, ngrams = self.min_p > 0.0, self.no_repeat_ngram > 0
        counts = (self.presence != 0.0) | (self.frequency != 0.0)
        self.uses_repetition, self.uses_counts, self.uses_ngrams = bool(repetition.any()), bool(counts.any()), bool(ngrams.any())
        self.uses_top_k, self.uses_top_p, self.uses_min_p = bool(top_k.any()), bool(top_p.any()), bool(min_p.any())
        self.uses_custom = bool(self.custom.any())
        # Rows that need nothing but temperature: the step graph samples their next token itself.
        self.simple = ~(repetition | counts | ngrams | top_k | top_p | min_p | self.custom)
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
    """Steps 1-2, in place on float64 logits (B, V), which it returns; `seen` (B, V) bool: in prompt
    or output; `counts` (B, V): output counts.

    Masks enter as numbers (a mask times a factor), not through np.where, which is several times
    slower on masks that mix True and False unpredictably, as these do.
    """
    if seen is not None and rp.uses_repetition:
        pen = rp.repetition[:, None]
        # A seen token's factor is 1/pen for a positive logit, pen otherwise (a logit of 0 stays 0
        # either way); an unseen token's is 1. As (1/pen + pen)/2 + sign * (1/pen - pen)/2, seen only.
        factor = np.sign(logits)
        factor *= (1.0 / pen - pen) / 2
        factor += (1.0 / pen + pen) / 2 - 1.0
        factor *= seen
        factor += 1.0
        logits *= factor
    if counts is not None and rp.uses_counts:
        logits -= rp.presence[:, None] * (counts > 0)
        logits -= rp.frequency[:, None] * counts
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


def filtered_weights(logits: np.ndarray, rp: RowParams) -> np.ndarray:
    """Steps 4-7 for sampling rows: each row's probabilities up to a factor (B, V), float64: exp(x - max x)
    with x = logits / temperature where the filters keep the token, 0 where they remove it. `draw`
    takes them as they are; divide a row by its sum for probabilities.

    Greedy rows (temperature 0) are computed at temperature 1; the caller takes their argmax instead.
    Each filter is a floor on x per row (a token is kept when x >= floor): top-k's is the k-th largest
    x (its ties stay), top-p's the smallest x of the shortest ranked prefix whose probability, after
    top-k, reaches p. Both come from one sort, top-p's from the highest max(k) ranks when every row
    is under top-k. Then one mask over the whole batch applies both.
    """
    x = logits / rp.sampling_temperature  # a new array: the weights are made in it, in place
    keep = None
    if not (rp.uses_top_k or rp.uses_top_p):
        peak = x.max(axis=1, keepdims=True)
    else:
        ascending = np.sort(x, axis=1)
        peak = ascending[:, -1:].copy()
        keep = x >= _rank_floor(ascending, peak, rp)
    x -= peak
    weights = np.exp(x, out=x)  # before the cut, which would put -inf in: numpy's exp is slow on -inf
    if keep is not None:
        weights *= keep
    if rp.uses_min_p:  # p >= min_p * max p; the largest weight is exp(0) = 1
        weights *= weights >= rp.min_p[:, None]
    return weights


def _rank_floor(ascending: np.ndarray, peak: np.ndarray, rp: RowParams) -> np.ndarray:
    """The lowest kept x per row (B, 1) under top-k and top-p, from each row's x sorted ascending."""
    rows, vocab = rp.row_index, ascending.shape[1]
    floor = np.full((len(ascending), 1), NEG_INF)
    width = vocab  # the highest ranks that decide top-p
    if rp.uses_top_k:
        k = rp.top_k
        active = (k > 0) & (k < vocab)
        floor[active, 0] = ascending[rows[active], vocab - k[active]]  # the k-th largest
        # The ranks that top-k keeps (each row's k and any ties with its k-th) are the highest max(k)
        # when every row is under top-k and no row's tie runs past them.
        widest = int(k.max())
        if active.all() and (ascending[:, vocab - 1 - widest] < floor[:, 0]).all():
            width = widest
    if rp.uses_top_p:
        head = ascending[:, ::-1][:, :width].copy()  # descending, contiguous (a reversed view is slow to work on)
        ranked = head - peak
        np.exp(ranked, out=ranked)
        ranked *= head >= floor
        ranked /= ranked.sum(axis=1, keepdims=True)  # probabilities after top-k, in rank order
        before = np.cumsum(ranked, axis=1)
        before -= ranked  # the mass of the tokens ranked above each token
        count = (before < rp.top_p[:, None]).sum(axis=1)  # the shortest prefix whose mass reaches top_p
        cut = rp.top_p < 1.0
        floor[cut, 0] = np.maximum(floor[cut, 0], head[rows[cut], count[cut] - 1])
    return floor


def draw(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling: one token per row from weights (B, V) >= 0 (probabilities up to a factor
    per row) with uniforms (B,) in [0, 1): the first token whose cumulative weight exceeds uniform * total."""
    cdf = np.cumsum(weights, axis=1)
    target = uniforms[:, None] * cdf[:, -1:]  # below the total (u < 1), so the last token with weight exceeds it
    return (cdf > target).argmax(axis=1)
