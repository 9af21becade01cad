"""Generation parameters (validated once, where a request enters) and token sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from rnngen.errors import InvalidParameterError
from rnngen.tokenizers import UNKNOWN_POLICIES

MAX_NEW_TOKENS_LIMIT = 100_000_000  # state is fixed-size, so long streams are fine
MAX_STOP_STRINGS = 16
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 500  # tokens to generate after the prompt
    temperature: float = 0.8  # softmax temperature; 0 means greedy (always the most likely token)
    top_k: int = 0  # keep only the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1 keeps all
    seed: int | None = None  # same seed, same text; None draws a fresh one
    stop: tuple[str, ...] = field(default_factory=tuple)  # generation ends before any of these strings
    on_unknown: str = "error"  # prompt characters outside the vocabulary: error, replace or skip

    def __post_init__(self) -> None:
        _int_in("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS_LIMIT)
        _float_in("temperature", self.temperature, 0.0, 100.0)
        _int_in("top_k", self.top_k, 0, 10_000_000)
        _float_in("top_p", self.top_p, 0.0, 1.0)
        if self.top_p <= 0.0:
            raise InvalidParameterError(f"top_p: {self.top_p} is outside (0, 1]")
        if self.seed is not None:
            _int_in("seed", self.seed, 0, MAX_SEED)
        if not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParameterError(f"stop: {len(self.stop)} strings given, at most {MAX_STOP_STRINGS} allowed")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidParameterError(f"stop: {s!r} is not a non-empty string")
        if self.on_unknown not in UNKNOWN_POLICIES:
            raise InvalidParameterError(f"on_unknown: {self.on_unknown!r} is not one of {', '.join(UNKNOWN_POLICIES)}")

    def check_for_vocab(self, vocab_size: int) -> None:
        if self.top_k > vocab_size:
            raise InvalidParameterError(f"top_k: {self.top_k} is larger than the model's vocabulary ({vocab_size})")


def _int_in(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not (lo <= value <= hi):
        raise InvalidParameterError(f"{name}: {value!r} is not an integer in [{lo}, {hi}]")


def _float_in(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (lo <= value <= hi):
        raise InvalidParameterError(f"{name}: {value!r} is not a finite number in [{lo}, {hi}]")


def next_token_distribution(logits: np.ndarray, params: GenerationParams) -> np.ndarray:
    """Probabilities (float64, sum 1) after temperature, top-k and top-p, in that order."""
    x = logits.astype(np.float64) / params.temperature
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        keep = np.argpartition(x, -params.top_k)[-params.top_k :]
        masked = np.full_like(x, -np.inf)
        masked[keep] = x[keep]
        x = masked
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # Smallest prefix of the sorted tokens whose mass reaches top_p (at least one token).
        cut = min(int(np.searchsorted(cumulative, params.top_p, side="left")) + 1, vocab)
        kept = np.zeros_like(probs)
        kept[order[:cut]] = probs[order[:cut]]
        probs = kept / kept.sum()
    return probs


def sample_token(logits: np.ndarray, params: GenerationParams, rng: np.random.Generator) -> int:
    """One token id from logits (V,), by the params' rules; greedy when temperature is 0."""
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    probs = next_token_distribution(logits, params)
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(index, probs.shape[0] - 1)
