"""Coalesced delivery: decoding threads post each step's updates, the event loop sends them in batches.

A decoding thread appends a step's text to each stream's pending buffer (one lock
taken per step, not per stream) and marks the stream dirty. The event loop
flushes on a timer: a flush wakes every dirty stream's handler once, and the
handler sends everything that stream accumulated since its last message as one
message. A handler still busy writing (a client not yet ready) is woken again
by the next flush or takes the backlog as soon as its write completes, so a
slow reader gets fewer, larger messages and never holds up the others.

The flush interval is `open streams / message_rate` seconds: the server's total
message rate stays near `message_rate` however many streams run and however
fast they decode, while a lone stream is flushed every 1/message_rate seconds
(feels live). A stream's first text and its end do not wait for the timer:
the handler is woken as soon as they are posted (each happens once per stream,
so the rate stays bounded), so time to first token and to the last message
carry no flush delay. Nothing runs per stream per token on the event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from rnngen.decoding.engine import Row

DEFAULT_MESSAGE_RATE = 1000.0  # messages per second, all streams of a server together


@dataclass
class Pending:
    """What a stream's next message carries (taken by its handler in one swap)."""

    texts: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    details: list = field(default_factory=list)
    count: int = 0  # tokens decoded into this message (a byte model's partial character adds no text)
    ended: bool = False  # the stream's last update is in (finished, failed, cancelled or interrupted)
    error: Exception | None = None  # the stream ends with this status


@dataclass(eq=False)  # compared and hashed by identity (the dirty set holds streams)
class Stream:
    """One client's stream: its row in the engine and the buffer its updates collect in."""

    row: Row
    prompt_tokens: int
    want_tokens: bool = False  # collect token ids (return_token_ids)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    pending: Pending = field(default_factory=Pending)  # guarded by the outbox's lock
    wake: asyncio.Event | None = None  # set by a flush; the handler waits on it
    posted: bool = False  # an update has been posted (its first one is sent without waiting for a flush)


class Outbox:
    """The hand-over between decoding threads (post) and the event loop (flush, take)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, message_rate: float = DEFAULT_MESSAGE_RATE):
        self.loop = loop
        self.message_rate = message_rate
        self.open_streams = 0  # streams with a live handler; touched on the loop only
        self._lock = threading.Lock()
        self._dirty: dict[Stream, None] = {}  # an ordered set: streams with news since the last flush
        self._armed = False  # a flush is scheduled (at most one hand-over to the loop per flush)
        self._urgent: list[Stream] = []  # streams whose first text or end is in: woken without waiting
        self._urgent_armed = False
        self._last_flush = 0.0

    # -- decoding threads ---------------------------------------------------------------------

    def post(self, updates) -> None:
        """One step's StepUpdates (their rows are tagged with their Stream)."""
        texts = updates.texts()  # made before the lock is taken
        with self._lock:
            dirty = self._dirty
            for row, token, text, finished in zip(updates.rows, updates.tokens.tolist(), texts, updates.finished.tolist()):
                stream = row.tag
                p = stream.pending
                p.count += 1
                if text:
                    p.texts.append(text)
                if stream.want_tokens:
                    p.tokens.append(token)
                if finished:
                    p.ended = True
                if finished or not stream.posted:  # its first text or its end: sent without waiting
                    stream.posted = True
                    self._urgent.append(stream)
                dirty[stream] = None
            for i, details in updates.details.items():  # only rows that asked for details (introspect)
                updates.rows[i].tag.pending.details.append(details)
            for i, error in updates.errors.items():
                updates.rows[i].tag.pending.error = error
            self._arm_locked()

    def end(self, streams, error: Exception | None = None) -> None:
        """These streams end now (cancelled, failed or refused), with `error` as their status if given."""
        with self._lock:
            for stream in streams:
                stream.pending.ended = True
                if error is not None and stream.pending.error is None:
                    stream.pending.error = error
                self._dirty[stream] = None
                self._urgent.append(stream)
            self._arm_locked()

    def _arm_locked(self) -> None:
        if self._urgent and not self._urgent_armed:
            self._urgent_armed = True
            self.loop.call_soon_threadsafe(self._wake_urgent)
        if self._dirty and not self._armed:
            self._armed = True
            self.loop.call_soon_threadsafe(self._schedule_flush)

    # -- the event loop -------------------------------------------------------------------------

    @property
    def interval(self) -> float:
        return max(self.open_streams, 1) / self.message_rate

    def _schedule_flush(self) -> None:
        delay = self._last_flush + self.interval - self.loop.time()
        if delay > 0:
            self.loop.call_later(delay, self._flush)
        else:
            self._flush()

    def _wake_urgent(self) -> None:
        """Wake the streams whose first text or end came in (the next flush need not wake them)."""
        with self._lock:
            urgent, self._urgent = self._urgent, []
            self._urgent_armed = False
            for stream in urgent:
                self._dirty.pop(stream, None)
        self._wake(urgent)

    def _flush(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, {}
            self._armed = False
        self._last_flush = self.loop.time()
        self._wake(dirty)

    @staticmethod
    def _wake(streams) -> None:
        """Each stream's handler takes its news (on the loop)."""
        for stream in streams:
            if stream.wake is not None:
                stream.wake.set()

    def take(self, stream: Stream) -> Pending:
        """Everything the stream accumulated since its last message."""
        with self._lock:
            taken, stream.pending = stream.pending, Pending()
        return taken
