"""Decoding state as slots: a fixed-capacity store of rows that the decoding engine steps.

A row joins by writing its state into a free slot and leaves by freeing it;
reorders and copies (beams, compaction) are one gather. Each step feeds one
token per slot up to the highest used one (free slots below it are padding,
stepped and ignored) and samples temperature-only rows' next tokens in the
step graph. The engine (rnngen.decoding.engine) calls only the `SlotStore`
protocol, so the state can live on the host (`HostSlots`, here) or on a device
(rnngen.model.graph_stepper.SlotStepper, the same methods over device buffers).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import numpy as np

from rnngen.errors import InvalidParameterError, OverloadedError
from rnngen.model.loop_graph import LOGITS, TOKENS
from rnngen.model.runtime import RnnModel
from rnngen.model.step_graph import (LOG_Z, NEXT_TOKEN, SAMPLE_GREEDY, SAMPLE_INV_TEMPERATURE, SAMPLE_UNIFORM,
                                     layer_state_name, layer_state_output_name, layer_states, temperature_inputs)


class SlotStore(Protocol):
    """What the engine needs of a slot store. Arrays passed to and returned by `step` are indexed
    by slot and have `rows` entries."""

    capacity: int

    @property
    def rows(self) -> int:
        """Slots stepped: one past the highest used slot."""

    def allocate(self, count: int) -> np.ndarray:
        """The `count` lowest free slots (filled by `write_rows`)."""

    def write_rows(self, slots, state: dict[str, np.ndarray], temperature: np.ndarray | None = None) -> None:
        """Rows join: state (L, n, H) per state name into `slots`, with each row's temperature (0 = greedy)."""

    def free(self, slots) -> None:
        """Rows leave: their slots are padding until handed out again."""

    def gather(self, order) -> None:
        """Slot i takes the row of slot order[i]; slots from len(order) on are free afterwards."""

    def read_rows(self, slots) -> dict[str, np.ndarray]:
        """The state (L, n, H) of `slots` on the host."""

    def step(self, tokens: np.ndarray, uniforms: np.ndarray | None = None) -> np.ndarray:
        """Feed tokens (rows,), draw with uniforms (rows,): the graph-sampled next tokens (rows,).
        Padding slots get valid token ids from the caller (the engine feeds 0 there)."""

    def read_logits(self) -> np.ndarray:
        """The last step's logits (rows, V) (by the slots of that step: read them right after it)."""

    def read_log_z(self) -> np.ndarray:
        """The last step's log softmax denominators (rows,)."""


def bucket_capacity(needed: int, limit: int | None) -> int:
    """The smallest power of two that holds `needed` rows (the limit itself when that is smaller)."""
    size = 1 << max(needed - 1, 0).bit_length()
    return size if limit is None else min(size, limit)


class _Bound:
    """The step graph's inputs and outputs for `rows` rows: host arrays bound once, by address, in two
    IOBindings (one per direction of the state ping-pong: each step reads one state set, writes the other)."""

    def __init__(self, model: RnnModel, rows: int):
        cfg = model.config
        shape = (cfg.num_layers, rows, cfg.hidden_size)
        self.rows = rows
        self.state = [{s: np.zeros(shape, np.float32) for s in model.state_names} for _ in range(2)]
        self.tokens = np.zeros(rows, np.int64)
        self.uniform = np.zeros((rows, 1), np.float32)
        self.inv_temperature = np.ones((rows, 1), np.float32)
        self.greedy = np.ones(rows, dtype=bool)
        self.logits = np.zeros((rows, cfg.vocab_size), np.float32)
        self.next_token = np.zeros(rows, np.int64)
        self.log_z = np.zeros(rows, np.float32)
        self.nbytes = sum(a.nbytes for a in (*self.state[0].values(), *self.state[1].values(), self.tokens, self.uniform,
                                             self.inv_temperature, self.greedy, self.logits, self.next_token, self.log_z))
        inputs = {TOKENS: self.tokens, SAMPLE_UNIFORM: self.uniform, SAMPLE_INV_TEMPERATURE: self.inv_temperature,
                  SAMPLE_GREEDY: self.greedy}
        outputs = {LOGITS: self.logits, NEXT_TOKEN: self.next_token, LOG_Z: self.log_z}
        self.bindings = []
        for parity in (0, 1):
            binding = model.step_session.io_binding()
            # Each layer's state is bound to its slice (rows, H) of the (L, rows, H) arrays.
            ins = {**inputs, **{layer_state_name(s, k): self.state[parity][s][k] for s, k in layer_states(cfg)}}
            outs = {**outputs, **{layer_state_output_name(s, k): self.state[1 - parity][s][k] for s, k in layer_states(cfg)}}
            for name, array in ins.items():
                binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            for name, array in outs.items():
                binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            self.bindings.append(binding)


