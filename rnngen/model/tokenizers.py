"""Tokenizers: char, byte and word level. They travel inside the model file.

Each tokenizer turns text into integer ids and back, and makes a
`StreamDecoder` that turns ids into text one at a time, so streamed output is
always whole characters (a byte-level model never shows half a UTF-8 character).

Unknown input (a policy users choose with `on_unknown`):
  - char: "error" (default) names every character that is not in the
    vocabulary; "replace" substitutes the replacement character (a space if
    the vocabulary has one, else its first symbol); "skip" drops them.
  - byte: every UTF-8 text is in the vocabulary.
  - word: words outside the capped vocabulary become `<unk>`, as in Penn
    Treebank-style corpora.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol

from rnngen.checks import check_choice
from rnngen.errors import InvalidParameterError, TokenizerError

UNKNOWN_POLICIES = ("error", "replace", "skip")


class StreamDecoder(Protocol):
    def push(self, token_id: int) -> str:
        """Text that is complete after this token ('' while a character is unfinished)."""

    def flush(self) -> str:
        """Whatever is left at the end of the stream."""

    def save(self) -> bytes:
        """The decoder's unfinished state (to resume a stream elsewhere)."""

    def restore(self, saved: bytes) -> None:
        """Continue from a state made by save()."""

    # Optional: push_many(token_ids) -> str, the same text as push() of each in turn, in one call.


def push_tokens(decoder: StreamDecoder, token_ids: list[int]) -> str:
    """The text of these tokens pushed in turn: one `push_many` call where the decoder has one (the
    built-in ones: a server decodes each row's tokens since its last message at once), else a push
    each (a plugin's decoder needs only `push`)."""
    push_many = getattr(decoder, "push_many", None)
    if push_many is not None:
        return push_many(token_ids)
    return "".join(decoder.push(t) for t in token_ids)


def _check_policy(on_unknown: str) -> None:
    check_choice("on_unknown", on_unknown, UNKNOWN_POLICIES)


def _describe_chars(chars: Iterable[str]) -> str:
    parts = []
    for ch in chars:
        name = unicodedata.name(ch, "")
        parts.append(f"{ch!r} (U+{ord(ch):04X}{' ' + name if name else ''})")
    return ", ".join(parts)


class CharTokenizer:
    kind = "char"

    def __init__(self, symbols: list[str]):
        if len(symbols) < 2 or any(len(s) != 1 for s in symbols) or len(set(symbols)) != len(symbols):
            raise TokenizerError("char vocabulary must be at least 2 distinct single characters")
        self.symbols = list(symbols)
        self._index = {s: i for i, s in enumerate(self.symbols)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    @property
    def replacement(self) -> str:
        return " " if " " in self._index else self.symbols[0]

    def encode(self, text: str, on_unknown: str = "error") -> list[int]:
        _check_policy(on_unknown)
        index = self._index
        unknown = {ch for ch in set(text) if ch not in index}
        if unknown:
            if on_unknown == "error":
                shown = sorted(unknown)
                more = f" and {len(shown) - 10} more" if len(shown) > 10 else ""
                raise TokenizerError(
                    f"text has {len(shown)} character(s) not in the model's vocabulary: "
                    f"{_describe_chars(shown[:10])}{more}; "
                    "use --unknown replace or --unknown skip to go on"
                )
            if on_unknown == "replace":
                text = "".join(ch if ch in index else self.replacement for ch in text)
            else:
                text = "".join(ch for ch in text if ch in index)
        return [index[ch] for ch in text]

    def count_unknown(self, text: str) -> int:
        """How many characters of the text are not in the vocabulary."""
        index = self._index
        return sum(text.count(ch) for ch in set(text) if ch not in index)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.symbols[i] for i in ids)

    def stream_decoder(self) -> StreamDecoder:
        return _TableStreamDecoder(self.symbols)

    def start_ids(self) -> list[int]:
        """What primes the model when the prompt is empty: a newline, as at a text's start."""
        return [self._index.get("\n", 0)]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "symbols": self.symbols}


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256

    def encode(self, text: str, on_unknown: str = "error") -> list[int]:
        _check_policy(on_unknown)
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return _Utf8StreamDecoder()

    def start_ids(self) -> list[int]:
        return [10]  # "\n"

    def to_dict(self) -> dict:
        return {"kind": self.kind}


