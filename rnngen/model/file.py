"""The rnngen model file: metadata it carries, and checks before anything runs.

Model files come from strangers. Reading one parses protobuf data and JSON only,
nothing is executed or unpickled, and everything is bounded before it is parsed:
1. the file's size, then its top-level protobuf fields, read from the mapped file
   without parsing (`rnngen.model.protoscan`): metadata entries bounded in number and bytes;
2. the metadata, read as typed values (`rnngen.model.metadata`); it gives the config;
3. the graph's size against what the config needs, and how many protobuf fields
   it holds, anywhere, against rnngen's graph for that config; only then is it parsed;
4. interface, weights (type and shape from the config) and the graph itself,
   which must be rnngen's graph for the config (`canonical`).
What runs is rnngen's own graph with the file's weights, never the file's graph.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from rnngen import __version__
from rnngen.model.canonical import canonical_initializers, check_domains, check_structure, not_rnngens
from rnngen.model.config import ModelConfig
from rnngen.errors import ModelFormatError
from rnngen.model.metadata import KEY_CONFIG, KEY_CREATED, KEY_FORMAT, KEY_STATE, KEY_TOKENIZER, KEY_TRAINING, KEY_VERSION, MAX_ENTRIES, MAX_KEY_BYTES, read_config, read_format_version, read_state, read_tokenizer, read_training, value_limit
from rnngen.model.loop_graph import LOGITS, TOKENS, complete_model, graph_weight_shapes, model_structure, state_output_name
from rnngen.model.protoscan import Span, WireError, count_fields, top_level
from rnngen.model.tokenizers import Tokenizer, TokenizerKinds

FORMAT_VERSION = 1
PRODUCER = "rnngen"
ALLOWED_DOMAINS = ("", "ai.onnx")

MAX_FILE_BYTES = 2**31 - 1  # protobuf's own limit for one message
MAX_TOP_LEVEL_FIELDS = 1024
MAX_FIELD_BYTES = 64 * 1024  # each top-level field but the graph and the metadata (names, versions, doc string)
# Bytes a graph may hold beyond its weights (rnngen's 2-layer graphs take about 4 KB).
STRUCTURE_BYTES = 16 * 1024
STRUCTURE_BYTES_PER_LAYER = 8 * 1024
# Protobuf fields (every node, attribute, name, dimension...) beyond rnngen's graph for the config.
FIELDS_PER_WEIGHT = 16  # name, type, dims, data, and external-data entries
# Top-level ModelProto fields an rnngen model may have; functions, training info and the rest are refused.
MODEL_FIELDS = {1: "ir_version", 2: "producer_name", 3: "producer_version", 4: "domain", 5: "model_version",
                6: "doc_string", 7: "graph", 8: "opset_import", 14: "metadata_props"}
_GRAPH, _OPSET, _PRODUCER, _METADATA = 7, 8, 2, 14

def make_metadata(config: ModelConfig, tokenizer: Tokenizer, training: dict) -> dict[str, str]:
    """Metadata for a new model file. `training` holds corpus name/size, validation loss, ..."""
    return {
        KEY_FORMAT: str(FORMAT_VERSION),
        KEY_CONFIG: json.dumps(config.to_dict()),
        KEY_TOKENIZER: json.dumps(tokenizer.to_dict(), ensure_ascii=False),
        KEY_STATE: json.dumps(list(config.state_names)),
        KEY_TRAINING: json.dumps(training),
        KEY_VERSION: __version__,
        KEY_CREATED: datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class ModelFile:
    """A checked rnngen model: rnngen's graph with the file's weights, plus what its metadata says."""

    path: Path
    model_bytes: bytes  # the serialized canonical ModelProto (weights inline), handed to onnxruntime
    config: ModelConfig
    tokenizer: Tokenizer
    training: dict
    metadata: dict[str, str] = field(repr=False)
    has_external_data: bool = False

    @property
    def format_version(self) -> int:
        return int(self.metadata[KEY_FORMAT])


def read_model_file(path: str | os.PathLike, tokenizers: TokenizerKinds | None = None) -> ModelFile:
    """Read and check a model file; its tokenizer kind must be built in or in `tokenizers`."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFormatError(f"model path is not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ModelFormatError(f"{path} is empty, not an ONNX model")
    if size > MAX_FILE_BYTES:
        raise ModelFormatError(f"{path} is {size:,} bytes; a model file may hold at most {MAX_FILE_BYTES:,}")
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with memoryview(mapped) as buf:
            return _read(path, buf, tokenizers)


