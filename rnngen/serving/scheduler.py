"""Continuous batching: one scheduler per model owns a decoding engine and its thread.

Every step decodes all active streams together in one batched model call.
Between two steps the scheduler runs one round of prefill (rnngen.serving.prefill:
chunked, batched, shortest prompt first, with the prefix-state cache), so a
long prompt never stalls the decoding streams and a short one never waits
behind it; all prompts done by a step boundary join in one batched admission;
a finished or cancelled stream leaves at once, and its row is free for the next
request. Capacity is bounded: at most `max_active` rows decode, at most
`max_queued` accepted requests wait for a row; beyond that, `reserve` refuses
at once (the server answers RESOURCE_EXHAUSTED) and the accepted streams keep
their pace. Each step hands the Outbox what cannot wait (first tokens, ends,
the text the step made for stop-string rows and rows whose unread text was due,
introspection details) in one call; the other rows' text is made and handed
over once per delivery interval (rnngen.serving.delivery), not at every step.

When a server stops before its streams end, `interrupt` makes every row leave
after its next token: with resumable sessions each row leaves with its state
(its stream's last message carries a session token to continue elsewhere),
otherwise its stream ends with UNAVAILABLE. A prompt still prefilling ends
with UNAVAILABLE (before any message: a client sends it to another server).
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from rnngen.decoding.engine import BatchState, DecodeEngine
from rnngen.errors import OverloadedError, ShuttingDownError
from rnngen.model.runtime import RnnModel
from rnngen.serving.delivery import Outbox, Stream
from rnngen.serving.prefill import PrefillJob, Prefiller

STOPPED_BEFORE_THE_END = "the server stopped before the stream finished; retry on another server"
STOPPED_BEFORE_THE_START = "the server stopped before the stream started; retry on another server"


class Scheduler:
    def __init__(self, model: RnnModel, name: str, outbox: Outbox, max_active: int = 256,
                 max_queued: int = 512, per_stream: bool = False, metrics=None, prefiller: Prefiller | None = None):
        self.model = model
        self.outbox = outbox
        self.name = name
        self.max_active = max_active
        self.max_queued = max_queued
        # per_stream: the benchmark's baseline, one model call per stream per step (no batching).
        self.per_stream = per_stream
        self.metrics = metrics
        self._engines: list[DecodeEngine] = [] if per_stream else [DecodeEngine(model, capacity=max_active)]
        self.prefiller = prefiller or Prefiller(model, None, metrics=metrics, name=name)
        self._incoming: list[PrefillJob] = []  # handed over by the handlers (under the lock)
        self._prefilling: list[PrefillJob] = []  # the decoding thread's own from here on
        self._ready: deque[PrefillJob] = deque()  # prefilled, waiting for a row
        self._cancels: list[Stream] = []  # streams whose handler is gone: their rows leave at the next step
        self._reserved = 0  # accepted requests not yet in the engine (prefilling or waiting)
        self._lock = threading.Condition()
        self._stopping = False  # no new reservations; the thread ends once nothing is left
        self._interrupt: str | None = None  # "resume" or "end": every row leaves after its next token
        self._closed = False  # the thread ends now, whatever is left (the server is past its last messages)
        self._joined: list = []  # rows admitted since the last step: their first text is sent at once
        self._last_collect = 0.0  # when the rows' text was last collected for delivery (perf_counter)
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
            self._lock.notify()

    def enqueue(self, job: PrefillJob) -> None:
        """A stream (job.tag) to prefill, then to join (its reservation becomes the row)."""
        with self._lock:
            self._incoming.append(job)
            self._lock.notify()

    def cancel(self, stream: Stream) -> None:
        """The stream's handler is gone (client cancel, deadline, error): its row leaves at the next step."""
        stream.cancelled.set()  # a stream still waiting to join is dropped at admission
        with self._lock:
            self._cancels.append(stream)
            self._lock.notify()

    # -- the decoding loop --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not (self.active or self._incoming or self._prefilling or self._ready
                                                or self._cancels):
                    if self._stopping and not self._reserved:
                        return
                    self._lock.wait()
                if self._closed:
                    return
                incoming, self._incoming = self._incoming, []
                cancels, self._cancels = self._cancels, []
                interrupt = self._interrupt
            for job in incoming:
                try:
                    self.prefiller.start(job)
                except Exception as exc:  # ends that stream, never the decoding thread
                    self._discard([job], exc)
                    continue
                self._prefilling.append(job)
            if cancels:
                self._drop(cancels)
            if self._prefilling:
                self._prefill(interrupt)
            if self._ready:
                self._admit(interrupt)
            if interrupt:
                self._leave(interrupt)
            self._step()
            with self._lock:
                self._report()

    def _prefill(self, interrupt: str | None) -> None:
        """One prefill round; prompts done move on to wait for a row (see rnngen.serving.prefill).

        Jobs that need no round (a prompt the prefix cache holds whole, a resumed session) move on
        at once, and the round waits for the next step: they join now, not behind other prompts' chunks."""
        if not interrupt and any(job.finished for job in self._prefilling):
            self._ready.extend(job for job in self._prefilling if job.finished)
            self._prefilling = [job for job in self._prefilling if not job.finished]
            return
        try:
            self.prefiller.round(self._prefilling)
        except Exception as exc:  # a failing prefill ends the streams it was for, not the server
            self._discard(self._prefilling, exc)
            return
        still = []
        for job in self._prefilling:
            (self._ready if job.finished else still).append(job)
        self._prefilling = still
        if interrupt and still:  # nothing sent yet: the client can send the request elsewhere
            self._discard(still, ShuttingDownError(STOPPED_BEFORE_THE_START))

    def _discard(self, jobs: list[PrefillJob], error: Exception) -> None:
        self.outbox.end([job.tag for job in jobs], error)
        self._unreserve(len(jobs))
        self._prefilling = [job for job in self._prefilling if job not in jobs]

    def _unreserve(self, n: int) -> None:
        with self._lock:
            self._reserved -= n

    def _admit(self, interrupt: str | None) -> None:
        """Every prefilled stream that fits joins in one batched add (all of them when interrupting: they leave at once)."""
        room = len(self._ready) if interrupt else self.max_active - self.active
        joining = [self._ready.popleft() for _ in range(min(room, len(self._ready)))]
        self._unreserve(len(joining))
        joining = [job for job in joining if not job.tag.cancelled.is_set()]
        if not joining:
            return
        if self.per_stream:
            for job in joining:
                engine = DecodeEngine(self.model)
                engine.add([job.tag.row], job.logits, BatchState(job.state))
                self._engines.append(engine)
        else:
            self._engines[0].add([job.tag.row for job in joining], np.concatenate([job.logits for job in joining]),
                                 BatchState.concat([BatchState(job.state) for job in joining]))
        self._joined.extend(job.tag.row for job in joining)
        if self.metrics:
            now = time.perf_counter()
            for job in joining:
                self.metrics.queue_wait(now - job.tag.enqueued_at)

    def _drop(self, cancels: list[Stream]) -> None:
        gone = set(cancels)
        dropped = [job for job in self._prefilling if job.tag in gone]
        if dropped:
            self._unreserve(len(dropped))
            self._prefilling = [job for job in self._prefilling if job.tag not in gone]
        for engine in self._engines:
            leaving = [row for row in engine.rows if row.tag in gone]
            if leaving:
                engine.remove(*leaving)

    def _leave(self, mode: str) -> None:
        for engine in self._engines:
            if mode == "resume":
                engine.interrupt(resumable=True)  # the next step's token is each row's last here
            elif engine.rows:
                self.outbox.end([row.tag for row in engine.rows], ShuttingDownError(STOPPED_BEFORE_THE_END))
                engine.select([])

    def _step(self) -> None:
        joined, self._joined = self._joined, []
        for engine in self._engines:
            try:
                updates = engine.step()
            except Exception as exc:  # a failing step ends its rows' streams, not the server
                self.outbox.end([row.tag for row in engine.rows], exc)
                engine.select([])
                continue
            if updates:
                self.outbox.post(updates, first=joined)
                if self.metrics:
                    self.metrics.tokens(self.name, len(updates))
        now = time.perf_counter()
        # The rows' text goes out about message_rate times a second in all; the interval is taken now
        # (a lone stream left after a burst does not wait out the burst's long interval).
        if now >= self._last_collect + self.outbox.interval:
            self._last_collect = now
            self.outbox.collect([news for engine in self._engines for news in engine.unread()])
        if self.per_stream:
            self._engines = [e for e in self._engines if len(e)]

    def _report(self) -> None:
        if self.metrics:
            self.metrics.load(self.name, self.active, self._reserved)

    # -- shutdown -----------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """New requests are refused; accepted streams run on. The thread ends when the last one has."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()

    def interrupt(self, resumable: bool) -> None:
        """Every stream, running or still to join, ends after its next token (see the module's doc)."""
        with self._lock:
            self._stopping = True
            self._interrupt = "resume" if resumable else "end"
            self._lock.notify_all()

    def close(self, timeout: float | None = 30.0) -> bool:
        """End the decoding thread after its current step, and wait for it; True if it has ended."""
        with self._lock:
            self._stopping = self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()