class WordTokenizer:
    """Whitespace-separated words; each line ends with an `<eos>` token."""

    kind = "word"
    UNK = "<unk>"
    EOS = "<eos>"

    def __init__(self, symbols: list[str]):
        if symbols[:2] != [self.UNK, self.EOS] or len(set(symbols)) != len(symbols):
            raise TokenizerError("word vocabulary must start with <unk>, <eos> and have no duplicates")
        for i, word in enumerate(symbols):
            if word.split() != [word]:  # encoding splits text at whitespace: such a symbol could never be read
                raise TokenizerError(f"word vocabulary symbol {i} ({word[:40]!r}) is empty or holds whitespace")
        self.symbols = list(symbols)
        self._index = {s: i for i, s in enumerate(self.symbols)}

    @classmethod
    def from_text(cls, text: str, max_vocab: int = 10_000) -> "WordTokenizer":
        if max_vocab < 3:
            raise InvalidParameterError.about("{max_vocab}: {value} is below the minimum 3", value=max_vocab)
        counts = Counter(w for w in _words(text) if w not in (cls.UNK, cls.EOS))
        # Most frequent first; ties broken alphabetically so the vocabulary is reproducible.
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([cls.UNK, cls.EOS] + [w for w, _ in ranked[: max_vocab - 2]])

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str, on_unknown: str = "error") -> list[int]:
        """Ids of a prompt: a last line without a line end continues (no <eos> after it)."""
        _check_policy(on_unknown)
        unk = self._index[self.UNK]
        return [self._index.get(w, unk) for w in _words(text)]

    def encode_document(self, text: str, on_unknown: str = "error") -> list[int]:
        """Ids of a whole file: every line ends with <eos>, the last one too, with or without a final line end."""
        ids = self.encode(text, on_unknown)
        if text and not text.endswith(("\n", "\r")):
            ids.append(self._index[self.EOS])
        return ids

    def count_unknown(self, text: str) -> int:
        """How many words of the text are outside the vocabulary (they become <unk>)."""
        index = self._index
        return sum(1 for w in _words(text) if w not in index)

    def decode(self, ids: Iterable[int]) -> str:
        decoder = self.stream_decoder()
        return "".join(decoder.push(i) for i in ids) + decoder.flush()

    def stream_decoder(self) -> StreamDecoder:
        return _WordStreamDecoder(self.symbols, self.EOS)

    def start_ids(self) -> list[int]:
        return [self._index[self.EOS]]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "symbols": self.symbols}


Tokenizer = CharTokenizer | ByteTokenizer | WordTokenizer


_LINE_END = re.compile(r"\r\n|\r|\n")


def _words(text: str) -> Iterable[str]:
    """Words of each line, then <eos> at every line end: \\n, \\r\\n or \\r (Penn Treebank convention)."""
    lines = _LINE_END.split(text)
    for i, line in enumerate(lines):
        yield from line.split()
        if i < len(lines) - 1:
            yield WordTokenizer.EOS


def encode_document(tokenizer: Tokenizer, text: str, on_unknown: str = "error") -> list[int]:
    """A whole file's ids (training, validation, scoring); for a word tokenizer the last line ends with <eos> too."""
    encode = getattr(tokenizer, "encode_document", tokenizer.encode)
    return encode(text, on_unknown)


def count_unknown(tokenizer: Tokenizer, text: str) -> int | None:
    """How many tokens of the text are outside the vocabulary (None: the tokenizer cannot say)."""
    count = getattr(tokenizer, "count_unknown", None)
    return None if count is None else count(text)


@dataclass(frozen=True)
class TokenizerKind:
    """How to make a tokenizer of one kind: from a model file's metadata, and for training."""

    from_dict: Callable[[dict], Tokenizer]  # rebuilds one from the dict its to_dict() made
    from_text: Callable[[str, int], Tokenizer] | None = None  # (training text, max_vocab) -> a fitted one


TokenizerKinds = Mapping[str, TokenizerKind]

