"""The decoding engine: many sequences decoded together as rows in the slots of one state store.

An RNN's state is a fixed-size (layers, hidden) vector per state name and row, so
a batch is a set of slots (rnngen.model.slots): a row joins by writing its state
into a free slot, leaves by freeing it, and rows are copied and reordered (beams,
compaction) by one gather. The other rows do not notice: a row decodes the same
text alone or among any others. Continuous batching in a server rests on that.

Per-row bookkeeping lives in arrays over the slots (tokens generated, limits,
log-probability sums, a window of recent tokens, the penalties' seen sets and
counts only when some row uses them, every row's random generator), so a step
of temperature-only rows runs no Python code per row. Text is made from the
token ids when an update is read (or every step for rows with stop strings,
which must see it).

A step: choose one token for every row from the logits it holds (each row with
its own parameters and random generator), record it, let finished rows leave,
then run the model once for all remaining rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnngen.errors import InvalidParameterError, RnngenError
from rnngen.decoding.details import token_details
from rnngen.decoding.logits import RowParams, apply_penalties, banned_by_ngrams, draw, filtered_weights, log_softmax, log_sum_exp
from rnngen.decoding.params import GenerationParams
from rnngen.decoding.processors import build_processors
from rnngen.decoding.random_streams import SlotGenerators, uniform_draws
from rnngen.decoding.rows import HISTORY_WINDOW, Row, RowSnapshot
from rnngen.model.graph_stepper import SlotStepper
from rnngen.model.runtime import RnnModel, sampling_feeds
from rnngen.model.slots import HostSlots, SlotStore
from rnngen.model.tokenizers import push_tokens
from rnngen.model.units import state_units

FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_STOP = "stop"  # a stop string was generated
FINISH_CANCELLED = "cancelled"  # the caller removed the row
FINISH_ERROR = "error"  # one of the row's logits processors failed (RowUpdate.error says how)
FINISH_INTERRUPTED = "interrupted"  # the caller asked the row to leave early (Row.leave), e.g. a server stopping

WINDOW = HISTORY_WINDOW

# Per-slot arrays: name -> (dtype, value in a free slot). Besides these, a row's count (tokens
# generated) and written (tokens, prompt and output, written to the window ring) grow by one at
# every step for every row, as the ring's column counter does: DecodeEngine._tally keeps both less
# that counter, so a step adds to neither (DecodeEngine._count, _written).
_SLOT_FIELDS = {
    "last": (np.int64, 0),  # the last token: fed to the model at the next step
    "logprob": (np.float64, 0.0),  # summed log-probability of the generated tokens
    "shift": (np.int64, 0),  # the ring column of the row's written token t is (t + shift) % WINDOW
    "decoded": (np.int64, 0),  # generated tokens whose text has been made
    "max_new": (np.int64, 1),
    "has_stops": (np.bool_, False),
    "next": (np.int64, -1),  # the token the graph sampled for the next step (-1: not known)
    "log_z": (np.float32, np.nan),  # the log softmax denominator of the row's logits (nan: not known), as the graph gives it
}
# The sampling parameters per slot, from GenerationParams (RowParams is built from them).
_PARAM_FIELDS = {
    "temperature": (np.float64, "temperature"), "top_k": (np.int64, "top_k"), "top_p": (np.float64, "top_p"),
    "min_p": (np.float64, "min_p"), "repetition": (np.float64, "repetition_penalty"),
    "presence": (np.float64, "presence_penalty"), "frequency": (np.float64, "frequency_penalty"),
    "ngram": (np.int64, "no_repeat_ngram_size"), "custom": (np.bool_, "processors"), "introspect": (np.bool_, "introspect"),
}


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


@dataclass(slots=True)
class RowUpdate:
    """What one step did to one row: the text it added (may be empty) and whether it finished."""

    row: Row
    token: int
    text: str
    finished: bool
    details: dict | None = None  # with params.introspect: see rnngen.decoding.details.token_details
    error: Exception | None = None  # the row ended because of this (its stream gets the error)


class StepUpdates:
    """The rows one step gave a token to, in slot order: arrays, and a RowUpdate per row when read.

    A row's text is made when its update is read; read a step's updates before the next step to
    get each step's own text (text not read is decoded later, into a later update and `Row.text`).
    """

    def __init__(self, engine: "DecodeEngine", rows: np.ndarray, slots: np.ndarray, tokens: np.ndarray,
                 finished: np.ndarray, counts: np.ndarray | None, texts: dict, details: dict, errors: dict,
                 made_ids: dict | None = None):
        self.engine, self.rows, self.slots, self.tokens, self.finished = engine, rows, slots, tokens, finished
        self._counts, self._texts, self._details, self._errors = counts, texts, details, errors
        self._made_ids = made_ids or {}  # position -> ids of the tokens the step made _texts[position] of
        self._step = engine._steps  # with counts None: a row's count then is its count now minus the steps since
        self._count_list: list[int] | None = None
        self._made: dict[int, RowUpdate] = {}

    def _counts_now(self) -> list[int]:
        """Each row's token count at this step (rows still in the engine), worked out once."""
        if self._count_list is None:
            engine = self.engine
            behind = engine._steps - self._step
            if self._counts is not None:
                self._count_list = self._counts.tolist()
            elif engine._live is self.slots and not engine._dirty:  # the rows are where they were
                self._count_list = (engine._count(self.slots) - behind).tolist()
            else:
                self._count_list = [int(engine._count(row.slot)) - behind if row.engine is engine else 0
                                    for row in self.rows]
        return self._count_list

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, i: int) -> RowUpdate:
        if i not in self._made:
            self._make(i, self.rows[i], int(self.tokens[i]), bool(self.finished[i]), self._counts_now()[i])
        return self._made[i]

    def _make(self, i: int, row: Row, token: int, finished: bool, count: int) -> RowUpdate:
        """Row i's update, its text made now (unless the step made it)."""
        text = self._texts.get(i)
        if text is None:
            text = self.engine._decode(row.slot, count) if row.engine is self.engine else ""
        update = self._made[i] = RowUpdate(row, token, text, finished, self._details.get(i), self._errors.get(i))
        return update

    def __iter__(self):
        if len(self._made) == len(self.slots):
            return (self._made[i] for i in range(len(self.slots)))
        return self._make_all()

    def texts(self) -> list[str]:
        """Every row's text from this step, in order: what the updates' `text` would be, without
        making an update per row (for a reader that reads every row's text every step, such as the
        CLI's generation). Its `details` and `errors` are dicts by position."""
        texts = self._kept_up_texts()
        return texts if texts is not None else [update.text for update in self]

    @property
    def made(self) -> dict[int, tuple[str, list[int]]]:
        """The texts this step made, by position, with the ids of the tokens each is made of: rows
        with stop strings (every step), rows whose unread text was due, rows that finished (their
        last text). A reader that takes text now and then (DecodeEngine.unread: a server) rather
        than from every update takes these from each step: nothing else makes them again."""
        return {i: (text, self._made_ids.get(i, [])) for i, text in self._texts.items()}

    @property
    def details(self) -> dict:
        return self._details

    @property
    def errors(self) -> dict:
        return self._errors

    def _make_all(self):
        """Every update in order, the arrays read once (a reader that reads them all every step)."""
        made = self._made
        texts = self._kept_up_texts()  # made all at once: a reader that stops early loses nothing
        if texts is not None:
            for i, (row, token, finished, text) in enumerate(zip(self.rows, self.tokens.tolist(), self.finished.tolist(), texts)):
                made[i] = RowUpdate(row, token, text, finished, self._details.get(i), self._errors.get(i))
            yield from made.values()
            return
        for i, (row, token, finished, count) in enumerate(zip(self.rows, self.tokens.tolist(), self.finished.tolist(),
                                                               self._counts_now())):
            update = made.get(i)
            yield update if update is not None else self._make(i, row, token, finished, count)

    def _kept_up_texts(self) -> list[str] | None:
        """Every row's text when all rows keep up (nothing read yet, read right after the step, every
        row's text made but for this step's token: a reader of every step), else None. Each row's text is its
        token's, through its decoder, without the per-row index work of DecodeEngine._decode. Rows
        with stop strings (and rows whose unread text was due) had theirs made by the step; the
        others' stop filters have no stop strings, so their text passes them unchanged."""
        engine = self.engine
        if self._made or engine._steps != self._step or engine._live is not self.slots or engine._dirty:
            return None
        a = engine._a
        counts = engine._count(self.slots)
        behind = counts - a["decoded"][self.slots]
        if (behind > 1).any():
            return None
        behind = behind.tolist()
        made_by_step = self._texts
        texts = []
        for i, (row, token) in enumerate(zip(self.rows, self.tokens.tolist())):
            text = made_by_step.get(i)
            if text is None:
                text = row.decoder.push(token) if behind[i] else ""
                row.add_text(text)
            texts.append(text)
        a["decoded"][self.slots] = counts
        return texts


