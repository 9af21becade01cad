"""Features of a text, one value per character, for finding the units that track them.

A feature describes the reader's situation *after* reading each character, which is
what the model's state after that character can encode: after an opening quote the
reader is inside quotes, after a newline the line position is 0.

Built-ins register through the plugin hook `register_inspect_features`; users add
their own with `rnngen inspect --feature NAME=REGEX` or a plugin.
"""

from __future__ import annotations

import re

import numpy as np

from rnngen.errors import InvalidParameterError


def line_position(text: str) -> np.ndarray:
    """Characters read since the last newline (0 right after a newline)."""
    out = np.empty(len(text), dtype=np.float32)
    pos = 0
    for i, ch in enumerate(text):
        pos = 0 if ch == "\n" else pos + 1
        out[i] = pos
    return out


def line_start(text: str) -> np.ndarray:
    """1 after a newline: the next character begins a line."""
    return np.array([ch == "\n" for ch in text], dtype=np.float32)


def _toggle(text: str, mark: str) -> np.ndarray:
    out = np.empty(len(text), dtype=np.float32)
    inside = False
    for i, ch in enumerate(text):
        if ch == mark:
            inside = not inside
        out[i] = inside
    return out


def inside_double_quotes(text: str) -> np.ndarray:
    """1 between an opening and a closing double quote (the opening one included)."""
    return _toggle(text, '"')


def _depth(text: str, opening: str, closing: str) -> np.ndarray:
    out = np.empty(len(text), dtype=np.float32)
    depth = 0
    for i, ch in enumerate(text):
        if ch in opening:
            depth += 1
        elif ch in closing and depth > 0:
            depth -= 1
        out[i] = depth
    return out


def paren_depth(text: str) -> np.ndarray:
    """Nesting depth of ( ) after each character."""
    return _depth(text, "(", ")")


def inside_parens(text: str) -> np.ndarray:
    return (paren_depth(text) > 0).astype(np.float32)


def bracket_depth(text: str) -> np.ndarray:
    """Nesting depth of [ ] and { } after each character."""
    return _depth(text, "[{", "]}")


def inside_word(text: str) -> np.ndarray:
    """1 on letters, digits and apostrophes inside a word."""
    return np.array([ch.isalnum() or (ch == "'" and 0 < i < len(text) - 1 and text[i - 1].isalpha())
                     for i, ch in enumerate(text)], dtype=np.float32)


def word_position(text: str) -> np.ndarray:
    """Letters read since the word began (0 outside words)."""
    out = np.empty(len(text), dtype=np.float32)
    pos = 0
    for i, ch in enumerate(text):
        pos = pos + 1 if ch.isalnum() else 0
        out[i] = pos
    return out


def uppercase_run(text: str) -> np.ndarray:
    """1 inside a run of capitals of length >= 2 (speaker names such as ROMEO:, acronyms)."""
    return regex_feature(r"[A-Z][A-Z]+")(text)


def regex_feature(pattern: str):
    """A feature that is 1 on every character inside a match of `pattern`."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise InvalidParameterError(f"feature: {pattern!r} is not a valid regular expression: {exc}") from None

    def compute(text: str) -> np.ndarray:
        out = np.zeros(len(text), dtype=np.float32)
        for m in compiled.finditer(text):
            out[m.start():m.end()] = 1.0
        return out

    return compute


def parse_feature_option(option: str) -> tuple[str, object]:
    """`NAME=REGEX` from the command line -> (name, compute)."""
    name, sep, pattern = option.partition("=")
    if not sep or not name.strip() or not pattern:
        raise InvalidParameterError(f"--feature: {option!r} is not NAME=REGEX (e.g. 'exclaim=!')")
    return name.strip(), regex_feature(pattern)


BUILTIN_FEATURES = {
    "line_position": (line_position, "characters since the last newline"),
    "line_start": (line_start, "1 right after a newline"),
    "inside_quotes": (inside_double_quotes, "inside double quotes"),
    "inside_parens": (inside_parens, "inside ( )"),
    "paren_depth": (paren_depth, "nesting depth of ( )"),
    "bracket_depth": (bracket_depth, "nesting depth of [ ] and { }"),
    "inside_word": (inside_word, "on a letter or digit of a word"),
    "word_position": (word_position, "letters since the word began"),
    "uppercase_run": (uppercase_run, "inside a run of two or more capitals (e.g. speaker names)"),
}