# The kinds rnngen knows by itself. Plugins add kinds through the registry (rnngen.plugins);
# the CLI and the server pass those down, so loading a model needs no plugin machinery.
BUILTIN_TOKENIZERS: dict[str, TokenizerKind] = {
    "char": TokenizerKind(lambda data: CharTokenizer(symbols_of(data, "char")),
                          lambda text, max_vocab: CharTokenizer.from_text(text)),
    "byte": TokenizerKind(lambda data: ByteTokenizer(), lambda text, max_vocab: ByteTokenizer()),
    "word": TokenizerKind(lambda data: WordTokenizer(symbols_of(data, "word")),
                          lambda text, max_vocab: WordTokenizer.from_text(text, max_vocab)),
}


def _kind(kind: object, kinds: TokenizerKinds | None, error: type[Exception]) -> TokenizerKind:
    table = BUILTIN_TOKENIZERS if kinds is None else kinds
    if not isinstance(kind, str) or kind not in table:
        message = "{value!r} is not one of {choices} (a plugin may provide it: see `rnngen plugins`)"
        choices = ", ".join(sorted(table))
        if error is InvalidParameterError:  # an option
            raise InvalidParameterError.about("{tokenizer}: " + message, value=kind, choices=choices)
        raise error("tokenizer kind " + message.format(value=kind, choices=choices))  # a file's metadata
    return table[kind]


def check_tokenizer_kind(kind: str, kinds: TokenizerKinds | None = None) -> None:
    """Raises, naming the known kinds, unless `kind` can be built for training."""
    if _kind(kind, kinds, InvalidParameterError).from_text is None:
        raise InvalidParameterError.about("{tokenizer}: {value!r} cannot be built for training", value=kind)


def build_tokenizer(kind: str, text: str, max_vocab: int = 10_000, kinds: TokenizerKinds | None = None) -> Tokenizer:
    """A tokenizer of a known kind (built-in, or in `kinds`) fitted to a training text."""
    check_tokenizer_kind(kind, kinds)
    return _kind(kind, kinds, InvalidParameterError).from_text(text, max_vocab)


def tokenizer_from_dict(data: dict, kinds: TokenizerKinds | None = None) -> Tokenizer:
    """Rebuild a tokenizer from model metadata (plain JSON data, nothing executed)."""
    if not isinstance(data, dict):
        raise TokenizerError("tokenizer description is not a JSON object")
    return _kind(data.get("kind"), kinds, TokenizerError).from_dict(data)


def symbols_of(data: dict, kind: str) -> list[str]:
    symbols = data.get("symbols")
    if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
        raise TokenizerError(f"{kind} tokenizer needs a list of string symbols")
    return symbols


class _TableStreamDecoder:
    def __init__(self, symbols: list[str]):
        self._symbols = symbols

    def push(self, token_id: int) -> str:
        return self._symbols[token_id]

    def push_many(self, token_ids: list[int]) -> str:
        return "".join(map(self._symbols.__getitem__, token_ids))

    def flush(self) -> str:
        return ""

    def save(self) -> bytes:
        return b""

    def restore(self, saved: bytes) -> None:
        pass


class _Utf8StreamDecoder:
    """Holds back the bytes of an unfinished UTF-8 character until it completes."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(bytes((token_id,)))

    def push_many(self, token_ids: list[int]) -> str:
        return self._decoder.decode(bytes(token_ids))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)

    def save(self) -> bytes:
        return self._decoder.getstate()[0]  # the bytes of an unfinished character

    def restore(self, saved: bytes) -> None:
        self._decoder.setstate((saved[:3], 0))


class _WordStreamDecoder:
    def __init__(self, symbols: list[str], eos: str):
        self._symbols = symbols
        self._eos = eos
        self._line_start = True

    def push(self, token_id: int) -> str:
        word = self._symbols[token_id]
        if word == self._eos:
            self._line_start = True
            return "\n"
        text = word if self._line_start else " " + word
        self._line_start = False
        return text

    def flush(self) -> str:
        return ""

    def save(self) -> bytes:
        return b"\x01" if self._line_start else b"\x00"

    def restore(self, saved: bytes) -> None:
        self._line_start = saved != b"\x00"
