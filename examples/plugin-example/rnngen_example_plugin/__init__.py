"""An example rnngen plugin, one of each kind of addition.

- command `vocab MODEL`: prints the model's vocabulary;
- logits processor `vowel-bias:AMOUNT`: adds AMOUNT to the logits of vowels;
- tokenizer `lowercase-char`: a character tokenizer that lower-cases all text;
- model source `zip:ARCHIVE!MEMBER`: a model file inside a zip archive;
- inspect feature `vowel`: 1 on vowels.

Imports of rnngen and numpy stay inside the functions: the CLI imports this module
at start-up, and a plugin should not slow that down.
"""

from rnngen.plugins import hookimpl

VOWELS = "aeiouAEIOU"


@hookimpl
def register_commands(app):
    import typer

    def vocab(model: str = typer.Argument(..., help="An rnngen model.")) -> None:
        """Print the model's vocabulary, one symbol per line (escaped)."""
        from rnngen.model.file import read_model_file
        from rnngen.plugins import resolve_model

        tokenizer = read_model_file(resolve_model(model)).tokenizer
        for i in range(tokenizer.vocab_size):
            typer.echo(f"{i}\t{tokenizer.decode([i])!r}")

    app.command(name="vocab", help="Print a model's vocabulary (from the example plugin).")(vocab)


@hookimpl
def register_logits_processors(register):
    register("vowel-bias", _vowel_bias, help="add ARGUMENT (a number) to the logits of vowels")


def _vowel_bias(argument, tokenizer):
    from rnngen.errors import InvalidParameterError

    try:
        amount = float(argument)
    except ValueError:
        raise InvalidParameterError(f"processor vowel-bias: {argument!r} is not a number") from None
    vowels = sorted(set(tokenizer.encode(VOWELS, on_unknown="skip")))

    def vowel_bias(logits, history):
        logits[vowels] += amount
        return logits

    return vowel_bias


@hookimpl
def register_tokenizers(register):
    from rnngen.model.tokenizers import CharTokenizer, symbols_of

    class LowercaseCharTokenizer(CharTokenizer):
        kind = "lowercase-char"

        @classmethod
        def from_text(cls, text):
            return cls(sorted(set(text.lower())))

        def encode(self, text, on_unknown="error"):
            return super().encode(text.lower(), on_unknown)

    register("lowercase-char", lambda data: LowercaseCharTokenizer(symbols_of(data, "lowercase-char")),
             from_text=lambda text, max_vocab: LowercaseCharTokenizer.from_text(text),
             help="characters, with all text lower-cased")


@hookimpl
def register_model_sources(register):
    register("zip", _from_zip, help="zip:ARCHIVE!MEMBER, a model file inside a zip archive")


def _from_zip(rest):
    import hashlib
    import os
    import tempfile
    import zipfile
    from pathlib import Path

    from rnngen.errors import InvalidParameterError

    archive, sep, member = rest.partition("!")
    if not sep or not member:
        raise InvalidParameterError(f"model: zip:{rest!r} is not zip:ARCHIVE!MEMBER")
    try:
        with zipfile.ZipFile(archive) as z:
            data = z.read(member)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise InvalidParameterError(f"model: zip:{rest}: {exc}") from None
    # Extracted under a name made from the content, so that the model keeps its member's name.
    folder = Path(tempfile.gettempdir()) / "rnngen-zip" / hashlib.sha256(data).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / os.path.basename(member)
    if not target.exists():
        target.write_bytes(data)
    return target


@hookimpl
def register_inspect_features(register):
    def vowel(text):
        import numpy as np

        return np.array([ch in VOWELS for ch in text], dtype=np.float32)

    register("vowel", vowel, help="1 on a vowel")
