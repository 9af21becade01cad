"""The decoding engine: many sequences decoded together as rows of one batched state.

An RNN's state is a fixed-size (layers, batch, hidden) tensor per state name,
so every batch operation is a gather along the batch axis: rows join
(concatenate), leave (select the others), are copied (select one twice) and
reordered (select in a new order) between two steps, and the other rows do
not notice. Continuous batching in a server rests on that; beam search
(rnngen.decoding.beam) uses the same BatchState gathers.

A step: choose one token for every row from the logits it holds (each row with
its own parameters and random generator), record the text it adds, let
finished rows leave, then run the model once for all remaining rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnngen.errors import InvalidParameterError, RnngenError
from rnngen.decoding.details import token_details
from rnngen.decoding.logits import RowParams, apply_penalties, banned_by_ngrams, draw, filtered_probs, log_sum_exp
from rnngen.decoding.params import GenerationParams
from rnngen.decoding.processors import build_processors
from rnngen.decoding.rows import Row, RowSnapshot
from rnngen.model.runtime import BoundStepper, RnnModel
from rnngen.model.step_graph import SAMPLE_GREEDY, SAMPLE_INV_TEMPERATURE, SAMPLE_UNIFORM
from rnngen.model.units import state_units

FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_STOP = "stop"  # a stop string was generated
FINISH_CANCELLED = "cancelled"  # the caller removed the row
FINISH_ERROR = "error"  # one of the row's logits processors failed (RowUpdate.error says how)
FINISH_INTERRUPTED = "interrupted"  # the caller asked the row to leave early (Row.leave), e.g. a server stopping


class BatchState:
    """The recurrent state of a batch: one (layers, batch, hidden) array per state name."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    @property
    def size(self) -> int:
        return next(iter(self.arrays.values())).shape[1]

    def select(self, indices) -> "BatchState":
        """Rows in the given order: drops, copies and reorders in one gather."""
        idx = np.asarray(indices, dtype=np.int64)
        return BatchState({k: np.ascontiguousarray(v[:, idx]) for k, v in self.arrays.items()})

    @staticmethod
    def concat(states: list["BatchState"]) -> "BatchState":
        keys = states[0].arrays.keys()
        return BatchState({k: np.concatenate([s.arrays[k] for s in states], axis=1) for k in keys})


@dataclass
class RowUpdate:
    """What one step did to one row: the text it added (may be empty) and whether it finished."""

    row: Row
    token: int
    text: str
    finished: bool
    details: dict | None = None  # with params.introspect: see rnngen.decoding.details.token_details
    error: Exception | None = None  # the row ended because of this (its stream gets the error)


def _sampling_feeds(rp: RowParams, rows: list[Row]) -> dict[str, np.ndarray]:
    """The step graph's sampling inputs; each temperature-only row draws its next token's uniform now."""
    uniform = rp.uniform
    for i in rp.graph_sampled:
        uniform[i, 0] = rows[i].rng.random()
    return {SAMPLE_INV_TEMPERATURE: rp.inv_temperature, SAMPLE_GREEDY: rp.greedy, SAMPLE_UNIFORM: uniform}


def resume(model: RnnModel, snapshot: RowSnapshot, params: GenerationParams, **kw) -> tuple[Row, np.ndarray, BatchState]:
    """A row continued from a snapshot, ready to `add`: its pending token is fed now, exactly as the
    engine would have fed it in the uninterrupted run (the same sampling inputs and random draw)."""
    row = Row.resume(snapshot, params, model.tokenizer, **kw)
    sampling = _sampling_feeds(RowParams.from_params([params]), [row])
    token = np.array([snapshot.pending_token], dtype=np.int64)
    logits, next_tokens, log_z, state = model.step_sample(token, snapshot.state, sampling)
    row.first_sample = (int(next_tokens[0]), float(log_z[0]))
    return row, logits, BatchState(state)