def resume(model: RnnModel, snapshot: RowSnapshot, params: GenerationParams, **kw) -> tuple[Row, np.ndarray, BatchState]:
    """A row continued from a snapshot, ready to `add`: its pending token is fed now, exactly as the
    engine would have fed it in the uninterrupted run (the same sampling inputs and random draw)."""
    row = Row.resume(snapshot, params, model.tokenizer, **kw)
    rp = RowParams.from_params([params])
    uniform = np.array([uniform_draws(row.rng) if rp.graph_sampled else 0.0], dtype=np.float32)
    sampling = sampling_feeds(1, np.array([params.temperature], dtype=np.float32), uniform)
    token = np.array([snapshot.pending_token], dtype=np.int64)
    logits, next_tokens, log_z, state = model.step_sample(token, snapshot.state, sampling)
    row.first_sample = (int(next_tokens[0]), float(log_z[0]))
    return row, logits, BatchState(state)


DEVICE_SLOTS = 1024  # slots a CUDA engine holds when no capacity is given (the server passes --max-active)


def default_store(model: RnnModel, capacity: int | None = None) -> SlotStore:
    """Where the rows' state lives: on CUDA in device slots stepped through CUDA graphs (the state
    stays on the device; tokens, logits and log-z come back), elsewhere in host arrays."""
    if model.device == "cuda":
        return SlotStepper(model, capacity or DEVICE_SLOTS)
    return HostSlots(model, capacity)


