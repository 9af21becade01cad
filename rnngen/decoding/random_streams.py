"""Every row's own random generator, drawn for many rows at once.

Each row samples from its own numpy PCG64 stream (rnngen.decoding.rows.row_generator),
so a row draws the same numbers alone or in any batch. Calling `Generator.random()`
row by row costs a Python call per row per step; `SlotGenerators` instead keeps the
128-bit PCG64 states of all slots in arrays and advances the slots that draw with
array arithmetic, producing exactly the doubles numpy would (the same state
transition and XSL-RR output, then 53 bits as a double). A row's generator is loaded
when it joins and written back when it leaves, so snapshots hold numpy's own state.
"""

from __future__ import annotations

import numpy as np

_U64 = 2**64 - 1
_MULTIPLIER = 0x2360ED051FC65DA44385DF649FCCF645  # PCG's default 128-bit multiplier, as numpy's PCG64
_MUL_HI, _MUL_LO = np.uint64(_MULTIPLIER >> 64), np.uint64(_MULTIPLIER & _U64)
_LOW32 = np.uint64(0xFFFFFFFF)
_32, _58, _63, _64, _11 = (np.uint64(n) for n in (32, 58, 63, 64, 11))
_TO_DOUBLE = 1.0 / 9007199254740992.0  # 2 ** -53


def _multiply_wide(a: np.ndarray, b: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """The full 128-bit product of uint64 arrays a and b as (high, low) 64-bit halves."""
    a0, a1 = a & _LOW32, a >> _32
    b0, b1 = b & _LOW32, b >> _32
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    middle = (p00 >> _32) + (p01 & _LOW32) + (p10 & _LOW32)
    return p11 + (p01 >> _32) + (p10 >> _32) + (middle >> _32), (p00 & _LOW32) | (middle << _32)


class SlotGenerators:
    """PCG64 states (state and increment, 128 bits each, as high and low halves) per slot."""

    def __init__(self, capacity: int = 0):
        self._arrays = np.zeros((4, capacity), dtype=np.uint64)  # state high, state low, inc high, inc low
        self._extra: list[dict | None] = [None] * capacity  # numpy's buffered uint32 fields, kept as they were

    def grow(self, capacity: int) -> None:
        extra = capacity - self._arrays.shape[1]
        self._arrays = np.concatenate([self._arrays, np.zeros((4, extra), dtype=np.uint64)], axis=1)
        self._extra += [None] * extra

    def load(self, slot: int, generator: np.random.Generator) -> None:
        state = generator.bit_generator.state
        if state["bit_generator"] != "PCG64":
            raise ValueError("rows draw from numpy PCG64 generators")
        s, inc = state["state"]["state"], state["state"]["inc"]
        self._arrays[:, slot] = (s >> 64, s & _U64, inc >> 64, inc & _U64)
        self._extra[slot] = {"has_uint32": state["has_uint32"], "uinteger": state["uinteger"]}

    def store(self, slot: int, generator: np.random.Generator) -> None:
        """Put the slot's position back into the row's generator."""
        hi, lo, inc_hi, inc_lo = (int(x) for x in self._arrays[:, slot])
        generator.bit_generator.state = {"bit_generator": "PCG64", "state": {"state": hi << 64 | lo, "inc": inc_hi << 64 | inc_lo},
                                         **self._extra[slot]}

    def gather(self, order: np.ndarray) -> None:
        n = len(order)
        self._arrays[:, :n] = self._arrays[:, order]
        self._extra[:n] = [self._extra[i] for i in order]

    def random(self, slots: np.ndarray) -> np.ndarray:
        """One double in [0, 1) from each slot's stream (as `Generator.random()`), advancing it."""
        hi, lo, inc_hi, inc_lo = self._arrays[:, slots]
        new_hi, new_lo = _multiply_wide(lo, _MUL_LO)  # state = state * multiplier + inc (mod 2**128)
        new_hi = new_hi + hi * _MUL_LO + lo * _MUL_HI
        low = new_lo + inc_lo
        new_hi = new_hi + inc_hi + (low < new_lo).astype(np.uint64)
        self._arrays[0, slots], self._arrays[1, slots] = new_hi, low
        mixed, rotation = new_hi ^ low, new_hi >> _58  # XSL-RR output of the new state
        out = (mixed >> rotation) | (mixed << ((_64 - rotation) & _63))
        return (out >> _11).astype(np.float64) * _TO_DOUBLE
