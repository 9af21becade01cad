"""The gRPC protocol at its boundary: protobuf <-> rnngen types, and errors -> status codes.

Requests become `GenerationParams` (validated once, here) with `params_from_pb`;
the client sends them with `params_to_pb`; nothing else in rnngen sees protobuf.
"""

from __future__ import annotations

import grpc

from rnngen.decoding.engine import FINISH_INTERRUPTED, FINISH_LENGTH, FINISH_STOP
from rnngen.decoding.params import GenerationParams
from rnngen.errors import InvalidParameterError, ModelNotFoundError, OverloadedError, SessionExpiredError, SessionTokenError, ShuttingDownError, TokenizerError
from rnngen.v1 import rnngen_pb2 as pb

# The one place where rnngen errors become gRPC status codes (most specific first).
STATUS_OF: list[tuple[type, grpc.StatusCode]] = [
    (SessionExpiredError, grpc.StatusCode.FAILED_PRECONDITION),
    (SessionTokenError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidParameterError, grpc.StatusCode.INVALID_ARGUMENT),
    (TokenizerError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShuttingDownError, grpc.StatusCode.UNAVAILABLE),
]


def status_of(exc: Exception) -> grpc.StatusCode:
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


# Parameters as a gRPC client names them: fields of GenerateRequest.params (refusals name them so).
PROTO_FIELD_OF = {name: f"params.{name}" for name in pb.GenerationParameters.DESCRIPTOR.fields_by_name}


def error_details(exc: Exception) -> str:
    """An error's message for a gRPC client, in the protocol's words."""
    return exc.in_terms_of(PROTO_FIELD_OF) if isinstance(exc, InvalidParameterError) else str(exc)


FINISH_TO_PB = {FINISH_LENGTH: pb.FINISH_REASON_LENGTH, FINISH_STOP: pb.FINISH_REASON_STOP,
                FINISH_INTERRUPTED: pb.FINISH_REASON_INTERRUPTED}

# Fields with presence: unset means the default (GenerationParams' own).
_OPTIONAL_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "no_repeat_ngram_size", "seed")


def params_from_pb(message: pb.GenerationParameters) -> GenerationParams:
    """Validated generation parameters from a request; unset fields keep the CLI's defaults."""
    kwargs = {name: getattr(message, name) for name in _OPTIONAL_FIELDS if message.HasField(name)}
    if message.stop:
        kwargs["stop"] = tuple(message.stop)
    if message.on_unknown:
        kwargs["on_unknown"] = message.on_unknown
    if message.processors:
        kwargs["processors"] = tuple(message.processors)
    if message.introspect:
        kwargs["introspect"] = True
        kwargs["units"] = tuple(message.units)
        if message.HasField("top_alternatives"):
            kwargs["top_alternatives"] = message.top_alternatives
    elif message.units:
        kwargs["units"] = tuple(message.units)  # refused by GenerationParams with the reason
    return GenerationParams(**kwargs)


def details_to_pb(details: dict) -> pb.TokenDetail:
    return pb.TokenDetail(token_id=details["token_id"], text=details["text"], logprob=details["logprob"],
                          entropy=details["entropy"], units=details.get("units", {}),
                          top=[pb.Alternative(token_id=a["token_id"], text=a["text"], prob=a["prob"]) for a in details["top"]])


def details_from_pb(message: pb.TokenDetail) -> dict:
    """The client side of details_to_pb: the same dict the local engine reports."""
    return {"token_id": message.token_id, "text": message.text, "logprob": message.logprob, "entropy": message.entropy,
            "top": [{"token_id": a.token_id, "text": a.text, "prob": a.prob} for a in message.top],
            **({"units": dict(message.units)} if message.units else {})}


_DEFAULTS = GenerationParams()


def params_to_pb(params: GenerationParams) -> pb.GenerationParameters:
    """Only the fields that differ from the defaults are set (the server applies the same defaults)."""
    message = pb.GenerationParameters()
    for name in _OPTIONAL_FIELDS[:-1]:  # the seed has no default value to compare with
        value = getattr(params, name)
        if value != getattr(_DEFAULTS, name):
            setattr(message, name, value)
    if params.seed is not None:
        message.seed = params.seed
    message.stop.extend(params.stop)
    if params.on_unknown != _DEFAULTS.on_unknown:
        message.on_unknown = params.on_unknown
    message.processors.extend(params.processors)
    if params.introspect:
        message.introspect = True
        message.top_alternatives = params.top_alternatives
        message.units.extend(params.units)
    return message

