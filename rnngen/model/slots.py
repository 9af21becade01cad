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

from typing import Protocol

import numpy as np

from rnngen.errors import InvalidParameterError, OverloadedError
from rnngen.model.runtime import RnnModel, sampling_feeds
from rnngen.model.step_graph import SAMPLE_UNIFORM


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

    def step(self, tokens: np.ndarray, uniforms: np.ndarray | None = None,
             temperature: np.ndarray | None = None) -> np.ndarray:
        """Feed tokens (rows,), draw with uniforms (rows,): the graph-sampled next tokens (rows,)."""

    def read_logits(self) -> np.ndarray:
        """The last step's logits (rows, V) (by the slots of that step: read them right after it)."""

    def read_log_z(self) -> np.ndarray:
        """The last step's log softmax denominators (rows,)."""


def bucket_capacity(needed: int, limit: int | None) -> int:
    """The smallest power of two that holds `needed` rows (the limit itself when that is smaller)."""
    size = 1 << max(needed - 1, 0).bit_length()
    return size if limit is None else min(size, limit)


class HostSlots:
    """The slot store in host memory, stepped with `RnnModel.step_sample`.

    The state is one (L, capacity, H) array per state name; the capacity grows in powers of two
    (copying the batch once per doubling) up to `max_capacity` (None: no limit). When every slot
    up to the capacity is used, a step feeds and keeps the arrays without copying them.
    """

    def __init__(self, model: RnnModel, max_capacity: int | None = None):
        if max_capacity is not None and max_capacity < 1:
            raise InvalidParameterError(f"capacity: {max_capacity} is not a positive number of slots")
        self.model = model
        self.max_capacity = max_capacity
        self.capacity = 0
        self._state = model.initial_state(0)
        self._used = np.zeros(0, dtype=bool)
        self._temperature = np.zeros(0, dtype=np.float32)
        self._rows = 0
        self._logits = self._log_z = None
        self._feeds = None  # the step graph's sampling inputs, rebuilt when a temperature or the rows change

    @property
    def rows(self) -> int:
        return self._rows

    def free_slots(self) -> int:
        return int((~self._used).sum()) + ((self.max_capacity or 1 << 62) - self.capacity)

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        self._state = {k: np.concatenate([v, np.zeros((v.shape[0], extra, v.shape[2]), np.float32)], axis=1)
                       for k, v in self._state.items()}
        self._used = np.concatenate([self._used, np.zeros(extra, dtype=bool)])
        self._temperature = np.concatenate([self._temperature, np.zeros(extra, dtype=np.float32)])
        self.capacity = capacity

    def _set_used(self, slots, used: bool) -> None:
        self._used[slots] = used
        self._feeds = None
        occupied = np.flatnonzero(self._used)
        self._rows = int(occupied[-1]) + 1 if len(occupied) else 0

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
        for k, v in self._state.items():
            v[:, slots] = state[k]
        self._temperature[slots] = 0.0 if temperature is None else temperature
        self._set_used(slots, True)

    def free(self, slots) -> None:
        slots = self._check_slots(slots)
        self._set_used(slots, False)
        self._temperature[slots] = 0.0

    def gather(self, order) -> None:
        order = np.asarray(order, dtype=np.int64).reshape(-1)
        if len(order) and (order.min() < 0 or order.max() >= self._rows or not self._used[order].all()):
            raise InvalidParameterError(f"gather: {order.tolist()} names a slot that holds no row")
        if len(order) > self.capacity:
            self._grow(bucket_capacity(len(order), self.max_capacity))
        n = len(order)
        for v in self._state.values():
            v[:, :n] = v[:, order]
        self._temperature[:n] = self._temperature[order]
        self._temperature[n:] = 0.0
        self._used[:] = False
        self._set_used(slice(0, n), True)

    def read_rows(self, slots) -> dict[str, np.ndarray]:
        slots = self._check_slots(slots)
        return {k: v[:, slots] for k, v in self._state.items()}

    def step(self, tokens: np.ndarray, uniforms: np.ndarray | None = None,
             temperature: np.ndarray | None = None) -> np.ndarray:
        rows = self._rows
        if temperature is not None:
            self._temperature[:rows] = temperature
            self._feeds = None
        if self._feeds is None:
            self._feeds = sampling_feeds(rows, self._temperature[:rows])
        feeds = self._feeds
        if uniforms is not None:
            feeds[SAMPLE_UNIFORM] = np.asarray(uniforms, dtype=np.float32).reshape(-1, 1)
        whole = rows == self.capacity
        state = self._state if whole else {k: np.ascontiguousarray(v[:, :rows]) for k, v in self._state.items()}
        self._logits, next_tokens, self._log_z, new_state = self.model.step_sample(tokens, state, feeds)
        if whole:
            self._state = new_state
        else:
            for k, v in new_state.items():
                self._state[k][:, :rows] = v
        return next_tokens

    def read_logits(self) -> np.ndarray:
        return self._logits

    def read_log_z(self) -> np.ndarray:
        return self._log_z
