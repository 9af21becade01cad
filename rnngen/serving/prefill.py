"""Prefill between decoding steps, in chunks, with a token-granular prefix-state cache.

A scheduler runs at most one prefill round between two decoding steps: one
batched Loop-graph call that advances up to `max_batch` waiting prompts by the
same number of tokens T. T is at most `chunk`, and at most what fits in
`slice_s` seconds at the time per token measured in earlier rounds, so a round
costs the decoding streams (and a new request) a few milliseconds at most.
Prompts with the fewest tokens left go first and T never passes the shortest
one's end, so a short prompt is done in the next round however long the
others are.

The cache keeps, within a byte budget (least recently used first out), the
state and next-token logits after prompt prefixes it has seen: after every
whole prompt, and after the longest prefix a new prompt shares with one seen
before (the point where they part, found in a radix tree of the cached
prompts), wherever it falls. A prompt starting with a cached prefix is
prefilled from there on; one that is cached whole needs no model call.
A state is the same whatever path led to it, so the text is the same as
uncached (up to float rounding between chunk shapes).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from rnngen.model.runtime import RnnModel

DEFAULT_CHUNK = 256  # tokens per prompt per round, at most
SLICE_S = 0.004  # a round's target duration
DEFAULT_CACHE_MB = 64.0


@dataclass(eq=False)
class PrefillJob:
    """Tokens to feed from a state (None: the zero state, i.e. a prompt from its start: the cache applies)."""

    tokens: list[int]
    state: dict[str, np.ndarray] | None = None  # (layers, 1, hidden) per name: after tokens[:done]
    tag: object = None  # the caller's (the scheduler's stream)
    done: int = 0
    logits: np.ndarray | None = None  # (1, V) after the last token, once done
    captures: list[int] = field(default_factory=list)  # prefix lengths whose state goes into the cache

    @property
    def finished(self) -> bool:
        return self.logits is not None


@dataclass(eq=False)
class _Node:
    edge: tuple  # tokens from the parent to here
    parent: "_Node | None"
    children: dict = field(default_factory=dict)  # first token of the child's edge -> child
    entry: tuple | None = None  # (state, logits, bytes) after the tokens up to here


class PrefixCache:
    """State after token prefixes, in a radix tree; LRU within `budget_bytes`. Used by one thread."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self._root = _Node((), None)
        self._lru: OrderedDict[int, _Node] = OrderedDict()  # id(node) -> node, least recently used first

    def lookup(self, tokens: list[int]) -> tuple[int, _Node | None, int]:
        """(length of the longest cached prefix, its node or None, longest prefix shared with any cached prompt)."""
        node, depth, best, best_depth = self._root, 0, None, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                break
            shared = _common_length(child.edge, tokens, depth)
            if shared < len(child.edge):
                return best_depth, best, depth + shared
            node, depth = child, depth + shared
            if node.entry is not None:
                best, best_depth = node, depth
        if best is not None:
            self._lru.move_to_end(id(best))
        return best_depth, best, depth

    def put(self, tokens: list[int], state: dict[str, np.ndarray], logits: np.ndarray) -> None:
        size = sum(a.nbytes for a in state.values()) + logits.nbytes
        if size > self.budget_bytes:
            return
        node = self._insert(tokens)
        if node.entry is not None:
            self.bytes -= node.entry[2]
        node.entry = ({k: np.array(v) for k, v in state.items()}, np.array(logits), size)
        self.bytes += size
        self._lru[id(node)] = node
        self._lru.move_to_end(id(node))
        while self.bytes > self.budget_bytes:
            self._evict(self._lru.popitem(last=False)[1])

    def _insert(self, tokens: list[int]) -> _Node:
        node, depth = self._root, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                leaf = _Node(tuple(tokens[depth:]), node)
                node.children[tokens[depth]] = leaf
                return leaf
            shared = _common_length(child.edge, tokens, depth)
            if shared < len(child.edge):  # part the edge where the new prefix ends or leaves it
                middle = _Node(child.edge[:shared], node, {child.edge[shared]: child})
                node.children[tokens[depth]] = middle
                child.edge, child.parent = child.edge[shared:], middle
                child = middle
            node, depth = child, depth + shared
        return node

    def _evict(self, node: _Node) -> None:
        self.bytes -= node.entry[2]
        node.entry = None
        while node.parent is not None and node.entry is None and not node.children:  # prune the dead branch
            del node.parent.children[node.edge[0]]
            node = node.parent

    def __len__(self) -> int:
        return len(self._lru)


