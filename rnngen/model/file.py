"""The rnngen model file: metadata it carries, and checks before anything runs.

Model files come from strangers. Reading one parses protobuf data only: the
metadata is JSON, nothing is executed or unpickled, and the graph is checked
against the rnngen contract (see `onnx_graph`) before onnxruntime sees it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from rnngen import __version__
from rnngen.model.config import ModelConfig
from rnngen.errors import ModelFormatError, RnngenError
from rnngen.model.loop_graph import LOGITS, TOKENS, state_output_name
from rnngen.model.tokenizers import Tokenizer, TokenizerKinds, tokenizer_from_dict

FORMAT_VERSION = 1
PRODUCER = "rnngen"
ALLOWED_DOMAINS = ("", "ai.onnx")

KEY_FORMAT = "rnngen.format_version"
KEY_CONFIG = "rnngen.config"
KEY_TOKENIZER = "rnngen.tokenizer"
KEY_STATE = "rnngen.state"
KEY_TRAINING = "rnngen.training"
KEY_VERSION = "rnngen.version"
KEY_CREATED = "rnngen.created"


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
    """A checked rnngen model: its graph bytes plus what its metadata says."""

    path: Path
    model_bytes: bytes  # the serialized ModelProto, handed to onnxruntime as is
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
    data = path.read_bytes()
    if not data:
        raise ModelFormatError(f"{path} is empty, not an ONNX model")
    try:
        model = onnx.ModelProto.FromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelFormatError(f"{path} is not an ONNX model or is truncated (protobuf parse failed: {exc})") from None
    if not model.HasField("graph") or not model.opset_import:
        raise ModelFormatError(f"{path} is not an ONNX model (no graph or opset)")

    meta = {p.key: p.value for p in model.metadata_props}
    if KEY_FORMAT not in meta:
        producer = model.producer_name or "unknown"
        if model.producer_name == PRODUCER:
            raise ModelFormatError(f"{path} has rnngen's producer tag but no metadata: the file is truncated or damaged")
        raise ModelFormatError(
            f"{path} is an ONNX model from another tool (producer {producer!r}), not an rnngen model; "
            "export one with `rnngen export`"
        )
    try:
        version = int(meta[KEY_FORMAT])
    except ValueError:
        raise ModelFormatError(f"{path}: format version {meta[KEY_FORMAT]!r} is not an integer") from None
    if version > FORMAT_VERSION:
        raise ModelFormatError(
            f"{path} uses model format version {version}, newer than this rnngen ({__version__}) "
            f"reads (up to {FORMAT_VERSION}); upgrade rnngen"
        )
    if version < 1:
        raise ModelFormatError(f"{path}: format version {version} is not valid")

    try:
        config = ModelConfig.from_dict(_json_field(meta, KEY_CONFIG, path))
        tokenizer = tokenizer_from_dict(_json_field(meta, KEY_TOKENIZER, path), tokenizers)
    except ModelFormatError:
        raise
    except (RnngenError, TypeError) as exc:
        raise ModelFormatError(f"{path}: metadata does not describe a valid model ({exc})") from None
    training = _json_field(meta, KEY_TRAINING, path) if KEY_TRAINING in meta else {}
    if tokenizer.vocab_size != config.vocab_size:
        raise ModelFormatError(
            f"{path}: tokenizer has {tokenizer.vocab_size} symbols but the model config says {config.vocab_size}"
        )
    state = _json_field(meta, KEY_STATE, path)
    if state != list(config.state_names):
        raise ModelFormatError(f"{path}: state layout {state} does not match a {config.cell} model {list(config.state_names)}")

    _check_interface(model.graph, config, path)
    _check_domains(model.graph, path)
    has_external = _check_external_data(model.graph, path)
    return ModelFile(path, data, config, tokenizer, training, meta, has_external)


def _json_field(meta: dict[str, str], key: str, path: Path):
    if key not in meta:
        raise ModelFormatError(f"{path}: metadata entry {key} is missing")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path}: metadata entry {key} is not valid JSON ({exc.msg})") from None


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


def _subgraphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _subgraphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _subgraphs(sub)


def _check_domains(graph: onnx.GraphProto, path: Path) -> None:
    for sub in _subgraphs(graph):
        for node in sub.node:
            if node.domain not in ALLOWED_DOMAINS:
                raise ModelFormatError(f"{path}: node {node.name!r} uses operator domain {node.domain!r}; rnngen models use standard ONNX operators only")


def _check_external_data(graph: onnx.GraphProto, path: Path) -> bool:
    """External weights may only live in plain files inside the model's own folder."""
    folder = path.resolve().parent
    found = False
    for sub in _subgraphs(graph):
        tensors = list(sub.initializer) + [s.values for s in sub.sparse_initializer]
        for node in sub.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    tensors.append(attr.t)
                elif attr.type == onnx.AttributeProto.TENSORS:
                    tensors.extend(attr.tensors)
        for tensor in tensors:
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            found = True
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            if not location or os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
                raise ModelFormatError(f"{path}: tensor {tensor.name!r} refers to external data at {location!r}; only relative paths inside the model's folder are allowed")
            target = (folder / location).resolve()
            if folder not in target.parents:
                raise ModelFormatError(f"{path}: tensor {tensor.name!r} refers to external data {location!r} outside the model's folder")
            if not target.is_file():
                raise ModelFormatError(f"{path}: external data file {location!r} for tensor {tensor.name!r} does not exist")
    return found
