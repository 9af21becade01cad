"""Resumable sessions: a stream's whole row as an opaque, HMAC-signed token.

An RNN stream's state has a fixed size, so it travels: the token holds the
row's complete snapshot (rnngen.decoding.rows.RowSnapshot): the recurrent
state, the last generated token (chosen but not yet fed to the model), the
random generator's position, the session's token count and log-probability,
the window of recent tokens n-gram bans look at, the repetition penalty's seen
set and the presence/frequency counts (each bounded by the vocabulary), a
byte model's unfinished UTF-8 bytes and the text held back for stop strings.
Any server holding the same secret continues the stream exactly where it
stopped: N tokens, then M more from the token, are the N+M tokens of one
uninterrupted request with the same parameters.

Layout: b"RNGS" | version (1 byte) | header length (4 bytes, big-endian) |
header (JSON, naming the arrays that follow) | arrays (little-endian, in
header order) | HMAC-SHA256 of everything before it (32 bytes). The signature
is checked, in constant time, before any other byte is read: a tampered or
foreign token is refused without being parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import time

import numpy as np

from rnngen.decoding.rows import RowSnapshot
from rnngen.errors import SessionExpiredError, SessionTokenError

MAGIC = b"RNGS"
VERSION = 2  # 1: a 64-token history tail and no penalty or stop state (could not resume exactly)
MAC_BYTES = 32
DEFAULT_TTL_S = 24 * 3600
_DTYPES = {"f4": "<f4", "i4": "<i4", "i8": "<i8"}


def _arrays(s: RowSnapshot, state_names: tuple[str, ...]) -> dict[str, tuple[str, np.ndarray]]:
    """The snapshot's arrays by name, with their on-the-wire dtype."""
    arrays = {f"state.{name}": ("f4", s.state[name]) for name in state_names}
    arrays["window"] = ("i4", np.asarray(s.window))
    if s.seen is not None:
        arrays["seen"] = ("i4", np.asarray(s.seen))
    if s.counts is not None:
        arrays["count_tokens"] = ("i4", np.asarray(list(s.counts.keys())))
        arrays["count_values"] = ("i8", np.asarray(list(s.counts.values())))
    return arrays


class SessionCodec:
    def __init__(self, secret: bytes, ttl_s: float = DEFAULT_TTL_S):
        if len(secret) < 16:
            raise SessionTokenError("session secret must be at least 16 bytes")
        self._secret = secret
        self.ttl_s = ttl_s

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self._secret, data, hashlib.sha256).digest()

    def encode(self, model_id: str, s: RowSnapshot, state_names: tuple[str, ...], now: float | None = None) -> bytes:
        now = time.time() if now is None else now
        arrays = _arrays(s, state_names)
        header = {
            "model": model_id, "issued": int(now), "expires": int(now + self.ttl_s), "states": list(state_names),
            "arrays": [[name, dtype, list(np.shape(value))] for name, (dtype, value) in arrays.items()],
            "pending": int(s.pending_token), "rng": s.rng_state, "generated": int(s.generated),
            "logprob": float(s.logprob), "decoder": s.decoder_pending.hex(), "stop_pending": s.stop_pending,
        }
        head = json.dumps(header, separators=(",", ":")).encode()
        body = b"".join(np.ascontiguousarray(value, dtype=_DTYPES[dtype]).tobytes() for dtype, value in arrays.values())
        data = MAGIC + bytes([VERSION]) + struct.pack(">I", len(head)) + head + body
        return data + self._mac(data)

    def decode(self, token: bytes, model_id: str, state_names: tuple[str, ...], now: float | None = None) -> RowSnapshot:
        if len(token) < len(MAGIC) + 5 + MAC_BYTES or not token.startswith(MAGIC):
            raise SessionTokenError("session: not an rnngen session token")
        data, mac = token[:-MAC_BYTES], token[-MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(data)):
            raise SessionTokenError("session: signature does not match (tampered, or issued by a server with another secret)")
        # Signed by a server holding our secret: from here on the content is ours.
        if data[4] != VERSION:
            raise SessionTokenError(f"session: token format {data[4]} is from another rnngen version (this server reads "
                                    f"format {VERSION}); start a new stream from the text instead")
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
        arrays, offset = {}, 0
        for name, dtype, shape in header["arrays"]:
            wire = np.dtype(_DTYPES[dtype])
            count = int(np.prod(shape))
            arrays[name] = np.frombuffer(body, dtype=wire, count=count, offset=offset).reshape(shape)
            offset += count * wire.itemsize
        counts = None
        if "count_tokens" in arrays:
            counts = dict(zip(arrays["count_tokens"].tolist(), arrays["count_values"].tolist()))
        return RowSnapshot(
            state={name: arrays[f"state.{name}"].astype(np.float32) for name in state_names},
            pending_token=header["pending"], rng_state=_checked_rng(header["rng"]), generated=header["generated"],
            logprob=header["logprob"], window=arrays["window"].tolist(),
            seen=arrays["seen"].tolist() if "seen" in arrays else None, counts=counts,
            decoder_pending=bytes.fromhex(header["decoder"]), stop_pending=header["stop_pending"])


def model_identity(model_bytes: bytes) -> str:
    return hashlib.sha256(model_bytes).hexdigest()[:32]


def _checked_rng(state: dict) -> dict:
    if state.get("bit_generator") != "PCG64":
        raise SessionTokenError("session: unsupported random generator")
    return state