def _not_onnx(path: Path, exc: Exception) -> ModelFormatError:
    return ModelFormatError(f"{path} is not an ONNX model or is truncated (protobuf parse failed: {exc})")


def _read(path: Path, buf: memoryview, tokenizers: TokenizerKinds | None) -> ModelFile:
    try:
        parts = top_level(buf, 0, len(buf), MAX_TOP_LEVEL_FIELDS)
    except WireError as exc:
        raise _not_onnx(path, exc) from None
    spans: dict[int, list[Span]] = {}
    for part in parts:
        if isinstance(part, Span):
            spans.setdefault(part.number, []).append(part)
    if not spans.get(_GRAPH) or not spans.get(_OPSET):
        raise ModelFormatError(f"{path} is not an ONNX model (no graph or opset)")

    for number, found in spans.items():
        if number not in (_GRAPH, _METADATA) and max(s.end - s.start for s in found) > MAX_FIELD_BYTES:
            raise ModelFormatError(f"{path}: its {MODEL_FIELDS.get(number, f'field {number}')} is larger than "
                                   f"{MAX_FIELD_BYTES:,} bytes")
    meta = _metadata_entries(path, buf, spans.get(_METADATA, []))
    if KEY_FORMAT not in meta:
        producer = ""
        if spans.get(_PRODUCER):
            name = spans[_PRODUCER][-1]
            producer = bytes(buf[name.start : name.end]).decode("utf-8", "replace")
        if producer == PRODUCER:
            raise ModelFormatError(f"{path} has rnngen's producer tag but no metadata: the file is truncated or damaged")
        raise ModelFormatError(
            f"{path} is an ONNX model from another tool (producer {producer or 'unknown'!r}), not an rnngen model; "
            "export one with `rnngen export`"
        )
    try:
        version = read_format_version(_text(buf, meta, KEY_FORMAT))
        if version > FORMAT_VERSION:
            raise ModelFormatError(
                f"model format version {version} is newer than this rnngen ({__version__}) "
                f"reads (up to {FORMAT_VERSION}); upgrade rnngen"
            )
        if version < 1:
            raise ModelFormatError(f"format version {version} is not valid")
        config = read_config(_text(buf, meta, KEY_CONFIG))
        tokenizer = read_tokenizer(_text(buf, meta, KEY_TOKENIZER, config.vocab_size), config, tokenizers)
        read_state(_text(buf, meta, KEY_STATE), config)
        training = read_training(_text(buf, meta, KEY_TRAINING)) if KEY_TRAINING in meta else {}
        metadata = {key: _text(buf, meta, key) for key in meta}
    except ModelFormatError as exc:
        raise ModelFormatError(f"{path}: {exc}") from None

    for number in sorted(set(spans) - set(MODEL_FIELDS)):
        name = onnx.ModelProto.DESCRIPTOR.fields_by_number.get(number)
        raise not_rnngens(path, f"the file has {name.name if name else f'field {number}'}; rnngen models have none")
    if len(spans[_GRAPH]) > 1:
        raise not_rnngens(path, "the file holds more than one graph")

    structure = model_structure(config)
    _check_graph_bounds(path, buf, spans[_GRAPH][0], config, structure)
    try:
        model = onnx.ModelProto.FromString(buf)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise _not_onnx(path, exc) from None

    _check_interface(model.graph, config, path)
    check_domains(model, ALLOWED_DOMAINS, path)
    weights = canonical_initializers(model.graph, structure, config, path)
    check_structure(model, structure, path)
    has_external = any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    producer_version = model.producer_version
    del model  # the file's graph is done with: only its weights go on
    canonical = complete_model(structure, weights, metadata)
    canonical.producer_version = producer_version  # the same file gives the same bytes (and model identity) in any rnngen
    return ModelFile(path, canonical.SerializeToString(), config, tokenizer, training, metadata, has_external)


def _metadata_entries(path: Path, buf: memoryview, entries: list[Span]) -> dict[str, Span]:
    """Metadata keys and where each value lies, bounded in number and size before anything is decoded."""
    if len(entries) > MAX_ENTRIES:
        raise ModelFormatError(f"{path}: metadata has {len(entries)} entries; at most {MAX_ENTRIES} are allowed")
    out: dict[str, Span] = {}
    for entry in entries:
        try:
            fields = {p.number: p for p in top_level(buf, entry.start, entry.end, 4) if isinstance(p, Span)}
        except WireError as exc:
            raise _not_onnx(path, exc) from None
        key_span, value_span = fields.get(1, Span(1, 0, 0)), fields.get(2, Span(2, 0, 0))
        if key_span.end - key_span.start > MAX_KEY_BYTES:
            raise ModelFormatError(f"{path}: a metadata key is longer than {MAX_KEY_BYTES} bytes")
        try:
            key = bytes(buf[key_span.start : key_span.end]).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(f"{path}: a metadata key is not UTF-8 text") from None
        if key in out:
            raise ModelFormatError(f"{path}: metadata entry {key} appears more than once")
        out[key] = value_span
    return out


