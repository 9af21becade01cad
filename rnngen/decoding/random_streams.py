"""Every row's own random generator, drawn for many rows at once.

Each row samples from its own numpy generator (rnngen.decoding.rows.row_generator),
so a row draws the same numbers alone or in any batch. Calling `Generator.random()`
row by row costs a Python call per row per step; `SlotGenerators` instead draws a
block of BLOCK numbers per row at a time (the same numbers, in the same order, as
BLOCK single draws, but for the one in 33 million that `uniform_draws` lowers) and
hands them out with array indexing (while every row stepped is at the same position
in its block, as rows that joined together and a lone row are, one column of the
blocks). A row's generator is copied in when it joins;
writing it back rewinds it past the draws not used yet, so a snapshot holds
exactly the position of a row that drew one number at a time.
"""

from __future__ import annotations

import numpy as np

BLOCK = 64  # numbers drawn per row at a time
# The largest float32 below 1. The step graph takes its draws as float32, and a double above this
# would round to 1.0 there, past every token's cumulative probability (once in 33 million draws).
BELOW_ONE = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


def uniform_draws(generator: np.random.Generator, size: int | None = None):
    """Draws in [0, 1) from `generator` as `Generator.random(size)`, the rare ones above BELOW_ONE
    lowered to it, so that the numpy sampler and the step graph's float32 see the same number."""
    values = generator.random(size)
    return min(values, BELOW_ONE) if size is None else np.minimum(values, BELOW_ONE)


def generator_at(state: dict) -> np.random.Generator:
    """A generator at the position a numpy PCG64 state records (a snapshot's, or a live generator's:
    the row generators are PCG64). Seeded with 0 and then set: seeding from the OS costs more."""
    bit_generator = np.random.PCG64(0)
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def copy_generator(generator: np.random.Generator) -> np.random.Generator:
    """An independent generator at the same position (a fifth of what a deep copy costs, which a row
    pays each time it joins)."""
    return generator_at(generator.bit_generator.state)


class SlotGenerators:
    """Per slot: its own generator (a copy of the row's), and the block of numbers drawn from it."""

    def __init__(self, capacity: int = 0):
        self._generators = np.empty(capacity, dtype=object)
        self._block = np.zeros((capacity, BLOCK))
        self._next = np.full(capacity, BLOCK, dtype=np.int64)  # position in the block (BLOCK: used up)
        self._room = 0  # draws every slot has left in its block (0: look)
        self._rows = np.zeros(0, dtype=np.int64)  # arange(n) for random_range
        # Rows that joined together stay at the same position in their blocks while they draw
        # together: random_range then hands out one column of the blocks (a view), and keeps the
        # position here rather than in _next (written back by _settle before anything else reads it).
        self._aligned = -1  # the first _aligned_rows slots' common position (-1: _next holds every position)
        self._aligned_rows = 0

    def _settle(self) -> None:
        if self._aligned >= 0:
            self._next[: self._aligned_rows] = self._aligned
            self._aligned = -1
            self._room = 0  # not counted down meanwhile

    def grow(self, capacity: int) -> None:
        self._settle()
        extra = capacity - len(self._next)
        self._generators = np.concatenate([self._generators, np.empty(extra, dtype=object)])
        self._block = np.concatenate([self._block, np.zeros((extra, BLOCK))])
        self._next = np.concatenate([self._next, np.full(extra, BLOCK, dtype=np.int64)])

    def load(self, slot: int, generator: np.random.Generator) -> None:
        self._settle()
        self._generators[slot] = copy_generator(generator)
        self._next[slot] = BLOCK
        self._room = 0

    def store(self, slot: int, generator: np.random.Generator) -> None:
        """Put the slot's position (numbers drawn and handed out) into the row's generator."""
        self._settle()
        generator.bit_generator.state = self._generators[slot].bit_generator.state
        unused = BLOCK - int(self._next[slot])
        if unused:
            generator.bit_generator.advance(-unused)

    def gather(self, order: np.ndarray) -> None:
        self._settle()
        n = len(order)
        taken = set()
        generators = []
        for slot in order.tolist():  # a slot taken twice (a copied row) gets a generator of its own
            generators.append(self._generators[slot] if slot not in taken else copy_generator(self._generators[slot]))
            taken.add(slot)
        self._block[:n] = self._block[order]
        self._next[:n] = self._next[order]
        self._generators[:n] = generators
        self._generators[n:] = None
        self._next[n:] = BLOCK
        self._room = 0

    def random(self, slots: np.ndarray) -> np.ndarray:
        """One double in [0, 1) from each slot's stream (as `uniform_draws(generator)`)."""
        self._settle()
        position = self._next[slots]
        empty = position >= BLOCK
        if empty.any():
            for slot in slots[empty].tolist():
                self._block[slot] = uniform_draws(self._generators[slot], BLOCK)
            position[empty] = 0
        self._next[slots] = position + 1
        self._room = 0
        return self._block[slots, position]

    def random_range(self, n: int) -> np.ndarray:
        """`random(np.arange(n))`, with fewer array operations: blocks are refilled only when one may be
        used up, and rows at one position take a column of the blocks (a view: read it before the next
        draw, and never write to it)."""
        at = self._aligned
        if 0 <= at < BLOCK and self._aligned_rows == n:
            self._aligned = at + 1
            return self._block[:n, at]
        self._settle()
        position = self._next[:n]  # a view: advanced in place
        if self._room <= 0 or len(self._rows) != n:
            empty = np.flatnonzero(position >= BLOCK)
            for slot in empty.tolist():
                self._block[slot] = uniform_draws(self._generators[slot], BLOCK)
            position[empty] = 0
            self._room = BLOCK - int(position.max())
            if len(self._rows) != n:
                self._rows = np.arange(n)
            if n and position.min() == position.max():  # in step: from now on a column at a time
                at = int(position[0])
                self._aligned, self._aligned_rows = at + 1, n
                return self._block[:n, at]
        values = self._block[self._rows, position]
        position += 1
        self._room -= 1
        return values
