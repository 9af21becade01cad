"""Named logits processors (`--processor NAME[:ARGUMENT]`): the built-ins, and building them.

A processor factory takes (argument, tokenizer) and returns
`processor(logits (V,) float64, history) -> logits`, where -inf bans a token.
rnngen's own (`ban`, `only`) are here; plugins add more through the registry
(rnngen.plugins), and the CLI and the server pass the full table down.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from rnngen.errors import InvalidParameterError

ProcessorFactory = Callable[[str, object], Callable]
ProcessorFactories = Mapping[str, ProcessorFactory]


def _tokens_of(argument: str, tokenizer, name: str) -> list[int]:
    if not argument:
        raise InvalidParameterError(f"processor {name}: give the text after a colon, e.g. {name}:xyz")
    ids = sorted(set(tokenizer.encode(argument, on_unknown="skip")))
    if not ids:
        raise InvalidParameterError(f"processor {name}: none of {argument!r} is in the model's vocabulary")
    return ids


def ban(argument: str, tokenizer):
    """Never produce the tokens of ARGUMENT."""
    banned = _tokens_of(argument, tokenizer, "ban")
    if len(banned) >= tokenizer.vocab_size:
        raise InvalidParameterError("processor ban: that would ban every token")

    def process(logits, history):
        logits[banned] = -np.inf
        return logits

    return process


def only(argument: str, tokenizer):
    """Produce only the tokens of ARGUMENT."""
    allowed = np.zeros(tokenizer.vocab_size, dtype=bool)
    allowed[_tokens_of(argument, tokenizer, "only")] = True

    def process(logits, history):
        return np.where(allowed, logits, -np.inf)

    return process


# name -> (factory, help)
BUILTIN_PROCESSORS: dict[str, tuple[ProcessorFactory, str]] = {
    "ban": (ban, "never produce the tokens of ARGUMENT (e.g. ban:0123456789)"),
    "only": (only, "produce only the tokens of ARGUMENT (e.g. 'only:abc \\n')"),
}


def builtin_factories() -> dict[str, ProcessorFactory]:
    return {name: factory for name, (factory, _) in BUILTIN_PROCESSORS.items()}


def check_processor_names(specs: tuple[str, ...], factories: ProcessorFactories | None = None) -> None:
    """Each spec names a known processor (its argument is checked when built for a model)."""
    table = builtin_factories() if factories is None else factories
    for spec in specs:
        name = spec.partition(":")[0]
        if name not in table:
            raise InvalidParameterError(f"processor: {name!r} is not one of {', '.join(sorted(table)) or 'none'}")


def build_processors(specs: tuple[str, ...], tokenizer, factories: ProcessorFactories | None = None) -> list[Callable]:
    """`NAME[:ARGUMENT]` specs -> processors for this tokenizer (raises on an unknown name or a bad argument)."""
    check_processor_names(specs, factories)
    table = builtin_factories() if factories is None else factories
    return [table[name](argument, tokenizer) for name, _, argument in (s.partition(":") for s in specs)]
