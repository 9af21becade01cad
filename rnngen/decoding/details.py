"""Per-token details while generating: what the model thought when each token was chosen."""

from __future__ import annotations

import numpy as np

from rnngen.decoding.logits import log_softmax
from rnngen.model.units import Unit


def token_details(logits: np.ndarray, token: int, top: int, tokenizer, units: list[Unit],
                  state: dict[str, np.ndarray] | None, row: int) -> dict:
    """What the model thought when a token was chosen: its log-probability, the entropy, the
    most likely alternatives (all under the model's own distribution, before any sampling
    processors) and the selected units of the state the token was predicted from."""
    log_p = log_softmax(logits.astype(np.float64))
    p = np.exp(log_p)
    order = np.argsort(-log_p)[:top] if top else []
    details = {
        "token_id": int(token),
        "text": _token_text(tokenizer, token),
        "logprob": round(float(log_p[token]), 5),
        "entropy": round(float(-(p * log_p).sum()), 5),  # nats
        "top": [{"token_id": int(i), "text": _token_text(tokenizer, i), "prob": round(float(p[i]), 5)} for i in order],
    }
    if units:
        details["units"] = {u.name: round(float(state[u.kind][u.layer, row, u.index]), 5) for u in units}
    return details


def _token_text(tokenizer, token: int) -> str:
    """A token on its own; a byte as an escape such as \\xe2 (alone it may be half a character)."""
    if tokenizer.kind == "byte":
        return repr(bytes([int(token)]))[2:-1]
    return tokenizer.decode([int(token)])
