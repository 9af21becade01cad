"""Coalesced delivery: decoding threads hand over streams' text now and then, the event loop sends it.

Text is made from token ids when it is delivered, not at every step. About every
`interval` seconds a decoding thread collects: it makes the text of every row's
tokens since its last collection (`DecodeEngine.unread`: one pass over its rows
per collection, not per step) into each stream's pending buffer, under one lock,
and hands one flush to the event loop, which wakes the handler of every stream
with news; each handler sends everything its stream accumulated since its last
message as one message. A handler still busy writing (a client not yet ready)
takes the backlog as soon as its write completes, so a slow reader gets fewer,
larger messages and never holds up the others.

What cannot wait for a collection comes with each step (`post`): a stream's
first token, and its end with its last text, wake its handler at once (so time
to first token and to the last message carry no collection delay; each happens
once per stream, so the rate stays bounded); the other texts a step made anyway
(rows with stop strings, which see their text every step, and rows whose unread
text was due) and introspection details, read with their tokens so that a
message's details and token ids stay aligned, go out with the next collection.

The interval is `open streams / message_rate` seconds: the server's total
message rate stays near `message_rate` however many streams run and however
fast they decode, while a lone stream gets a message every 1/message_rate
seconds (feels live). Nothing runs per stream per token on the event loop, nor
per stream per step on the decoding thread but for the rows that ask for it
(stop strings, introspection).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from rnngen.decoding.engine import Row

MESSAGE_RATE_PER_CORE = 250.0  # the default message rate (all streams of a server together), per CPU core
MAX_DEFAULT_MESSAGE_RATE = 1000.0  # ... and at most this: the event loop is one thread however many cores


def default_message_rate(cores: int | None = None) -> float:
    """The --message-rate default: MESSAGE_RATE_PER_CORE messages a second per CPU core this process
    may use (`cores`), at most MAX_DEFAULT_MESSAGE_RATE. A message costs the event loop, and the
    client, CPU time that decoding needs; per core, messages take the same share of the host
    whatever its size (on the 2-core benchmark machine 500 rather than 1000 decoded 5-9% more
    tokens per second at 4-8% less server CPU per token: docs/serving.md)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(MAX_DEFAULT_MESSAGE_RATE, MESSAGE_RATE_PER_CORE * max(cores, 1))


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


class Outbox:
    """The hand-over between decoding threads (post, collect, end) and the event loop (flush, take)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, message_rate: float):
        self.loop = loop
        self.message_rate = message_rate
        self.open_streams = 0  # streams with a live handler; touched on the loop only
        self._lock = threading.Lock()
        self._dirty: dict[Stream, None] = {}  # an ordered set: streams with news not handed to their handler yet
        self._armed = False  # a flush is handed to the loop (at most one at a time)
        self._urgent: list[Stream] = []  # streams whose first text or end is in: woken without waiting
        self._urgent_armed = False

    @property
    def interval(self) -> float:
        """Seconds between two collections of a decoding thread (read there; open_streams is an int)."""
        return max(self.open_streams, 1) / self.message_rate

    # -- decoding threads ---------------------------------------------------------------------

    def post(self, updates, first: list | None = None) -> None:
        """What of one step's StepUpdates cannot wait for the next collection (their rows are tagged
        with their Stream): texts the step made, ends, errors, introspection details with their
        tokens, and the first tokens of the rows in `first` (rows that joined before this step)."""
        engine, rows, details = updates.engine, updates.rows, updates.details
        # Text made now: introspecting rows' (their details go with their tokens, step by step) and
        # the first token of new rows still decoding here (one that finished at once is among the
        # ends; a stop-string row's text is in `made` already, and unread has nothing more of it).
        first = [row for row in first if row.engine is engine] if first else []
        now = [rows[i] for i in details] + first
        news = engine.unread(now) if now else ()
        ends = np.flatnonzero(updates.finished).tolist() if updates.finished.any() else ()
        with self._lock:
            for i, (text, ids) in updates.made.items():
                self._add(rows[i].tag, text, ids)
            for row, text, ids in news:
                self._add(row.tag, text, ids)
            for i, d in details.items():
                rows[i].tag.pending.details.append(d)
            for i, error in updates.errors.items():
                rows[i].tag.pending.error = error
            for i in ends:  # its end: sent without waiting
                stream = rows[i].tag
                stream.pending.ended = True
                self._urgent.append(stream)
            if first:  # their first text: sent without waiting
                self._urgent.extend(row.tag for row in first)
            self._arm_locked()

    def collect(self, unread) -> None:
        """Rows' text since their last collection, (row, text, ids) each (DecodeEngine.unread), from a
        decoding thread every `interval`: every stream with news is woken (these, and those of
        texts posted since the last collection)."""
        with self._lock:
            for row, text, ids in unread:
                self._add(row.tag, text, ids)
            self._arm_locked(flush=True)

    def end(self, streams, error: Exception | None = None) -> None:
        """These streams end now (cancelled, failed or refused), with `error` as their status if given."""
        with self._lock:
            for stream in streams:
                stream.pending.ended = True
                if error is not None and stream.pending.error is None:
                    stream.pending.error = error
                self._urgent.append(stream)
            self._arm_locked()

    def _add(self, stream: Stream, text: str, ids: list[int]) -> None:
        """Text made of `ids` into the stream's buffer (under the lock)."""
        p = stream.pending
        p.count += len(ids)
        if text:
            p.texts.append(text)
        if stream.want_tokens:
            p.tokens.extend(ids)
        self._dirty[stream] = None

    def _arm_locked(self, flush: bool = False) -> None:
        """Hand what is due over to the loop: urgent streams at once, and (`flush`) every stream with news."""
        if self._urgent and not self._urgent_armed:
            self._urgent_armed = True
            self.loop.call_soon_threadsafe(self._wake_urgent)
        if flush and self._dirty and not self._armed:
            self._armed = True
            self.loop.call_soon_threadsafe(self._flush)

    # -- the event loop -------------------------------------------------------------------------

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
