"""What a plugin can implement: the hooks of the entry-point group `rnngen`."""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("rnngen")
hookimpl = pluggy.HookimplMarker("rnngen")


class HookSpecs:
    """What a plugin can implement. Each hook receives a `register` function (or the CLI app)."""

    @hookspec
    def register_commands(self, app: Any) -> None:
        """Add commands to the Typer `app` (e.g. `app.command(name="vocab")(vocab)`)."""

    @hookspec
    def register_tokenizers(self, register: Callable[..., None]) -> None:
        """`register(kind, from_dict, from_text=None, help="")`.

        `from_dict(data) -> Tokenizer` rebuilds one from a model file's metadata (the dict its
        `to_dict()` made, with "kind"); `from_text(text, max_vocab) -> Tokenizer` builds one for
        training. A tokenizer has vocab_size, encode(text, on_unknown), decode(ids),
        stream_decoder(), start_ids() and to_dict() (see rnngen.model.tokenizers.CharTokenizer).
        """

    @hookspec
    def register_logits_processors(self, register: Callable[..., None]) -> None:
        """`register(name, factory, help="")`, used as `--processor NAME[:ARGUMENT]`.

        `factory(argument: str, tokenizer) -> processor`, where
        `processor(logits: np.ndarray (vocab,) float64, history: Sequence[int]) -> np.ndarray`
        returns the row's processed logits (-inf bans a token). Raise
        rnngen.errors.InvalidParameterError for a bad argument. Processors run after the
        built-in penalties and before temperature, top-k/p and min-p, in the order given.
        """

    @hookspec
    def register_model_sources(self, register: Callable[..., None]) -> None:
        """`register(scheme, resolve, help="")`: `--model SCHEME:REST` calls `resolve(REST) -> path`."""

    @hookspec
    def register_inspect_features(self, register: Callable[..., None]) -> None:
        """`register(name, compute, help="")` for `rnngen inspect`.

        `compute(text: str) -> sequence of floats`, one value per character of `text`.
        """