class DecodeEngine:
    """Rows of one batched state, stepped together with one model call per step."""

    def __init__(self, model: RnnModel, use_iobinding: bool | None = None):
        self.model = model
        # On CUDA the state stays on the device between steps; None chooses by the model's device.
        if use_iobinding is None:
            use_iobinding = model.device == "cuda"
        self._bound = BoundStepper(model) if use_iobinding else None
        self.rows: list[Row] = []
        self.state: BatchState | None = None
        self.logits: np.ndarray | None = None  # (B, V) float32: next-token logits of each row
        # The graph samples temperature-only rows' next tokens during each step (-1: not known yet,
        # e.g. right after a prefill); log_z is each row's log softmax denominator (nan: not known).
        self.next_tokens: np.ndarray | None = None  # (B,) int64
        self.log_z: np.ndarray | None = None  # (B,) float32
        self._dirty = True  # membership changed: per-row parameter arrays need rebuilding
        self._rp: RowParams | None = None
        self._seen: np.ndarray | None = None  # (B, V) bool, for the repetition penalty
        self._counts: np.ndarray | None = None  # (B, V) int32, for presence/frequency penalties
        self._state_on_device = False  # True while the device holds newer state than self.state

    def __len__(self) -> int:
        return len(self.rows)

    # -- membership ------------------------------------------------------------------------

    def prefill(self, prompt_ids: list[int]) -> tuple[np.ndarray, BatchState]:
        """The prompt through the Loop graph: next-token logits (1, V) and the state after it."""
        logits, state = self.model.prefill(prompt_ids)
        return logits, BatchState(state)

    def add(self, rows: list[Row], logits: np.ndarray, state: BatchState) -> None:
        """New rows join at the next step; `logits` (k, V) and `state` hold their k rows."""
        if len(rows) != logits.shape[0] or len(rows) != state.size:
            raise ValueError("rows, logits and state must have the same number of rows")
        for row in rows:
            row.params.check_for_vocab(self.model.config.vocab_size)
            if row.params.processors and len(row.logit_processors) != len(row.params.processors):
                # Callers that know plugin processors build them first (Generation, the server).
                row.logit_processors = build_processors(row.params.processors, self.model.tokenizer)
            if row.params.units and not row.units:
                row.units = state_units(row.params.units, self.model.config)
        self._sync_from_device()
        # A resumed row arrives with its first token already sampled in the graph (see `resume`).
        unknown = np.array([r.first_sample[0] if r.first_sample else -1 for r in rows], dtype=np.int64)
        no_log_z = np.array([r.first_sample[1] if r.first_sample else np.nan for r in rows], dtype=np.float32)
        for row in rows:
            row.first_sample = None
        if self.state is None or not self.rows:
            self.rows, self.logits, self.state = list(rows), np.array(logits, dtype=np.float32), state
            self.next_tokens, self.log_z = unknown, no_log_z
        else:
            self.rows = self.rows + list(rows)
            self.logits = np.concatenate([self.logits, logits.astype(np.float32)])
            self.next_tokens = np.concatenate([self.next_tokens, unknown])
            self.log_z = np.concatenate([self.log_z, no_log_z])
            self.state = BatchState.concat([self.state, state])
        self._dirty = True
        self._sync_to_device()

    def select(self, indices: list[int], rows: list[Row] | None = None) -> None:
        """Keep rows by index, in this order: drop, copy (an index twice) or reorder.

        Rows given in `rows` replace the kept ones (a copied row must be a clone, not the same object).
        """
        indices = list(indices)
        self._sync_from_device()
        self.rows = rows if rows is not None else [self.rows[i] for i in indices]
        if len({id(r) for r in self.rows}) != len(self.rows):
            raise ValueError("a copied row must be a Row.clone(), not the same object twice")
        if indices:
            self.logits = self.logits[indices]
            self.next_tokens = self.next_tokens[indices]
            self.log_z = self.log_z[indices]
            self.state = self.state.select(indices)
        else:
            self.logits = self.next_tokens = self.log_z = self.state = None
        self._dirty = True
        self._sync_to_device()

    def remove(self, row: Row, reason: str = FINISH_CANCELLED) -> None:
        """A row leaves now (a cancelled stream); the others go on untouched."""
        index = next(i for i, r in enumerate(self.rows) if r is row)
        row.finish_reason = row.finish_reason or reason
        self.select([i for i in range(len(self.rows)) if i != index])

    # -- one step ---------------------------------------------------------------------------

    def step(self) -> list[RowUpdate]:
        """Pick a token for every row, record its text, drop finished rows, run the model once."""
        if not self.rows:
            return []
        if self._dirty:
            self._rebuild()
        tokens, logprobs = self._choose_tokens()
        details = self._details(tokens) if self._rp.any_introspect else {}
        updates = []
        keep = []
        for i, (row, token) in enumerate(zip(self.rows, tokens.tolist())):
            if row.error is not None:
                row.finish_reason = FINISH_ERROR
                updates.append(RowUpdate(row, token, "", True, None, row.error))
                continue
            text = row.stops.push(row.decoder.push(token))
            if row.stops.stopped:
                row.finish_reason = FINISH_STOP
            elif row.count + 1 >= row.params.max_new_tokens:
                if not row.capture_state:  # a row to be resumed keeps unfinished text for its continuation
                    text += row.stops.push(row.decoder.flush())
                    text += row.stops.flush()
                row.finish_reason = FINISH_STOP if row.stops.stopped else FINISH_LENGTH
            elif row.leave:
                row.finish_reason = FINISH_INTERRUPTED
            else:
                keep.append(i)
            row.record(token, text, float(logprobs[i]))
            updates.append(RowUpdate(row, token, text, row.finish_reason is not None, details.get(i)))
        if self._seen is not None:
            self._seen[np.arange(len(tokens)), tokens] = True
        if self._counts is not None:
            self._counts[np.arange(len(tokens)), tokens] += 1
        if len(keep) < len(self.rows):
            capture = [i for i, row in enumerate(self.rows) if row.capture_state and row.finish_reason is not None]
            if capture:
                state = self.current_state()
                for i in capture:
                    self.rows[i].final_state = {k: v[:, i : i + 1].copy() for k, v in state.arrays.items()}
            self.select(keep)  # marks the per-row arrays stale; _run_model rebuilds them
            tokens = tokens[keep]
        if self.rows:
            self._run_model(tokens)
        return updates

    @staticmethod
    def _apply_processors(row: Row, x: np.ndarray, i: int) -> None:
        """The row's own processors on its logits x[i]; a failure ends this row only (see Row.error)."""
        original = x[i].copy()
        for spec, process in zip(row.params.processors, row.logit_processors):
            try:
                x[i] = process(x[i], row.history)
                if not np.isfinite(x[i]).any():
                    raise InvalidParameterError(f"processor {spec}: no token is left to choose")
            except Exception as exc:
                row.error = exc if isinstance(exc, RnngenError) else RnngenError(
                    f"processor {spec} failed: {type(exc).__name__}: {exc}")
                x[i] = original  # any token will do: the row ends at this step
                return

    def _details(self, tokens: np.ndarray) -> dict[int, dict]:
        """Per-token introspection for the rows that asked for it (the state is read back only if units are wanted)."""
        rows = [(i, row) for i, row in enumerate(self.rows) if row.params.introspect]
        state = self.current_state().arrays if any(row.units for _, row in rows) else None
        tokenizer = self.model.tokenizer
        return {i: token_details(self.logits[i], int(tokens[i]), row.params.top_alternatives, tokenizer, row.units, state, i)
                for i, row in rows}

    def _run_model(self, tokens: np.ndarray) -> None:
        """One batched model call; temperature-only rows get their next token sampled in the graph."""
        if self._dirty:
            self._rebuild()
        sampling = _sampling_feeds(self._rp, self.rows)
        if self._bound is not None:
            self.logits, self.next_tokens, self.log_z = self._bound.step(tokens, sampling)
            self._state_on_device = True
        else:
            self.logits, self.next_tokens, self.log_z, new_state = self.model.step_sample(tokens, self.state.arrays, sampling)
            self.state = BatchState(new_state)

    def current_state(self) -> BatchState | None:
        """The batch's state on the host (read back from the device when it lives there)."""
        self._sync_from_device()
        return self.state

    def _sync_from_device(self) -> None:
        if self._bound is not None and self._state_on_device:
            self.state = BatchState(self._bound.read_state())
            self._state_on_device = False

    def _sync_to_device(self) -> None:
        if self._bound is not None and self.state is not None and self.rows:
            self._bound.load_state(self.state.arrays)

    def _rebuild(self) -> None:
        rp = self._rp = RowParams.from_params([r.params for r in self.rows])
        vocab = self.model.config.vocab_size
        self._seen = self._counts = None
        if rp.uses_repetition:
            self._seen = np.zeros((len(self.rows), vocab), dtype=bool)
            for i, r in enumerate(self.rows):
                if r.seen:
                    self._seen[i, list(r.seen)] = True
        if rp.uses_counts:
            self._counts = np.zeros((len(self.rows), vocab), dtype=np.int32)
            for i, r in enumerate(self.rows):
                for token, n in (r.counts or {}).items():
                    self._counts[i, token] = n
        self._dirty = False

    def _choose_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (B,) and their log-probabilities under the model (before any processing).

        Temperature-only rows take the token the graph already sampled; the others (and rows
        just prefilled) go through the numpy processors on their logits.
        """
        raw = self.logits  # (B, V) float32
        rp = self._rp
        rows_idx = rp.row_index
        from_graph = rp.simple & (self.next_tokens >= 0)
        if from_graph.all():
            tokens = self.next_tokens
            return tokens, raw[rows_idx, tokens] - self.log_z.astype(np.float64)  # float64 as below: batch-invariant
        tokens = self.next_tokens.copy()
        log_z = self.log_z.astype(np.float64)
        need = np.flatnonzero(~from_graph)
        sub = raw[need]
        z = sub - sub.max(axis=1, keepdims=True)  # shifted so the largest logit is 0: exp() is safe
        log_z[need] = log_sum_exp(sub)
        sub_rp = rp if len(need) == len(raw) else rp.take(need)
        rows = [self.rows[i] for i in need]
        x = z
        if sub_rp.uses_repetition or sub_rp.uses_counts or sub_rp.uses_ngrams or sub_rp.uses_custom:
            x = z.astype(np.float64)
            if sub_rp.uses_repetition or sub_rp.uses_counts:
                seen = None if self._seen is None else self._seen[need]
                counts = None if self._counts is None else self._counts[need]
                x = apply_penalties(x, sub_rp, seen, counts)
            for i, row in enumerate(rows) if sub_rp.uses_ngrams else ():
                banned = banned_by_ngrams(list(row.history), row.params.no_repeat_ngram_size)
                if banned:
                    x[i, banned] = -np.inf
            for i, row in enumerate(rows) if sub_rp.uses_custom else ():
                self._apply_processors(row, x, i)
        if sub_rp.all_greedy:
            chosen = x.argmax(axis=1)
        else:
            probs = filtered_probs(x, sub_rp)
            if len(rows) == 1:
                cdf = probs[0].cumsum()
                chosen = np.array([min(int(cdf.searchsorted(rows[0].rng.random() * cdf[-1], "right")), len(cdf) - 1)])
            else:
                uniforms = np.array([0.0 if g else row.rng.random() for row, g in zip(rows, sub_rp.greedy)])
                chosen = draw(probs, uniforms)
            if sub_rp.any_greedy:
                chosen = np.where(sub_rp.greedy, x.argmax(axis=1), chosen)
        tokens[need] = chosen
        return tokens, raw[rows_idx, tokens] - log_z
