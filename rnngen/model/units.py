"""Units: single numbers of a model's state or gates, named like `l1.c[42]`.

Layer 1, cell state, unit 42. Kinds: `h` (hidden state, every cell), `c` (LSTM
cell state), and the gates of rnngen.model.config.GATES (LSTM `i f g o`, GRU `r z n`).
`rnngen inspect` records them all; generation can report state units per token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rnngen.errors import InvalidParameterError
from rnngen.model.config import GATES

UNIT_PATTERN = re.compile(r"^l(\d+)\.([a-z])\[(\d+)\]$")


@dataclass(frozen=True)
class Unit:
    kind: str
    layer: int
    index: int

    @property
    def name(self) -> str:
        return f"l{self.layer}.{self.kind}[{self.index}]"


def unit_kinds(cell: str) -> list[str]:
    return ["h", "c", *GATES[cell]] if cell == "lstm" else ["h", *GATES[cell]]


def parse_unit(spec: str, config, kinds: list[str] | None = None) -> Unit:
    """`l1.h[42]` -> Unit, checked against the model's layers, sizes and unit kinds."""
    kinds = kinds or unit_kinds(config.cell)
    m = UNIT_PATTERN.match(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        raise InvalidParameterError(f"unit: {spec!r} is not LAYER.KIND[INDEX] such as l0.h[12]")
    layer, kind, index = int(m.group(1)), m.group(2), int(m.group(3))
    if kind not in kinds:
        raise InvalidParameterError(f"unit: {spec!r}: kind {kind!r} is not one of {', '.join(kinds)} for this {config.cell}")
    if layer >= config.num_layers:
        raise InvalidParameterError(f"unit: {spec!r}: layer {layer} is not in 0..{config.num_layers - 1}")
    if index >= config.hidden_size:
        raise InvalidParameterError(f"unit: {spec!r}: index {index} is not in 0..{config.hidden_size - 1}")
    return Unit(kind, layer, index)


def state_units(specs: tuple[str, ...], config) -> list[Unit]:
    """Units readable while generating: those of the state (h, and c for LSTMs), not the gates."""
    kinds = list(config.state_names)
    return [parse_unit(spec, config, kinds) for spec in specs]
