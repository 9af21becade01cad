"""Resumable sessions: a stream's whole state as an opaque, HMAC-signed token.

An RNN stream's state has a fixed size, so it travels: the token holds the
recurrent state of the row, the last generated token (sampled but not yet fed
to the model), the row's random generator, a UTF-8 decoder's unfinished bytes
and the last HISTORY_TAIL tokens (what n-gram bans and the repetition penalty
look at when the stream goes on). Any server holding the same secret continues
the text exactly where it stopped: with the same seed, the same text as one
uninterrupted request.

Layout: b"RNGS" | version (1 byte) | header length (4 bytes, big-endian) |
header (JSON) | state arrays (float32, little-endian, in the model's state
order) | HMAC-SHA256 of everything before it (32 bytes). The signature is
checked, in constant time, before any other byte is read: a tampered or
foreign token is refused without being parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import time
from dataclasses import dataclass

import numpy as np

from rnngen.errors import SessionExpiredError, SessionTokenError

MAGIC = b"RNGS"
VERSION = 1
MAC_BYTES = 32
HISTORY_TAIL = 64
DEFAULT_TTL_S = 24 * 3600


@dataclass
class SessionState:
    model_id: str  # which model file the state belongs to (hash of its bytes)
    state: dict[str, np.ndarray]  # each (layers, 1, hidden) float32
    pending_token: int  # sampled last, not yet fed to the model
    rng_state: dict  # numpy PCG64 state
    decoder_pending: bytes  # unfinished UTF-8 bytes of a byte-level stream
    history_tail: list[int]
    generated_before: int  # tokens generated in the session so far


class SessionCodec:
    def __init__(self, secret: bytes, ttl_s: float = DEFAULT_TTL_S):
        if len(secret) < 16:
            raise SessionTokenError("session secret must be at least 16 bytes")
        self._secret = secret
        self.ttl_s = ttl_s

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self._secret, data, hashlib.sha256).digest()

    def encode(self, s: SessionState, state_names: tuple[str, ...], now: float | None = None) -> bytes:
        now = time.time() if now is None else now
        shapes = {name: list(s.state[name].shape) for name in state_names}
        header = {
            "model": s.model_id, "issued": int(now), "expires": int(now + self.ttl_s), "states": list(state_names),
            "shapes": shapes, "pending": int(s.pending_token), "rng": s.rng_state,
            "decoder": s.decoder_pending.hex(), "history": [int(t) for t in s.history_tail[-HISTORY_TAIL:]],
            "generated": int(s.generated_before),
        }
        head = json.dumps(header, separators=(",", ":")).encode()
        body = b"".join(np.ascontiguousarray(s.state[name], dtype="<f4").tobytes() for name in state_names)
        data = MAGIC + bytes([VERSION]) + struct.pack(">I", len(head)) + head + body
        return data + self._mac(data)

    def decode(self, token: bytes, model_id: str, state_names: tuple[str, ...], now: float | None = None) -> SessionState:
        if len(token) < len(MAGIC) + 5 + MAC_BYTES or not token.startswith(MAGIC):
            raise SessionTokenError("session: not an rnngen session token")
        data, mac = token[:-MAC_BYTES], token[-MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(data)):
            raise SessionTokenError("session: signature does not match (tampered, or issued by a server with another secret)")
        # Signed by a server holding our secret: from here on the content is ours.
        if data[4] != VERSION:
            raise SessionTokenError(f"session: token version {data[4]} is not supported (expected {VERSION})")
        (head_len,) = struct.unpack(">I", data[5:9])
        header = json.loads(data[9 : 9 + head_len])
        now = time.time() if now is None else now
        if now > header["expires"]:
            raise SessionExpiredError(f"session: token expired {int(now - header['expires'])} s ago")
        if header["model"] != model_id:
            raise SessionTokenError("session: token belongs to another model")
        if tuple(header["states"]) != tuple(state_names):
            raise SessionTokenError("session: token's state layout does not match the model")
        body = data[9 + head_len :]
        state, offset = {}, 0
        for name in state_names:
            shape = tuple(header["shapes"][name])
            count = int(np.prod(shape))
            state[name] = np.frombuffer(body, dtype="<f4", count=count, offset=offset).reshape(shape).astype(np.float32)
            offset += count * 4
        return SessionState(header["model"], state, header["pending"], header["rng"], bytes.fromhex(header["decoder"]),
                            header["history"], header["generated"])


def model_identity(model_bytes: bytes) -> str:
    return hashlib.sha256(model_bytes).hexdigest()[:32]


def rng_from_state(state: dict) -> np.random.Generator:
    if state.get("bit_generator") != "PCG64":
        raise SessionTokenError("session: unsupported random generator")
    bit_generator = np.random.PCG64()
    bit_generator.state = state
    return np.random.Generator(bit_generator)
