"""Continuous batching: one scheduler per model owns a decoding engine and its thread.

Every step decodes all active streams together in one batched model call. A
new request is prefilled in its own (handler) thread, then joins at the next
step; a finished or cancelled stream leaves at once, and its row is free for
the next request. Capacity is bounded: at most `max_active` rows decode, at
most `max_queued` accepted requests wait for a row; beyond that, `reserve`
refuses at once (the server answers RESOURCE_EXHAUSTED) and the accepted
streams keep their pace.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from rnngen.decoding.engine import BatchState, DecodeEngine, Row
from rnngen.errors import OverloadedError, RnngenError, ShuttingDownError
from rnngen.model.runtime import RnnModel

END = object()  # posted after a stream's last update

Delivery = list  # [(Stream, RowUpdate | Exception | END), ...] from one step, handed over in one call


@dataclass
class Stream:
    """One client's stream. The scheduler posts its updates through the server's sink into `inbox`."""

    row: Row
    prompt_tokens: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    inbox: list = field(default_factory=list)  # filled by the sink, drained by the stream's reader
    ready: object = None  # the reader's wake-up (an asyncio.Event in the server)

    def cancel(self) -> None:
        """Ask for the row to leave; the scheduler frees it at its next step boundary."""
        self.cancelled.set()


class Scheduler:
    def __init__(self, model: RnnModel, name: str, sink: Callable[[Delivery], None], max_active: int = 256,
                 max_queued: int = 512, per_stream: bool = False, metrics=None):
        self.model = model
        self.sink = sink  # receives each step's updates in one call (thread-safe on the receiving side)
        self.name = name
        self.max_active = max_active
        self.max_queued = max_queued
        # per_stream: the benchmark's baseline, one model call per stream per step (no batching).
        self.per_stream = per_stream
        self.metrics = metrics
        self._engines: list[DecodeEngine] = [] if per_stream else [DecodeEngine(model, capacity=max_active)]
        self._waiting: deque[tuple[Stream, np.ndarray, BatchState]] = deque()
        self._reserved = 0  # accepted requests not yet in the engine (prefilling or waiting)
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"rnngen-scheduler-{name}", daemon=True)
        self._thread.start()

    # -- admission --------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return sum(len(e) for e in self._engines)

    @property
    def queued(self) -> int:
        return self._reserved

    def reserve(self) -> None:
        """Take a place for a new stream, or fail at once when the server is full."""
        with self._lock:
            if self._stopping:
                raise ShuttingDownError("server is shutting down")
            if self.active + self._reserved >= self.max_active + self.max_queued:
                raise OverloadedError(
                    f"model {self.name!r} is at capacity ({self.max_active} active streams, "
                    f"{self.max_queued} queued); retry later"
                )
            self._reserved += 1
            self._report()

    def release(self) -> None:
        """Give back a reservation that did not become a stream (bad input found during prefill)."""
        with self._lock:
            self._reserved -= 1
            self._report()

    def enqueue(self, stream: Stream, logits: np.ndarray, state: BatchState) -> None:
        """A prefilled stream joins at the next step (its reservation becomes the row)."""
        with self._lock:
            self._waiting.append((stream, logits, state))
            self._lock.notify()

    # -- the decoding loop --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._admit()
                while not self.active and not self._stopping:
                    self._lock.wait()
                    self._admit()
                if self._stopping and not self.active and not self._waiting:
                    return
            self._drop_cancelled()
            delivery: Delivery = []
            for engine in self._engines:
                try:
                    updates = engine.step()
                except Exception as exc:  # a failing step ends its rows' streams, not the server
                    self._fail(engine, exc, delivery)
                    continue
                for update in updates:
                    if update.error is not None:  # this stream alone ends, with the reason
                        delivery += [(update.row.tag, update.error), (update.row.tag, END)]
                        continue
                    delivery.append((update.row.tag, update))
                    if update.finished:
                        delivery.append((update.row.tag, END))
                if self.metrics and updates:
                    self.metrics.tokens(self.name, len(updates))
            if delivery:
                self.sink(delivery)
            if self.per_stream:
                self._engines = [e for e in self._engines if len(e)]
            with self._lock:
                self._report()

    def _admit(self) -> None:
        while self._waiting and self.active < self.max_active:
            stream, logits, state = self._waiting.popleft()
            self._reserved -= 1
            if stream.cancelled.is_set():
                self.sink([(stream, END)])
                continue
            if self.per_stream:
                engine = DecodeEngine(self.model)
                self._engines.append(engine)
            else:
                engine = self._engines[0]
            engine.add([stream.row], logits, state)
            if self.metrics:
                self.metrics.queue_wait(time.perf_counter() - stream.enqueued_at)

    def _drop_cancelled(self) -> None:
        gone = []
        for engine in self._engines:
            for row in [r for r in engine.rows if r.tag.cancelled.is_set()]:
                engine.remove(row)
                gone.append((row.tag, END))
        if gone:
            self.sink(gone)

    def _fail(self, engine: DecodeEngine, exc: Exception, delivery: Delivery) -> None:
        for row in list(engine.rows):
            delivery += [(row.tag, exc), (row.tag, END)]
            engine.remove(row, reason="error")

    def _report(self) -> None:
        if self.metrics:
            self.metrics.load(self.name, self.active, self._reserved)

    # -- shutdown -----------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