SHRINK_AFTER_STEPS = 16  # steps the rows must fit smaller arrays before they move there
# Arrays left behind are kept for reuse, by size, up to this many bytes (least recently left go first):
# a server's load moves through the same sizes again and again (each burst of streams ramps up
# through them), and a new pair of bindings costs about 1 ms, the step after it more.
SPARE_BYTES = 32 << 20


def bound_size(rows: int, capacity: int) -> int:
    """Rows the host arrays hold for `rows` stepped rows: rounded up to a multiple of an eighth of the
    largest power of two not above `rows` (exact up to 15 rows; padding rows are stepped and ignored)."""
    if rows <= 0:
        return 0
    step = max(1, (1 << (rows.bit_length() - 1)) // 8)
    return min(-(-rows // step) * step, max(capacity, rows))


class HostSlots:
    """The slot store in host memory, stepped through the step graph with fixed bindings.

    The state of the stepped slots (0 .. rows - 1) lives in host arrays that the step graph reads
    and writes in place (`_Bound`): a step copies in only the tokens and the draws, and allocates
    nothing. The arrays hold `bound_size(rows)` rows (the rows rounded up by at most an eighth,
    see there); when that size changes the rows move to arrays of the new size. They grow at once,
    but shrink only once the rows have fit the smaller size for SHRINK_AFTER_STEPS steps, and the
    arrays last left are kept for reuse: in a server, where a stream ending and the next one
    joining move the top row back and forth across a size, binding new arrays (about 1 ms each
    time) would otherwise come with almost every join and leave. More generally, arrays left at any
    size are kept, by size, up to SPARE_BYTES, so a load that comes back to a size finds them bound.
    `capacity` (the slots the engine keeps records for) grows in powers of two up to
    `max_capacity` (None: no limit).
    """

    def __init__(self, model: RnnModel, max_capacity: int | None = None):
        if max_capacity is not None and max_capacity < 1:
            raise InvalidParameterError(f"capacity: {max_capacity} is not a positive number of slots")
        self.model = model
        self.max_capacity = max_capacity
        self.capacity = 0
        self._used = np.zeros(0, dtype=bool)
        self._temperature = np.zeros(0, dtype=np.float32)
        self._rows = 0
        self._bound: _Bound | None = None
        self._spares: OrderedDict[int, _Bound] = OrderedDict()  # arrays left behind, by rows, oldest first
        self._shrink_in = 0  # steps left before the arrays shrink to the rows' size (0: not due)
        self._parity = 0  # which of the bound state sets holds the current state
        self._sampling_dirty = True  # the bound temperatures are to be rewritten before the next step

    @property
    def rows(self) -> int:
        return self._rows

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        self._used = np.concatenate([self._used, np.zeros(extra, dtype=bool)])
        self._temperature = np.concatenate([self._temperature, np.zeros(extra, dtype=np.float32)])
        self.capacity = capacity

    def _state(self) -> dict[str, np.ndarray]:
        return self._bound.state[self._parity]

    def _rebind(self, rows: int, order: np.ndarray | None = None) -> None:
        """Arrays for `rows` stepped rows; row i takes the current row order[i] (default: row i, as far as both have)."""
        old = self._state() if self._bound is not None else None
        previous = self._bound
        self._bound = (self._spares.pop(rows, None) or _Bound(self.model, rows)) if rows else None
        if previous is not None:
            self._keep_spare(previous)
        self._shrink_in = 0
        self._parity = 0
        self._sampling_dirty = True
        if old is None or self._bound is None:
            return
        if order is None:
            order = np.arange(min(rows, next(iter(old.values())).shape[1]))
        for k, v in self._state().items():
            v[:, : len(order)] = old[k][:, order]

    def _keep_spare(self, bound: _Bound) -> None:
        """Keep arrays left behind for reuse, within SPARE_BYTES (the least recently left go first)."""
        self._spares[bound.rows] = bound
        total = sum(b.nbytes for b in self._spares.values())
        while total > SPARE_BYTES and len(self._spares) > 1:
            total -= self._spares.popitem(last=False)[1].nbytes

    def _size(self) -> int:
        return self._bound.rows if self._bound is not None else 0

    def _set_used(self, slots, used: bool) -> None:
        self._used[slots] = used
        self._sampling_dirty = True
        occupied = np.flatnonzero(self._used)
        self._rows = int(occupied[-1]) + 1 if len(occupied) else 0
        size = bound_size(self._rows, self.capacity)
        if size > self._size() or not self._rows:
            self._rebind(size)
        elif size < self._size():
            self._shrink_in = self._shrink_in or SHRINK_AFTER_STEPS
        else:
            self._shrink_in = 0

    def allocate(self, count: int) -> np.ndarray:
        free = np.flatnonzero(~self._used)
        if len(free) < count:
            needed = int(self._used.sum()) + count
            if self.max_capacity is not None and needed > self.max_capacity:
                raise OverloadedError(f"no room for {count} more rows: {len(free)} of {self.max_capacity} slots are free")
            self._grow(bucket_capacity(max(needed, self.capacity + count - len(free)), self.max_capacity))
            free = np.flatnonzero(~self._used)
        return free[:count]

    def _check_slots(self, slots) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if len(slots) and (slots.min() < 0 or slots.max() >= self.capacity):
            raise InvalidParameterError(f"slots: {slots.tolist()} reach outside 0..{self.capacity - 1}")
        return slots

    def write_rows(self, slots, state: dict[str, np.ndarray], temperature: np.ndarray | None = None) -> None:
        slots = self._check_slots(slots)
        self._set_used(slots, True)
        for k, v in self._state().items():
            v[:, slots] = state[k]
        self._temperature[slots] = 0.0 if temperature is None else temperature

    def free(self, slots) -> None:
        slots = self._check_slots(slots)
        self._temperature[slots] = 0.0
        self._set_used(slots, False)

    def gather(self, order) -> None:
        order = np.asarray(order, dtype=np.int64).reshape(-1)
        if len(order) and (order.min() < 0 or order.max() >= self._rows or not self._used[order].all()):
            raise InvalidParameterError(f"gather: {order.tolist()} names a slot that holds no row")
        n = len(order)
        if n > self.capacity:
            self._grow(bucket_capacity(n, self.max_capacity))
        self._rows = n
        self._sampling_dirty = True
        if bound_size(n, self.capacity) == self._size():  # the same arrays (beams, most compactions): in place
            gathered = {k: v[:, order] for k, v in self._state().items()}
            for k, v in self._state().items():
                v[:, :n] = gathered[k]
        else:
            self._rebind(bound_size(n, self.capacity), order)
        self._temperature[:n] = self._temperature[order]
        self._temperature[n:] = 0.0
        self._used[:] = False
        self._used[:n] = True

    def read_rows(self, slots) -> dict[str, np.ndarray]:
        slots = self._check_slots(slots)
        return {k: v[:, slots] for k, v in self._state().items()}

    def step(self, tokens: np.ndarray, uniforms: np.ndarray | None = None) -> np.ndarray:
        """One token for every stepped row; the drawn tokens (rows,) are a view, valid until the next step."""
        if self._bound is None:
            raise InvalidParameterError("step: no rows; write_rows first")
        if self._shrink_in:
            self._shrink_in -= 1
            if not self._shrink_in:
                self._rebind(bound_size(self._rows, self.capacity))
        bound = self._bound
        if self._sampling_dirty:
            bound.greedy[:], bound.inv_temperature[:, 0] = temperature_inputs(self._temperature[: bound.rows])  # padding: greedy
            self._sampling_dirty = False
        rows = self._rows
        bound.tokens[:rows] = tokens
        if uniforms is not None:
            bound.uniform[:rows, 0] = uniforms
        self.model.step_bound(bound.bindings[self._parity])
        self._parity = 1 - self._parity
        return bound.next_token[:rows]

    def read_logits(self) -> np.ndarray:
        """The last step's logits (rows, V): a view, valid until the next step."""
        return self._bound.logits[: self._rows]

    def read_log_z(self) -> np.ndarray:
        return self._bound.log_z[: self._rows]
