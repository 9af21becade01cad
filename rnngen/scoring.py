"""`rnngen score`: loss of a text file under a model, in constant memory.

The file is read in pieces and fed through the model in segments with the
state carried across, so only one segment's logits exist at a time and the
result does not depend on the segment size. The first token is predicted
after the model's start symbol (a newline), like the start of any text. A word
model's file ends with <eos> like every line, with or without a final line end;
tokens outside the vocabulary (words that became <unk>, characters replaced or
skipped) are counted.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from rnngen.corpus import check_text_file
from rnngen.errors import DataError
from rnngen.decoding.logits import log_softmax
from rnngen.model.prefill_graph import PREFILL_CHUNK
from rnngen.model.runtime import RnnModel
from rnngen.model.tokenizers import count_unknown, encode_document

READ_CHARS = 1 << 20  # characters read per piece of the file
SEGMENT_TOKENS = PREFILL_CHUNK  # tokens per model call: the chunks prompts are prefilled in


@dataclass
class ScoreResult:
    tokens: int
    chars: int
    nats: float  # total negative log-likelihood
    unknown_tokens: int | None = None  # tokens outside the vocabulary (None: the tokenizer cannot say)

    @property
    def nats_per_token(self) -> float:
        return self.nats / self.tokens

    @property
    def bits_per_token(self) -> float:
        return self.nats_per_token / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def nats_per_char(self) -> float:
        return self.nats / self.chars

    @property
    def bits_per_char(self) -> float:
        return self.nats_per_char / math.log(2)

    def to_dict(self) -> dict:
        return dict(asdict(self), nats_per_token=self.nats_per_token, bits_per_token=self.bits_per_token,
                    perplexity=self.perplexity, nats_per_char=self.nats_per_char, bits_per_char=self.bits_per_char)


def _text_pieces(path: Path) -> Iterator[str]:
    """The file as text, a piece at a time, each piece ending on a line boundary where possible."""
    carry = ""
    with path.open("r", encoding="utf-8", newline="") as f:
        while True:
            try:
                piece = f.read(READ_CHARS)
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} is not UTF-8 text ({exc.reason} near byte {exc.start} of a piece)") from None
            if not piece:
                break
            piece = carry + piece
            cut = piece.rfind("\n") + 1  # keep the last partial line for the next piece (whole words)
            if cut == 0:
                carry = piece
                continue
            carry = piece[cut:]
            yield piece[:cut]
    if carry:
        yield carry


def score_file(model: RnnModel, path: str | os.PathLike, on_unknown: str = "error",
               segment_tokens: int = SEGMENT_TOKENS,
               on_progress: Callable[[int, int], None] | None = None) -> ScoreResult:
    """The loss of the text in `path`; `on_progress(tokens scored, bytes of the file scored)` after each segment."""
    path = check_text_file(path)
    tokenizer = model.tokenizer
    state = model.initial_state(1)
    previous = tokenizer.start_ids()[-1]  # the token before the first one scored
    total_tokens = total_chars = 0
    nats = 0.0
    done_bytes = 0
    unknown: int | None = 0
    for text in _text_pieces(path):
        total_chars += len(text)
        piece_bytes = len(text.encode("utf-8"))
        ids = encode_document(tokenizer, text, on_unknown)
        piece_unknown = count_unknown(tokenizer, text)
        unknown = None if unknown is None or piece_unknown is None else unknown + piece_unknown
        for start in range(0, len(ids), segment_tokens):
            targets = np.asarray(ids[start : start + segment_tokens], dtype=np.int64)
            inputs = np.concatenate(([previous], targets[:-1]))[None, :]  # (1, T)
            logits, state = model.run(inputs, state)
            nats += float(_nll(logits[0], targets))
            previous = int(targets[-1])
            total_tokens += len(targets)
            if on_progress:  # bytes scored, pro rata within the piece
                on_progress(total_tokens, done_bytes + piece_bytes * (start + len(targets)) // len(ids))
        done_bytes += piece_bytes
    if total_tokens == 0:
        raise DataError(f"{path} has no tokens to score")
    return ScoreResult(total_tokens, total_chars, nats, unknown)


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed -log softmax(logits)[target] over rows, computed stably in float64."""
    log_p = log_softmax(logits.astype(np.float64))
    return float(-log_p[np.arange(len(targets)), targets].sum())
