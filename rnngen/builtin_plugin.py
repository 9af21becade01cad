"""rnngen's own commands, tokenizers, logits processors, model sources and inspection
features, registered through the same hooks as any plugin (see rnngen.plugins).

Imports stay inside the hooks so that loading this module costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from rnngen.errors import InvalidParameterError
from rnngen.plugins import hookimpl


@hookimpl
def register_commands(app) -> None:
    from rnngen import cli

    app.command(help="Train a model on a UTF-8 text file (needs the train extra).")(cli.train)
    app.command(help="Export a checkpoint to one self-contained ONNX file (needs the train extra).")(cli.export)
    app.command(help="Stream generated text from an exported model.")(cli.generate)
    app.command(help="Show a model's metadata and the execution providers.")(cli.info)
    app.command(help="Loss (nats and bits per token and char) and perplexity of a text file.")(cli.score)
    app.command(help="Write an HTML report of what the model's units track in a text (or --json).")(cli.inspect)
    app.command(help="Serve models over gRPC to many concurrent streaming clients.")(cli.serve)
    app.command(help="Ask a server's gRPC health service; exit 0 when SERVING (for container health checks).")(cli.health)
    app.command(help="List loaded plugins and what each provides.")(cli.plugins)


@hookimpl
def register_tokenizers(register) -> None:
    from rnngen import tokenizers as t

    register("char", lambda data: t.CharTokenizer(t.symbols_of(data, "char")),
             from_text=lambda text, max_vocab: t.CharTokenizer.from_text(text),
             help="one token per Unicode character seen in the training text")
    register("byte", lambda data: t.ByteTokenizer(), from_text=lambda text, max_vocab: t.ByteTokenizer(),
             help="one token per UTF-8 byte (256 symbols, any text)")
    register("word", lambda data: t.WordTokenizer(t.symbols_of(data, "word")),
             from_text=lambda text, max_vocab: t.WordTokenizer.from_text(text, max_vocab),
             help="whitespace-separated words, the most frequent --max-vocab, <unk> and <eos>")


@hookimpl
def register_logits_processors(register) -> None:
    register("ban", _ban, help="never produce the tokens of ARGUMENT (e.g. ban:0123456789)")
    register("only", _only, help="produce only the tokens of ARGUMENT (e.g. 'only:abc \\n')")


def _tokens_of(argument: str, tokenizer, name: str) -> list[int]:
    if not argument:
        raise InvalidParameterError(f"processor {name}: give the text after a colon, e.g. {name}:xyz")
    ids = sorted(set(tokenizer.encode(argument, on_unknown="skip")))
    if not ids:
        raise InvalidParameterError(f"processor {name}: none of {argument!r} is in the model's vocabulary")
    return ids


def _ban(argument: str, tokenizer):
    banned = _tokens_of(argument, tokenizer, "ban")
    if len(banned) >= tokenizer.vocab_size:
        raise InvalidParameterError("processor ban: that would ban every token")

    def ban(logits, history):
        logits[banned] = -float("inf")
        return logits

    return ban


def _only(argument: str, tokenizer):
    import numpy as np

    allowed = np.zeros(tokenizer.vocab_size, dtype=bool)
    allowed[_tokens_of(argument, tokenizer, "only")] = True

    def only(logits, history):
        return np.where(allowed, logits, -np.inf)

    return only


@hookimpl
def register_model_sources(register) -> None:
    register("file", _file_source, help="file:PATH, a local .onnx file")
    register("name", _name_source, help="a bare NAME: NAME.onnx in $RNNGEN_MODEL_DIRS, then in ./exported")


def _file_source(rest: str) -> Path:
    path = Path(rest).expanduser()
    if not path.is_file():
        raise InvalidParameterError(f"model: {rest!r} is not a file")
    return path


def model_dirs() -> list[Path]:
    dirs = [Path(d) for d in os.environ.get("RNNGEN_MODEL_DIRS", "").split(os.pathsep) if d]
    return dirs + [Path("exported")]


def _name_source(name: str) -> Path:
    for folder in model_dirs():
        candidate = folder / f"{name}.onnx"
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(d) for d in model_dirs())
    raise InvalidParameterError(f"model: {name!r} is neither a file nor a model named {name}.onnx in {searched}")


@hookimpl
def register_inspect_features(register) -> None:
    from rnngen import features

    for name, (compute, help_text) in features.BUILTIN_FEATURES.items():
        register(name, compute, help=help_text)