def _common_length(edge: tuple, tokens: list[int], start: int) -> int:
    n = min(len(edge), len(tokens) - start)
    if n and edge[:n] == tuple(tokens[start : start + n]):
        return n
    i = 0
    while i < n and edge[i] == tokens[start + i]:
        i += 1
    return i


class Prefiller:
    """Chunked, batched prefill rounds for one model (called from its scheduler's thread only)."""

    def __init__(self, model: RnnModel, cache: PrefixCache | None, chunk: int = DEFAULT_CHUNK, max_batch: int = 16,
                 metrics=None, name: str = "", slice_s: float = SLICE_S):
        self.model = model
        self.cache = cache
        self.chunk = chunk
        self.slice_s = slice_s
        self._token_s: float | None = None  # seconds per token of a round (moving average)
        self.max_batch = max_batch
        self.metrics = metrics
        self.name = name

    def start(self, job: PrefillJob) -> None:
        """Take what the cache has of the prompt; plan where its states go into the cache.

        A resumed session's job comes finished: its pending token was fed where the session was
        decoded (rnngen.decoding.engine.resume), with the uninterrupted stream's random draw.
        """
        if job.finished or self.cache is None:
            return
        depth, node, shared = self.cache.lookup(job.tokens)
        if node is not None:
            state, logits, _ = node.entry
            job.done, job.state = depth, state
            if depth == len(job.tokens):
                job.logits = logits[None, :]
        job.captures = sorted({c for c in (shared, len(job.tokens)) if depth < c <= len(job.tokens)})
        if self.metrics:
            self.metrics.prefix_lookup(self.name, depth)

    def round(self, jobs: list[PrefillJob]) -> None:
        """One batched model call: the jobs with the fewest tokens left advance by up to `chunk` tokens."""
        chosen = sorted((j for j in jobs if not j.finished), key=lambda j: len(j.tokens) - j.done)[: self.max_batch]
        if not chosen:
            return
        fits = max(1, int(self.slice_s / self._token_s)) if self._token_s else 8
        step = min(min(self.chunk, fits, self._next_stop(j) - j.done) for j in chosen)
        tokens = np.array([j.tokens[j.done : j.done + step] for j in chosen], dtype=np.int64)  # (B, T)
        zero = self.model.initial_state(1)
        state = {k: np.concatenate([(j.state or zero)[k] for j in chosen], axis=1) for k in zero}  # (L, B, H)
        started = time.perf_counter()
        logits, state = self.model.run(tokens, state)  # (B, T, V)
        token_s = (time.perf_counter() - started) / step
        self._token_s = token_s if self._token_s is None else 0.8 * self._token_s + 0.2 * token_s
        for i, job in enumerate(chosen):
            job.state = {k: v[:, i : i + 1] for k, v in state.items()}
            job.done += step
            if self.cache is not None and job.captures and job.captures[0] == job.done:
                job.captures.pop(0)
                self.cache.put(job.tokens[: job.done], job.state, logits[i, -1])
                if self.metrics:
                    self.metrics.prefix_bytes(self.name, self.cache.bytes)
            if job.done == len(job.tokens):
                job.logits = logits[i : i + 1, -1]

    @staticmethod
    def _next_stop(job: PrefillJob) -> int:
        return job.captures[0] if job.captures else len(job.tokens)