def _text(buf: memoryview, meta: dict[str, Span], key: str, vocab_size: int = 0) -> str:
    """The value of metadata entry `key`, bounded before it is decoded."""
    if key not in meta:
        raise ModelFormatError(f"metadata entry {key} is missing")
    span, limit = meta[key], value_limit(key, vocab_size)
    if span.end - span.start > limit:
        raise ModelFormatError(f"metadata {key}: {span.end - span.start:,} bytes; at most {limit:,} are allowed")
    try:
        return bytes(buf[span.start : span.end]).decode("utf-8")
    except UnicodeDecodeError:
        raise ModelFormatError(f"metadata {key}: the value is not UTF-8 text") from None


def _check_graph_bounds(path: Path, buf: memoryview, graph: Span, config: ModelConfig, structure: onnx.ModelProto) -> None:
    """The graph may hold its weights plus about rnngen's structure, in bytes and in protobuf fields."""
    shapes = graph_weight_shapes(config)
    weight_bytes = 4 * sum(math.prod(s) for s in shapes.values())
    allowed = weight_bytes + STRUCTURE_BYTES + STRUCTURE_BYTES_PER_LAYER * config.num_layers
    if graph.end - graph.start > allowed:
        raise not_rnngens(path, f"it takes {graph.end - graph.start:,} bytes, more than the {allowed:,} that rnngen's "
                                f"graph for its config ({config.cell}, {config.num_layers}x{config.hidden_size}, vocabulary "
                                f"{config.vocab_size}: {weight_bytes:,} bytes of weights) may take")
    skeleton = structure.graph.SerializeToString()
    budget = 2 * count_fields(skeleton, 0, len(skeleton), onnx.GraphProto.DESCRIPTOR, len(skeleton))
    budget += FIELDS_PER_WEIGHT * len(shapes)
    try:
        count_fields(buf, graph.start, graph.end, onnx.GraphProto.DESCRIPTOR, budget)
    except WireError as exc:
        if "protobuf fields" not in str(exc):
            raise _not_onnx(path, exc) from None
        raise not_rnngens(path, f"it holds {exc} (nodes, names, attributes...); rnngen's graph for this config "
                                f"holds about {budget // 2}") from None
def _dims(value: onnx.ValueInfoProto) -> list:
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in shape.dim]


def _check_interface(graph: onnx.GraphProto, config: ModelConfig, path: Path) -> None:
    """Inputs and outputs must be exactly tokens + state in, logits + state out, with the config's sizes."""
    init_names = {t.name for t in graph.initializer}
    inputs = {v.name: v for v in graph.input if v.name not in init_names}
    outputs = {v.name: v for v in graph.output}
    want_in = [TOKENS, *config.state_names]
    want_out = [LOGITS, *(state_output_name(s) for s in config.state_names)]
    if sorted(inputs) != sorted(want_in) or sorted(outputs) != sorted(want_out):
        raise ModelFormatError(
            f"{path}: graph inputs {sorted(inputs)} / outputs {sorted(outputs)} do not match the state layout "
            f"of a {config.cell} model (inputs {want_in}, outputs {want_out})"
        )

    def expect(value: onnx.ValueInfoProto, elem_type: int, dims: list) -> None:
        got_type = value.type.tensor_type.elem_type
        got = _dims(value)
        ok = got_type == elem_type and len(got) == len(dims)
        ok = ok and all(isinstance(w, str) or g == w for g, w in zip(got, dims))
        if not ok:
            raise ModelFormatError(
                f"{path}: {value.name} is {TensorProto.DataType.Name(got_type)} {got}, expected "
                f"{TensorProto.DataType.Name(elem_type)} {dims}"
            )

    layers, hidden = config.num_layers, config.hidden_size
    expect(inputs[TOKENS], TensorProto.INT64, ["batch", "time"])
    expect(outputs[LOGITS], TensorProto.FLOAT, ["batch", "time", config.vocab_size])
    for s in config.state_names:
        expect(inputs[s], TensorProto.FLOAT, [layers, "batch", hidden])
        expect(outputs[state_output_name(s)], TensorProto.FLOAT, [layers, "batch", hidden])
