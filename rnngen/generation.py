"""Streaming text generation: prefill the prompt in one call, then step token by token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from rnngen.runtime import RnnModel
from rnngen.sampling import GenerationParams, sample_token

FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_STOP = "stop"  # a stop string was generated


class StopStringFilter:
    """Passes text through until a stop string appears; nothing from the stop string on gets out.

    Text that could be the start of a stop string is held back until the next
    chunk decides, so a stop string split across chunks is still caught.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.stopped = False
        self._pending = ""

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return buf[: min(hits)]
        hold = 0  # longest end of buf that begins some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


@dataclass
class GenerationResult:
    text: str
    new_tokens: int
    prompt_tokens: int
    finish_reason: str


class TextStream:
    """Iterate to receive text as it is generated; the result fields fill in as it runs."""

    def __init__(self, model: RnnModel, prompt: str, params: GenerationParams):
        params.check_for_vocab(model.config.vocab_size)
        self.model = model
        self.params = params
        tokenizer = model.tokenizer
        # Encoding checks the prompt before any work (unknown characters are an error by default).
        ids = tokenizer.encode(prompt, on_unknown=params.on_unknown)
        # An empty prompt starts the model the way texts start: after a newline (not shown).
        self.prompt_ids = ids if ids else tokenizer.start_ids()
        self.prompt_tokens = len(ids)
        self.new_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces():
            self.text += piece
            yield piece

    def _pieces(self) -> Iterator[str]:
        model, params = self.model, self.params
        rng = np.random.default_rng(params.seed)
        decoder = model.tokenizer.stream_decoder()
        stops = StopStringFilter(params.stop)
        prompt = np.asarray([self.prompt_ids], dtype=np.int64)  # (1, T)
        logits, state = model.run(prompt, model.initial_state(1))  # the whole prompt, one call
        last = logits[0, -1]
        step_input = np.zeros((1, 1), dtype=np.int64)
        while True:
            token = sample_token(last, params, rng)
            self.new_tokens += 1
            out = stops.push(decoder.push(token))
            if out:
                yield out
            if stops.stopped:
                self.finish_reason = FINISH_STOP
                return
            if self.new_tokens >= params.max_new_tokens:
                break
            step_input[0, 0] = token
            logits, state = model.run(step_input, state)
            last = logits[0, -1]
        out = stops.push(decoder.flush())
        out += stops.flush()
        if out:
            yield out
        self.finish_reason = FINISH_STOP if stops.stopped else FINISH_LENGTH


def generate(model: RnnModel, prompt: str, params: GenerationParams) -> GenerationResult:
    stream = TextStream(model, prompt, params)
    for _ in stream:
        pass
    return GenerationResult(stream.text, stream.new_tokens, stream.prompt_tokens, stream.finish_reason or FINISH_LENGTH)
