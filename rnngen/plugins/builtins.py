"""rnngen's own tokenizers, logits processors, model sources and inspection features,
registered through the same hooks as any plugin (see rnngen.plugins.registry).

The things themselves live where they belong (rnngen.model.tokenizers,
rnngen.decoding.processors, rnngen.inspect.features); this module only registers
them. Imports stay inside the hooks so that loading it costs nothing.
"""

from __future__ import annotations

from pathlib import Path

from rnngen.errors import InvalidParameterError
from rnngen.plugins.hookspecs import hookimpl

_TOKENIZER_HELP = {
    "char": "one token per Unicode character seen in the training text",
    "byte": "one token per UTF-8 byte (256 symbols, any text)",
    "word": "whitespace-separated words, the most frequent --max-vocab, <unk> and <eos>",
}


@hookimpl
def register_tokenizers(register) -> None:
    from rnngen.model.tokenizers import BUILTIN_TOKENIZERS

    for kind, made in BUILTIN_TOKENIZERS.items():
        register(kind, made.from_dict, from_text=made.from_text, help=_TOKENIZER_HELP[kind])


@hookimpl
def register_logits_processors(register) -> None:
    from rnngen.decoding.processors import BUILTIN_PROCESSORS

    for name, (factory, help_text) in BUILTIN_PROCESSORS.items():
        register(name, factory, help=help_text)


@hookimpl
def register_model_sources(register) -> None:
    register("file", _file_source, help="file:PATH, a local .onnx file")
    register("name", _name_source, help="a bare NAME: NAME.onnx in $RNNGEN_MODEL_DIRS, then in ./exported")


def _file_source(rest: str) -> Path:
    path = Path(rest).expanduser()
    if not path.is_file():
        raise InvalidParameterError(f"model: {rest!r} is not a file")
    return path


def _name_source(name: str) -> Path:
    from rnngen.model.locations import find_named_model, model_dirs

    found = find_named_model(name)
    if found is None:
        searched = ", ".join(str(d) for d in model_dirs())
        raise InvalidParameterError(f"model: {name!r} is neither a file nor a model named {name}.onnx in {searched}")
    return found


@hookimpl
def register_inspect_features(register) -> None:
    from rnngen.inspect.features import BUILTIN_FEATURES

    for name, (compute, help_text) in BUILTIN_FEATURES.items():
        register(name, compute, help=help_text)
