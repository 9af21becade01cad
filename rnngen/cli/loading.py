"""Models as the CLI loads them: names and model sources resolved, plugin tokenizers known."""

from __future__ import annotations

from rnngen.model.runtime import RnnModel


def load_model(spec: str, device: str = "auto") -> RnnModel:
    """A `--model` argument (file, bare name or SCHEME:...) -> a loaded model."""
    from rnngen.plugins import resolve_model, tokenizer_kinds

    return RnnModel.load(resolve_model(spec), device=device, tokenizers=tokenizer_kinds())
