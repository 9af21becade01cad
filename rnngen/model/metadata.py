"""Typed reading of a model file's metadata: each value checked for size, shape and type.

Metadata is data from a stranger. Every entry is bounded in bytes before it is
decoded, every JSON value in how many objects and arrays it holds (rnngen writes
at most two per entry) before it is parsed, and every field is read as the type
it must have; a refusal names the entry, the field and what was expected.
"""

from __future__ import annotations

import json
import math
import re

from rnngen.model.config import ModelConfig
from rnngen.errors import ModelFormatError, RnngenError
from rnngen.model.tokenizers import Tokenizer, TokenizerKinds, tokenizer_from_dict

KEY_FORMAT = "rnngen.format_version"
KEY_CONFIG = "rnngen.config"
KEY_TOKENIZER = "rnngen.tokenizer"
KEY_STATE = "rnngen.state"
KEY_TRAINING = "rnngen.training"
KEY_VERSION = "rnngen.version"
KEY_CREATED = "rnngen.created"

MAX_ENTRIES = 64  # metadata entries in one file (rnngen writes 7)
MAX_KEY_BYTES = 256
MAX_VALUE_BYTES = 64 * 1024  # any entry but the tokenizer's
TOKENIZER_BYTES_PER_SYMBOL = 64  # the tokenizer entry may hold 1 KiB plus this much per vocabulary symbol
MAX_JSON_CONTAINERS = 8  # objects and arrays in one JSON value, which bounds its nesting too

# Escapes go first, so that what is left of a string has no quote inside: both patterns scan in linear time.
_JSON_ESCAPE = re.compile(r"\\.", re.DOTALL)
_JSON_STRING = re.compile(r'"[^"]*"')
_FORMAT_VERSION = re.compile(r"[0-9]{1,9}")

# Known fields of rnngen.training and the JSON types each may have (all may also be null).
_NUMBER, _INTEGER, _STRING = "a number", "an integer", "a string"
TRAINING_FIELDS = {
    "corpus": _STRING, "corpus_chars": _INTEGER, "corpus_tokens": _INTEGER, "val_fraction": _NUMBER,
    "val_loss": _NUMBER, "val_bits": _NUMBER, "steps": _INTEGER, "train_seconds": _NUMBER, "parameters": _INTEGER,
}
# Fields of rnngen.config and the JSON type of each (ModelConfig then checks their ranges).
CONFIG_FIELDS = {
    "cell": _STRING, "vocab_size": _INTEGER, "hidden_size": _INTEGER, "num_layers": _INTEGER,
    "embedding_size": _INTEGER, "dropout": _NUMBER, "tie_weights": "true or false",
}


def refuse(key: str, what: str) -> ModelFormatError:
    return ModelFormatError(f"metadata {key}: {what}")


def value_limit(key: str, vocab_size: int = 0) -> int:
    """The most bytes the entry `key` may hold (the tokenizer's grows with the vocabulary)."""
    return 1024 + TOKENIZER_BYTES_PER_SYMBOL * vocab_size if key == KEY_TOKENIZER else MAX_VALUE_BYTES


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}[type(value)]


def _is(value: object, kind: str) -> bool:
    if kind == _STRING:
        return isinstance(value, str)
    if kind == _INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, bool)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(key: str, text: str) -> object:
    """The JSON value of entry `key`, bounded in containers, with finite numbers and valid Unicode strings."""
    skeleton = _JSON_STRING.sub("", _JSON_ESCAPE.sub("", text))  # brackets outside strings
    containers = skeleton.count("[") + skeleton.count("{")
    if containers > MAX_JSON_CONTAINERS:
        raise refuse(key, f"JSON holds {containers} objects and lists; at most {MAX_JSON_CONTAINERS} are allowed")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise refuse(key, f"the value is not valid JSON ({exc.msg})") from None
    except ValueError as exc:  # integers of thousands of digits, NaN/Infinity
        raise refuse(key, f"the value is not valid JSON ({exc})") from None
    _check_strings(key, value, "")
    return value


def _check_strings(key: str, value: object, where: str) -> None:
    """Strings must be Unicode text: JSON escapes can make lone surrogates, which no encoding accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        raise refuse(key, f"{where or 'the value'} is {value}, expected a finite number")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise refuse(key, f"{where or 'the value'} {value[:40]!r} holds U+{ord(value[exc.start]):04X}, a lone "
                              "surrogate, not a Unicode character") from None
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_strings(key, item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_strings(key, name, "a field name")
            _check_strings(key, item, f"{where}.{name}" if where else name)


def _object(key: str, value: object) -> dict:
    if not isinstance(value, dict):
        raise refuse(key, f"the value is {_type_name(value)}, expected a JSON object")
    return value


def read_format_version(text: str) -> int:
    if not _FORMAT_VERSION.fullmatch(text):
        raise refuse(KEY_FORMAT, f"{text[:40]!r} is not a whole number")
    return int(text)


def read_config(text: str) -> ModelConfig:
    data = _object(KEY_CONFIG, parse_json(KEY_CONFIG, text))
    for name, value in data.items():
        kind = CONFIG_FIELDS.get(name)
        if kind is None:
            raise refuse(KEY_CONFIG, f"unknown field {name!r}; known: {', '.join(CONFIG_FIELDS)}")
        if not _is(value, kind):
            raise refuse(KEY_CONFIG, f"{name} is {_type_name(value)}, expected {kind}")
    try:
        return ModelConfig(**data)
    except RnngenError as exc:
        raise refuse(KEY_CONFIG, str(exc)) from None


def read_tokenizer(text: str, config: ModelConfig, kinds: TokenizerKinds | None = None) -> Tokenizer:
    data = _object(KEY_TOKENIZER, parse_json(KEY_TOKENIZER, text))
    symbols = data.get("symbols")
    if isinstance(symbols, list) and len(symbols) != config.vocab_size:  # before any table is built from them
        raise refuse(KEY_TOKENIZER, f"tokenizer has {len(symbols)} symbols but the model config says {config.vocab_size}")
    try:
        tokenizer = tokenizer_from_dict(data, kinds)
    except RnngenError as exc:
        raise refuse(KEY_TOKENIZER, str(exc)) from None
    if tokenizer.vocab_size != config.vocab_size:
        raise refuse(KEY_TOKENIZER, f"tokenizer has {tokenizer.vocab_size} symbols but the model config says {config.vocab_size}")
    return tokenizer


def read_state(text: str, config: ModelConfig) -> None:
    state = parse_json(KEY_STATE, text)
    if state != list(config.state_names):
        raise refuse(KEY_STATE, f"state layout {json.dumps(state)} does not match a {config.cell} model "
                                f"{json.dumps(list(config.state_names))}")


def read_training(text: str) -> dict:
    data = _object(KEY_TRAINING, parse_json(KEY_TRAINING, text))
    for name, value in data.items():
        kind = TRAINING_FIELDS.get(name)
        if kind is None:  # fields a newer rnngen may add: plain values only
            if isinstance(value, (dict, list)):
                raise refuse(KEY_TRAINING, f"{name} is {_type_name(value)}, expected a plain value")
        elif value is not None and not _is(value, kind):
            raise refuse(KEY_TRAINING, f"{name} is {_type_name(value)}, expected {kind} or null")
    return data