class DecodeEngine:
    """Rows in the slots of one state store, stepped together with one model call per step.

    `store`: where the state lives (default: `default_store`: on CUDA a SlotStepper with
    `capacity` or DEVICE_SLOTS slots, elsewhere HostSlots, whose slot records grow in powers of two
    up to `capacity` rows, None: no limit). Any other SlotStore plugs in here.
    """

    def __init__(self, model: RnnModel, store: SlotStore | None = None, capacity: int | None = None):
        self.model = model
        self.store = store if store is not None else default_store(model, capacity)
        self._interrupting = False  # set by interrupt(): the rows leave after their next token
        self._vocab = model.config.vocab_size
        self._capacity = 0
        self._a = {name: np.zeros(0, dtype) for name, (dtype, _) in _SLOT_FIELDS.items()}
        self._p = {name: np.zeros(0, dtype) for name, (dtype, _) in _PARAM_FIELDS.items()}
        self._used = np.zeros(0, dtype=bool)
        self._row_at = np.empty(0, dtype=object)  # the Row in each slot (None: free)
        self._tally = np.zeros((0, 2), dtype=np.int64)  # per slot: count and written, less _ring_at (see _count)
        # Each slot's last WINDOW tokens. Every row's token of one step goes to the same column,
        # ring_at % WINDOW, so that a step writes one column (each row's "shift" says where its tokens are).
        self._ring = np.zeros((0, WINDOW), dtype=np.int32)
        self._ring_at = 0  # tokens each row has been given since the engine began: the next column
        self._rng = SlotGenerators()
        self._seen: np.ndarray | None = None  # (capacity, V) bool, once a row uses the repetition penalty
        self._counts: np.ndarray | None = None  # (capacity, V) int32, once a row uses presence/frequency penalties
        self._logits = np.zeros((0, self._vocab), dtype=np.float32)  # the last step's logits, by slot
        self._out: tuple[np.ndarray, np.ndarray] | None = None  # the last step's tokens and log-z, not yet settled
        self._fresh: dict[int, np.ndarray] = {}  # slot -> logits (V,) of a row that joined after that step
        self._n = 0
        self._live = np.zeros(0, dtype=np.int64)  # used slots, ascending (rebuilt on membership changes)
        self._rp: RowParams | None = None
        self._all_sampled = True  # every row's next token was drawn in the graph at the last step
        self._steps = 0  # steps taken (each gives every row one token)
        self._dirty = True

    def __len__(self) -> int:
        return self._n

    @property
    def rows(self) -> list[Row]:
        """The rows, in slot order."""
        return list(self._row_at[np.flatnonzero(self._used)])

    # -- membership ------------------------------------------------------------------------

    def prefill(self, prompt_ids: list[int]) -> tuple[np.ndarray, BatchState]:
        """The prompt through RnnModel.prefill (chunked): next-token logits (1, V) and the state after it."""
        logits, state = self.model.prefill(prompt_ids)
        return logits, BatchState(state)

    def add(self, rows: list[Row], logits: np.ndarray, state: BatchState) -> None:
        """New rows join at the next step; `logits` (k, V) and `state` hold their k rows."""
        if len(rows) != logits.shape[0] or len(rows) != state.size:
            raise ValueError("rows, logits and state must have the same number of rows")
        for row in rows:
            row.params.check_for_vocab(self._vocab)
            if row.engine is not None:
                raise ValueError("a row joins one engine once; copy it with Row.clone()")
            if row.params.processors and len(row.logit_processors) != len(row.params.processors):
                # Callers that know plugin processors build them first (Generation, the server).
                row.logit_processors = build_processors(row.params.processors, self.model.tokenizer)
            if row.params.units and not row.units:
                row.units = state_units(row.params.units, self.model.config)
        self._settle()
        slots = self.store.allocate(len(rows))
        if self.store.capacity > self._capacity:
            self._grow(self.store.capacity)
        temperature = np.array([r.params.temperature for r in rows], dtype=np.float32)
        self.store.write_rows(slots, state.arrays, temperature)
        for j, (row, slot) in enumerate(zip(rows, slots.tolist())):
            self._attach(row, slot)
            self._fresh[slot] = np.asarray(logits[j], dtype=np.float32)
        self._n += len(rows)
        self._all_sampled = False  # the new rows' first tokens are chosen from their logits
        self._dirty = True

    def select(self, indices: list[int], rows: list[Row] | None = None) -> None:
        """Keep rows by index (into `rows`, in slot order), in this order: drop, copy (an index twice)
        or reorder, in one gather.

        Rows given in `rows` replace the kept ones (a copied row must be a clone, not the same object).
        """
        live = np.flatnonzero(self._used)
        order = live[np.asarray(list(indices), dtype=np.int64)] if len(indices) else np.zeros(0, dtype=np.int64)
        new_rows = list(rows) if rows is not None else [self._row_at[s] for s in order]
        if len({id(r) for r in new_rows}) != len(new_rows):
            raise ValueError("a copied row must be a Row.clone(), not the same object twice")
        kept = {id(r) for r in new_rows}
        for slot in live:
            row = self._row_at[slot]
            if id(row) not in kept:
                self.sync(row, decode=True)
                self._detach(row)
        self._gather(order, new_rows)

    def remove(self, *rows: Row, reason: str = FINISH_CANCELLED) -> None:
        """Rows leave now (cancelled streams), together; the others go on untouched."""
        if any(row.engine is not self for row in rows):
            raise ValueError("the row is not in this engine")
        slots = np.array([row.slot for row in rows], dtype=np.int64)
        for row in rows:
            row.finish_reason = row.finish_reason or reason
            self.sync(row, decode=True)
        self._leave(slots)

    def sync(self, row: Row, decode: bool = False) -> None:
        """Write the row's record back from the slot arrays (and, with `decode`, make its pending text)."""
        slot, a = row.slot, self._a
        row._count, row._last_token, row._logprob = int(self._count(slot)), int(a["last"][slot]), float(a["logprob"][slot])
        row._history.clear()
        row._history.extend(self._window(slot).tolist())
        if row._seen is not None:
            row._seen = set(np.flatnonzero(self._seen[slot]).tolist())
        if row._counts is not None:
            present = np.flatnonzero(self._counts[slot])
            row._counts = dict(zip(present.tolist(), self._counts[slot, present].tolist()))
        self._rng.store(slot, row.rng)
        if decode:
            self._decode(slot)

    def unread(self, rows: list[Row] | None = None) -> list[tuple[Row, str, list[int]]]:
        """Every row's tokens whose text nobody has made yet (neither read in an update nor made by
        a step: see StepUpdates.made), as (row, their text, their ids), made now. A reader that
        takes text now and then instead of from every update (a server) calls this when it wants
        it; `rows`: only these rows (those of them still in this engine)."""
        a = self._a
        if rows is None:
            slots = np.flatnonzero(self._used) if self._dirty else self._live
        else:
            slots = np.array([row.slot for row in rows if row.engine is self], dtype=np.int64)
        out = []
        for slot in slots[self._count(slots) > a["decoded"][slots]].tolist():
            ids: list[int] = []
            text = self._decode(slot, ids=ids)
            out.append((self._row_at[slot], text, ids))
        return out

    def interrupt(self, resumable: bool) -> None:
        """Every row leaves after its next token, its text unflushed (FINISH_INTERRUPTED); with
        `resumable` its state is kept, so that its session continues elsewhere (a server draining)."""
        for row in self.rows:
            row.leave = True
            row.capture_state = row.capture_state or resumable
        self._interrupting = bool(self.rows)

    # -- one step ---------------------------------------------------------------------------

    def log_probs(self) -> np.ndarray:
        """Every row's log-probabilities (rows in slot order, vocabulary) for its next token after its
        penalties, n-gram bans and processors, without temperature, top-k/p or min-p: what beam search
        ranks. A failing processor raises its error (see Row.error)."""
        if self._dirty:
            self._rebuild()
        live = self._live
        x, failed = self._processed(live, self._rp, self._logits_of(live).astype(np.float64))
        if failed:
            raise self._row_at[live[failed[0]]].error
        return log_softmax(x)

    def step(self, tokens: np.ndarray | None = None) -> StepUpdates:
        """Pick a token for every row (or take `tokens`, one per row in slot order, chosen by the caller:
        beam search), record it, let finished rows leave, run the model once."""
        if not self._n:
            return StepUpdates(self, np.empty(0, dtype=object), *(np.zeros(0, dtype=np.int64),) * 2,
                               np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64), {}, {}, {})
        if self._dirty:
            self._rebuild()
        live, a = self._live, self._a
        if tokens is None:
            tokens, logprobs, failed = self._choose_tokens(live)
        else:
            tokens, failed = np.asarray(tokens, dtype=np.int64), []
            logprobs = self._logit_at(live, tokens) - self._log_z(live)
        details = self._details(live, tokens) if self._rp.any_introspect else {}
        if failed:
            ok = np.ones(len(live), dtype=bool)
            ok[failed] = False
            self._record(live[ok], tokens[ok], logprobs[ok])
            self._tally[live[~ok]] -= 1  # no token for these rows (they leave now): their tallies stay
        else:
            ok = self._all_ok
            self._record(self._slot_range if self._contiguous else live, tokens, logprobs)
        counts = None  # each row's count, read only where needed (StepUpdates works it out otherwise)
        # Steps to the first length limit and to the first row whose unread text must be made are
        # counted down (every row gains one token a step), so most steps check neither per row.
        self._length_due -= 1
        self._decode_due -= 1
        if self._length_due <= 0 or failed or self._interrupting or self._stop_positions:
            counts = self._count(live)
            finished = (counts >= a["max_new"][live]) | ~ok
            self._length_due = int((a["max_new"][live] - counts).min())
        else:
            finished = self._none_finished
        if self._interrupting:  # every row leaves after this token (see interrupt)
            finished[:] = True
            self._interrupting = False
        texts: dict[int, str] = {}
        made_ids: dict[int, list[int]] = {}  # the tokens each text made here is made of (StepUpdates.made)
        for i in self._stop_positions:  # rows with stop strings see their text every step
            if ok[i]:
                texts[i] = self._decode(live[i], ids=made_ids.setdefault(i, []))
                finished[i] |= self._row_at[live[i]].stops.stopped
        if self._decode_due <= 0:
            # Text nobody read is made before the window forgets its tokens (it comes with this update).
            counts = self._count(live) if counts is None else counts
            behind = counts - a["decoded"][live]
            for i in np.flatnonzero(behind >= WINDOW // 2).tolist():
                texts[i] = texts.get(i, "") + self._decode(live[i], ids=made_ids.setdefault(i, []))
                behind[i] = 0
            self._decode_due = WINDOW // 2 - int(behind.max())
        errors = {}
        if finished is not self._none_finished:
            ends = np.flatnonzero(finished)
            if len(ends):
                self._finish(live, ends, ok, texts, errors, made_ids)
        self._steps += 1
        updates = StepUpdates(self, self._live_rows, live, tokens, finished, counts, texts, details, errors, made_ids)
        if self._n:
            self._run_model()
        return updates

    def _finish(self, live: np.ndarray, ends: np.ndarray, ok: np.ndarray, texts: dict, errors: dict,
                made_ids: dict) -> None:
        """Finished rows: their last text (flushed unless they will be resumed), state kept if asked, slots freed."""
        a = self._a
        slots = live[ends]
        capture = [s for s in slots.tolist() if self._row_at[s].capture_state]
        if capture:
            state = self.store.read_rows(np.array(capture))
            for j, slot in enumerate(capture):
                self._row_at[slot].final_state = {k: v[:, j : j + 1].copy() for k, v in state.items()}
        for i in ends.tolist():
            slot = int(live[i])
            row = self._row_at[slot]
            text = texts.get(i, "") + self._decode(slot, ids=made_ids.setdefault(i, []))
            if not ok[i]:
                row.finish_reason = FINISH_ERROR
                errors[i] = row.error
            elif row.stops.stopped:
                row.finish_reason = FINISH_STOP
            elif row.leave and self._count(slot) < a["max_new"][slot]:
                row.finish_reason = FINISH_INTERRUPTED  # unflushed: its continuation elsewhere shows the rest
            else:
                if not row.capture_state:  # a row to be resumed keeps unfinished text for its continuation
                    tail = row.stops.push(row.decoder.flush()) + row.stops.flush()
                    row.add_text(tail)
                    text += tail
                row.finish_reason = FINISH_STOP if row.stops.stopped else FINISH_LENGTH
            texts[i] = text
            self.sync(row)
        self._leave(slots)

    def _count(self, slots):
        """Tokens the rows in `slots` (a slot, an array or a slice) have generated."""
        return self._tally[slots, 0] + self._ring_at

    def _written(self, slots):
        """Tokens, prompt and output, the rows in `slots` have written to the ring."""
        return self._tally[slots, 1] + self._ring_at

    def _record(self, slots: np.ndarray | slice, tokens: np.ndarray, logprobs: np.ndarray) -> None:
        """The slots' new tokens into their records (`slots`: an index array, or a slice over every used slot)."""
        a = self._a
        index = self._rp.row_index if isinstance(slots, slice) else slots  # seen and counts want an array of rows
        # count and written grow with _ring_at (see _count)
        a["logprob"][slots] += logprobs
        a["last"][slots] = tokens
        self._ring[slots, self._ring_at % WINDOW] = tokens
        self._ring_at += 1
        if self._seen is not None:
            self._seen[index, tokens] = True
        if self._counts is not None:
            self._counts[index, tokens] += 1

    def _run_model(self) -> None:
        """One batched model call; temperature-only rows get their next token sampled in the graph."""
        if self._dirty:
            self._rebuild()
        rows, a = self.store.rows, self._a
        uniforms = None
        if self._all_draw:
            uniforms = self._rng.random_range(rows)
        elif len(self._draw_slots):
            uniforms = np.zeros(rows, dtype=np.float32)
            uniforms[self._draw_slots] = self._rng.random(self._draw_slots)
        # The sampled tokens and log-z stay where the store put them until a step or a membership
        # change needs them in the slot arrays (_settle): most steps read them there directly.
        self._out = (self.store.step(a["last"][:rows], uniforms), self.store.read_log_z())
        self._logits = self.store.read_logits()
        self._fresh.clear()
        self._all_sampled = True

    def _settle(self) -> None:
        """The last step's sampled tokens and log-z into the slot arrays (before they are read there
        or the slots change)."""
        if self._out is not None:
            rows = len(self._out[0])
            self._a["next"][:rows], self._a["log_z"][:rows] = self._out
            self._out = None

    @staticmethod
    def _apply_processors(row: Row, x: np.ndarray, i: int, history: list[int]) -> bool:
        """The row's own processors on its logits x[i]; a failure ends this row only (see Row.error)."""
        original = x[i].copy()
        for spec, process in zip(row.params.processors, row.logit_processors):
            try:
                x[i] = process(x[i], history)
                if not np.isfinite(x[i]).any():
                    raise InvalidParameterError(f"processor {spec}: no token is left to choose")
            except Exception as exc:
                row.error = exc if isinstance(exc, RnngenError) else RnngenError(
                    f"processor {spec} failed: {type(exc).__name__}: {exc}")
                x[i] = original  # any token will do: the row ends at this step
                return False
        return True

    def _processed(self, slots: np.ndarray, rp: RowParams, logits: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """The slots' logits after their penalties, n-gram bans and processors (steps 1-3 of
        rnngen.decoding.logits), and the positions of rows whose processors failed."""
        if not (rp.uses_repetition or rp.uses_counts or rp.uses_ngrams or rp.uses_custom):
            return logits, []
        x = logits.astype(np.float64)
        if rp.uses_repetition or rp.uses_counts:
            seen = None if self._seen is None else self._seen[slots]
            counts = None if self._counts is None else self._counts[slots]
            x = apply_penalties(x, rp, seen, counts)
        for j in np.flatnonzero(rp.no_repeat_ngram > 0).tolist():
            banned = banned_by_ngrams(self._window(slots[j]).tolist(), int(rp.no_repeat_ngram[j]))
            if banned:
                x[j, banned] = -np.inf
        failed = [j for j in np.flatnonzero(rp.custom).tolist()
                  if not self._apply_processors(self._row_at[slots[j]], x, j, self._window(slots[j]).tolist())]
        return x, failed

    def _log_z(self, slots: np.ndarray) -> np.ndarray:
        """The log softmax denominators of the slots' logits (computed where the graph did not give one)."""
        self._settle()
        log_z = self._a["log_z"][slots]
        unknown = np.isnan(log_z)
        if unknown.any():
            log_z[unknown] = log_sum_exp(self._logits_of(slots[unknown]).astype(np.float64))
        return log_z

    def _details(self, live: np.ndarray, tokens: np.ndarray) -> dict[int, dict]:
        """Per-token introspection for the rows that asked for it (the state is read back only if units are wanted)."""
        asked = np.flatnonzero(self._rp.introspect)
        slots = live[asked]
        rows = self._row_at[slots]
        state = self.store.read_rows(slots) if any(row.units for row in rows) else None
        logits = self._logits_of(slots)
        tokenizer = self.model.tokenizer
        return {int(i): token_details(logits[j], int(tokens[i]), row.params.top_alternatives, tokenizer, row.units, state, j)
                for j, (i, row) in enumerate(zip(asked.tolist(), rows))}

    def _choose_tokens(self, live: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Tokens (k,), their log-probabilities under the model (before any processing), and the
        positions of rows whose processors failed.

        Temperature-only rows take the token the graph already sampled; the others (and rows
        just joined) go through the numpy processors on their logits.
        """
        rp, a = self._rp, self._a
        if self._all_simple and self._all_sampled:  # every row's token was drawn by the graph
            drawn, log_z = self._out if self._out is not None else (a["next"], a["log_z"])
            if self._contiguous:  # slices: cheaper than index arrays
                tokens = drawn[: len(live)].copy()
                return tokens, self._logits[rp.row_index, tokens] - log_z[: len(live)], []
            tokens = drawn[live]
            return tokens, self._logits[live, tokens] - log_z[live], []
        self._settle()
        tokens = a["next"][live]
        if self._all_sampled:  # the rows that choose on the host are the non-simple ones: known since _rebuild
            need, sub_rp = self._host_rows, self._host_rp
        else:
            from_graph = rp.simple & (tokens >= 0)
            if from_graph.all():
                return tokens, self._logit_at(live, tokens) - a["log_z"][live], []
            need = np.flatnonzero(~from_graph)
            sub_rp = rp if len(need) == len(live) else rp.take(need)
        slots = live[need]
        x, failed = self._processed(slots, sub_rp, self._logits_of(slots))
        failed = need[failed].tolist()
        if sub_rp.all_greedy:
            chosen = x.argmax(axis=1)
        else:
            if self._contiguous and len(need) == len(live) and not sub_rp.any_greedy:
                uniforms = self._rng.random_range(len(live))  # every slot from 0 draws: no index arrays
            else:
                drawing = np.flatnonzero(~sub_rp.greedy)
                uniforms = np.zeros(len(need))
                uniforms[drawing] = self._rng.random(slots[drawing])
            chosen = draw(filtered_weights(x, sub_rp), uniforms)
            if sub_rp.any_greedy:
                chosen = np.where(sub_rp.greedy, x.argmax(axis=1), chosen)
        tokens = tokens.copy()
        tokens[need] = chosen
        return tokens, self._logit_at(live, tokens) - self._log_z(live), failed

    # -- slot bookkeeping -------------------------------------------------------------------

    def _grow(self, capacity: int) -> None:
        extra = capacity - self._capacity
        for table, fields in ((self._a, _SLOT_FIELDS), (self._p, _PARAM_FIELDS)):
            for name, (dtype, fill) in fields.items():
                table[name] = np.concatenate([table[name], np.full(extra, fill if table is self._a else 0, dtype=dtype)])
        self._tally = np.concatenate([self._tally, np.zeros((extra, 2), dtype=np.int64)])
        self._used = np.concatenate([self._used, np.zeros(extra, dtype=bool)])
        self._row_at = np.concatenate([self._row_at, np.empty(extra, dtype=object)])
        self._ring = np.concatenate([self._ring, np.zeros((extra, WINDOW), dtype=np.int32)])
        if self._seen is not None:
            self._seen = np.concatenate([self._seen, np.zeros((extra, self._vocab), dtype=bool)])
        if self._counts is not None:
            self._counts = np.concatenate([self._counts, np.zeros((extra, self._vocab), dtype=np.int32)])
        self._rng.grow(capacity)
        self._capacity = capacity

    def _attach(self, row: Row, slot: int) -> None:
        """The row's record into the slot arrays; from now on the engine keeps it."""
        a, p, params = self._a, self._p, row.params
        for name, (_, attr) in _PARAM_FIELDS.items():
            value = getattr(params, attr)
            p[name][slot] = bool(value) if name == "custom" else value
        self._tally[slot, 0], a["decoded"][slot] = row._count - self._ring_at, row._count
        a["last"][slot], a["logprob"][slot] = row._last_token, row._logprob
        history = list(row._history)[-WINDOW:]
        a["shift"][slot] = (self._ring_at - len(history)) % WINDOW  # the row's next token goes to ring_at's column
        self._ring[slot, (np.arange(len(history)) + a["shift"][slot]) % WINDOW] = history
        self._tally[slot, 1] = len(history) - self._ring_at
        a["max_new"][slot], a["has_stops"][slot] = params.max_new_tokens, bool(params.stop)
        first, row.first_sample = row.first_sample, None  # a resumed row's first token, sampled in the graph
        a["next"][slot], a["log_z"][slot] = first if first else (-1, np.nan)
        if row._seen is not None:
            if self._seen is None:
                self._seen = np.zeros((self._capacity, self._vocab), dtype=bool)
            self._seen[slot] = False
            self._seen[slot, list(row._seen)] = True
        if row._counts is not None:
            if self._counts is None:
                self._counts = np.zeros((self._capacity, self._vocab), dtype=np.int32)
            self._counts[slot] = 0
            for token, n in row._counts.items():
                self._counts[slot, token] = n
        self._rng.load(slot, row.rng)
        self._used[slot] = True
        self._row_at[slot] = row
        row.engine, row.slot = self, slot

    def _detach(self, row: Row) -> None:
        slot = row.slot
        self._row_at[slot] = None
        self._used[slot] = False
        self._a["last"][slot] = 0  # a free slot is stepped as padding with a valid token
        self._fresh.pop(slot, None)
        row.engine, row.slot = None, -1

    def _leave(self, slots: np.ndarray) -> None:
        """Rows leave their slots (already synced); the store compacts when most stepped slots are padding."""
        self._settle()
        for slot in slots.tolist():
            self._detach(self._row_at[slot])
        self.store.free(slots)
        self._n -= len(slots)
        self._dirty = True
        if self._n and self.store.rows > 2 * self._n:
            live = np.flatnonzero(self._used)
            self._gather(live, list(self._row_at[live]))

    def _gather(self, order: np.ndarray, rows: list[Row]) -> None:
        """Slot i takes the record of slot order[i] and holds rows[i]; the slots after are free."""
        self._settle()
        n = len(order)
        logits = self._logits_of(order) if n else None
        if n:
            self.store.gather(order)  # copies may need more slots than there were rows
            if self.store.capacity > self._capacity:
                self._grow(self.store.capacity)
        else:
            self.store.free(np.arange(self.store.rows))
        for table, fields in ((self._a, _SLOT_FIELDS), (self._p, _PARAM_FIELDS)):
            for name, (_, fill) in fields.items():
                arr = table[name]
                arr[:n] = arr[order]
                arr[n:] = fill if table is self._a else 0
        for extra in (self._tally, self._ring, self._seen, self._counts):
            if extra is not None:
                extra[:n] = extra[order]
        self._tally[n:] = 0
        self._rng.gather(order)
        self._row_at[:] = None
        self._used[:] = False
        self._used[:n] = True
        for slot, row in enumerate(rows):
            self._row_at[slot] = row
            row.engine, row.slot = self, slot
        self._logits = logits if n else self._logits[:0]
        self._fresh.clear()
        self._n = n
        self._dirty = True

    def _rebuild(self) -> None:
        """Per-membership arrays: the used slots and their sampling parameters."""
        live = self._live = np.flatnonzero(self._used)
        p = {name: arr[live] for name, arr in self._p.items()}
        rp = self._rp = RowParams(p["temperature"], p["top_k"], p["top_p"], p["min_p"], p["repetition"], p["presence"],
                                  p["frequency"], p["ngram"], p["custom"], bool(p["introspect"].any()))
        rp.introspect = p["introspect"]
        self._stop_positions = np.flatnonzero(self._a["has_stops"][live]).tolist()
        self._draw_slots = live[rp.graph_sampled]
        n = len(live)
        self._contiguous = n == self.store.rows  # the used slots are 0 .. n-1: slices, not index arrays
        self._slot_range = slice(0, n)
        self._all_simple = bool(rp.simple.all())
        self._host_rows = np.flatnonzero(~rp.simple)  # rows whose tokens are chosen on the host (graph ones aside)
        host = len(self._host_rows)  # their parameters are taken only when there are some (rows join and leave often)
        self._host_rp = rp if host == n else rp.take(self._host_rows) if host else None
        self._all_draw = self._contiguous and len(self._draw_slots) == n
        self._live_rows = self._row_at[live]
        self._all_ok = np.ones(n, dtype=bool)
        self._none_finished = np.zeros(n, dtype=bool)
        self._none_finished.flags.writeable = False  # shared by the steps' updates
        counts = self._count(live)
        self._length_due = int((self._a["max_new"][live] - counts).min()) if n else 0
        self._decode_due = WINDOW // 2 - int((counts - self._a["decoded"][live]).max()) if n else 0
        self._dirty = False

    def _window(self, slot: int) -> np.ndarray:
        """The slot's last WINDOW tokens (prompt and output), oldest first."""
        written, shift = int(self._written(slot)), int(self._a["shift"][slot])
        return self._ring[slot, (np.arange(max(written - WINDOW, 0), written) + shift) % WINDOW]

    def _decode(self, slot: int, upto: int | None = None, ids: list | None = None) -> str:
        """The text of the slot's generated tokens not yet decoded (up to token `upto`), into its row
        (and their ids onto `ids`, when given)."""
        a = self._a
        count_less, written_less = self._tally[slot].tolist()  # both less the ring's counter (see _count)
        upto = count_less + self._ring_at if upto is None else int(upto)
        done = int(a["decoded"][slot])
        if upto <= done:
            return ""
        row = self._row_at[slot]
        # Past the last token's column: written - (count - upto) + shift, where the counter cancels out.
        end = written_less - count_less + upto + int(a["shift"][slot])
        if upto - done == 1:  # a reader that keeps up: one token, no index array
            token = int(self._ring[slot, (end - 1) % WINDOW])
            text = row.decoder.push(token)
            if ids is not None:
                ids.append(token)
        else:
            tokens = self._ring[slot, np.arange(end - (upto - done), end) % WINDOW].tolist()
            text = push_tokens(row.decoder, tokens)
            if ids is not None:
                ids.extend(tokens)
        text = row.stops.push(text)
        a["decoded"][slot] = upto
        row.add_text(text)
        return text

    def _logits_of(self, slots: np.ndarray) -> np.ndarray:
        """The logits (k, V) each slot's next token is chosen from."""
        if not self._fresh:
            return self._logits[slots]
        out = np.zeros((len(slots), self._vocab), dtype=np.float32)
        known = slots < len(self._logits)
        out[known] = self._logits[slots[known]]
        for slot, logits in self._fresh.items():
            out[slots == slot] = logits
        return out

    def _logit_at(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        if not self._fresh:
            return self._logits[slots, tokens]
        return self._logits_of(slots)[np.arange(len(slots)), tokens]
