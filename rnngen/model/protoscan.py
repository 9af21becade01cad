"""A cheap walk over protobuf wire data, to bound a model file before it is parsed.

Parsing protobuf allocates an object per message and per string: a file padded
with a million empty nodes (2 bytes each) parses into about a gigabyte. The walk
here reads only tags and lengths, skips payloads without copying them, descends
into sub-messages by the message's descriptor and stops as soon as it has seen
more fields than allowed, so its cost is bounded by the budget, not the file.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
MAX_DEPTH = 32  # messages inside messages; an rnngen model needs 12


class WireError(ValueError):
    """The bytes are not protobuf wire data, or exceed the scan's bounds (the message says which)."""


@dataclass
class Span:
    """Where a length-delimited field's payload lies in the buffer."""

    number: int
    start: int
    end: int


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def fields(buf, start: int, end: int):
    """(field number, wire type, payload start, payload end or varint value) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise WireError("field number 0")
        if wire == VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, pos, value
        elif wire == LENGTH_DELIMITED:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise WireError("a field's length runs past the end of its message")
            yield number, wire, pos, pos + length
            pos += length
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            if size > end - pos:
                raise WireError("truncated fixed-size field")
            yield number, wire, pos, pos + size
            pos += size
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise WireError(f"wire type {wire} is not used by ONNX")


def count_fields(buf, start: int, end: int, descriptor: Descriptor, budget: int) -> int:
    """How many fields the message in buf[start:end] holds, its sub-messages' fields included.

    Raises WireError when the data is malformed, nests deeper than MAX_DEPTH, or holds more
    than `budget` fields in all (stopping there: the walk never costs more than the budget).
    """
    seen = 0

    def walk(start: int, end: int, descriptor: Descriptor, depth: int) -> None:
        nonlocal seen
        if depth > MAX_DEPTH:
            raise WireError(f"messages nest deeper than {MAX_DEPTH} levels")
        by_number = descriptor.fields_by_number
        for number, wire, payload_start, payload_end in fields(buf, start, end):
            seen += 1
            if seen > budget:
                raise WireError(f"more than {budget} protobuf fields")
            fd = by_number.get(number)
            if fd is not None and fd.type == FieldDescriptor.TYPE_MESSAGE and wire == LENGTH_DELIMITED:
                walk(payload_start, payload_end, fd.message_type, depth + 1)

    walk(start, end, descriptor, 0)
    return seen


def top_level(buf, start: int, end: int, max_fields: int) -> list[Span | tuple[int, int]]:
    """The top-level fields of a message, without descending: Span for payloads, (number, value) for varints."""
    out: list[Span | tuple[int, int]] = []
    for number, wire, payload_start, payload_end in fields(buf, start, end):
        if len(out) >= max_fields:
            raise WireError(f"more than {max_fields} top-level fields")
        out.append(Span(number, payload_start, payload_end) if wire == LENGTH_DELIMITED else (number, payload_end))
    return out
