"""Only rnngen's own graph runs: a file's graph must be the one rnngen builds for its config.

A model file's config and weights are data. Its graph is compared, node by node
(op types, attributes, wiring, names and loop bodies), with the graph that
`loop_graph.model_structure` builds for that config; its initializers must be
the weights of `graph_weight_shapes` (float32, those shapes) plus the builder's
own integer constants (those values). What then runs is rnngen's graph with
the file's weights, rebuilt here: nothing else of the file reaches onnxruntime.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from rnngen.model.config import ModelConfig
from rnngen.errors import ModelFormatError
from rnngen.model.loop_graph import graph_weight_shapes


class GraphMismatchError(ModelFormatError):
    """The file's graph differs from rnngen's graph for its config."""


def not_rnngens(path: Path, what: str) -> GraphMismatchError:
    return GraphMismatchError(f"{path}: graph is not rnngen's: {what}")


def _describe_node(node: onnx.NodeProto) -> str:
    domain = f" of domain {node.domain!r}" if node.domain else ""
    return f"{node.op_type}{domain} {list(node.input)} -> {list(node.output)}"


def check_structure(model: onnx.ModelProto, structure: onnx.ModelProto, path: Path) -> None:
    """Refuse (one line) unless `model` has the graph of `structure`, weights aside."""
    if model.ir_version != structure.ir_version:
        raise not_rnngens(path, f"IR version {model.ir_version}, rnngen writes {structure.ir_version}")
    got_opsets = [(o.domain, o.version) for o in model.opset_import]
    want_opsets = [(o.domain, o.version) for o in structure.opset_import]
    if got_opsets != want_opsets:
        raise not_rnngens(path, f"operator sets {got_opsets}, rnngen uses {want_opsets}")
    graph, want = model.graph, structure.graph
    for name in ("value_info", "sparse_initializer", "quantization_annotation"):
        if len(getattr(graph, name)):
            raise not_rnngens(path, f"it has {len(getattr(graph, name))} {name} entries; rnngen's has none")
    if graph.name != want.name:
        raise not_rnngens(path, f"it is named {graph.name[:80]!r}, rnngen's is {want.name!r}")
    if list(graph.input) != list(want.input) or list(graph.output) != list(want.output):
        raise not_rnngens(path, "its inputs or outputs differ from rnngen's in type or shape")
    difference = _node_difference(graph, want)
    if difference:
        raise not_rnngens(path, difference)


def _node_difference(graph: onnx.GraphProto, want: onnx.GraphProto) -> str:
    """The first way graph's nodes differ from want's, looking into loop bodies; '' when they are equal."""
    for i, (got, expected) in enumerate(zip(graph.node, want.node)):
        if got == expected:
            continue
        where = f"node {i} ({expected.name})"
        if (got.op_type, got.domain, got.input, got.output) != (expected.op_type, expected.domain, expected.input, expected.output):
            return f"{where} is {_describe_node(got)}, rnngen's is {_describe_node(expected)}"
        attrs, wanted = {a.name: a for a in got.attribute}, {a.name: a for a in expected.attribute}
        for name in sorted(set(attrs) | set(wanted)):
            if name in attrs and name in wanted and attrs[name].type == wanted[name].type == onnx.AttributeProto.GRAPH:
                inner = _node_difference(attrs[name].g, wanted[name].g)
                if inner:
                    return f"in the {name} of {where}: {inner}"
            if attrs.get(name) != wanted.get(name):
                return f"{where} has a different attribute {name!r}"
        return f"{where} differs in its name or documentation"
    if len(graph.node) != len(want.node):
        return f"{graph.name[:80]!r} has {len(graph.node)} nodes, rnngen's has {len(want.node)}"
    return ""


def check_domains(model: onnx.ModelProto, allowed: tuple[str, ...], path: Path) -> None:
    """The clearest message for a foreign operator: named before the node-by-node comparison."""
    def graphs(graph: onnx.GraphProto):
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from graphs(attr.g)
                for sub in attr.graphs:
                    yield from graphs(sub)

    for graph in graphs(model.graph):
        for node in graph.node:
            if node.domain not in allowed:
                raise not_rnngens(path, f"node {node.name[:80]!r} uses operator domain {node.domain[:80]!r}; "
                                        "rnngen models use standard ONNX operators only")


def canonical_initializers(graph: onnx.GraphProto, structure: onnx.ModelProto, config: ModelConfig,
                           path: Path) -> list[TensorProto]:
    """The file's weights as plain float32 tensors, each checked against the config before it is used.

    The builder's integer constants must be in the file with the builder's values; any other
    initializer is refused. External weight data is read here, from the checked file only.
    """
    tensors: dict[str, TensorProto] = {}
    for tensor in graph.initializer:
        if tensor.name in tensors:
            raise not_rnngens(path, f"initializer {tensor.name[:80]!r} appears twice")
        tensors[tensor.name] = tensor
    shapes = graph_weight_shapes(config)
    constants = {t.name: t for t in structure.graph.initializer}
    extra = sorted(set(tensors) - set(shapes) - set(constants))
    if extra:
        raise not_rnngens(path, f"initializer {extra[0][:80]!r} is not part of rnngen's graph")
    for name, want in constants.items():
        got = tensors.get(name)
        if (got is None or got.data_location == TensorProto.EXTERNAL or got.data_type != want.data_type
                or list(got.dims) != list(want.dims)
                or not np.array_equal(numpy_helper.to_array(got), numpy_helper.to_array(want))):
            raise not_rnngens(path, f"constant {name!r} is missing or differs from rnngen's")
    weights = []
    for name, shape in shapes.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise ModelFormatError(f"{path}: weight {name} is missing")
        if tensor.data_type != TensorProto.FLOAT or tuple(tensor.dims) != shape:
            raise ModelFormatError(f"{path}: weight {name} is {_type_name(tensor.data_type)} {list(tensor.dims)[:8]}, "
                                   f"the config ({config.cell}, {config.num_layers}x{config.hidden_size}, vocabulary "
                                   f"{config.vocab_size}) needs FLOAT {list(shape)}")
        weights.append(_plain_float_tensor(tensor, shape, path))
    return weights


_PLAIN_FIELDS = {"name", "dims", "data_type", "raw_data"}


def _type_name(data_type: int) -> str:
    try:
        return TensorProto.DataType.Name(data_type)
    except ValueError:
        return f"type {data_type}"


def _plain_float_tensor(tensor: TensorProto, shape: tuple[int, ...], path: Path) -> TensorProto:
    """A tensor with only name, dims, type and raw data: whatever else the file's tensor carried is dropped."""
    size = math.prod(shape)
    if {f.name for f, _ in tensor.ListFields()} == _PLAIN_FIELDS and len(tensor.raw_data) == size * 4:
        return tensor  # already plain (as rnngen writes them): no copy
    if tensor.data_location == TensorProto.EXTERNAL:
        data = read_external_data(tensor, size * 4, path)
    elif tensor.raw_data and not tensor.float_data and len(tensor.raw_data) == size * 4:
        data = tensor.raw_data
    elif not tensor.raw_data and len(tensor.float_data) == size:
        data = np.asarray(tensor.float_data, dtype="<f4").tobytes()
    else:
        raise ModelFormatError(f"{path}: weight {tensor.name} does not hold exactly {size} float32 values")
    plain = TensorProto(name=tensor.name, dims=shape, data_type=TensorProto.FLOAT)
    plain.raw_data = data
    return plain


def read_external_data(tensor: TensorProto, nbytes: int, path: Path) -> bytes:
    """A weight's bytes from a plain file inside the model's own folder, reached without symbolic links.

    rnngen reads the data itself, from the very file it checked (onnxruntime never opens a path).
    """
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    name = tensor.name
    if not location or os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
        raise ModelFormatError(f"{path}: tensor {name!r} refers to external data at {location[:200]!r}; "
                               "only relative paths inside the model's folder are allowed")
    folder = path.resolve().parent
    target = folder / location
    if ".." in Path(location).parts or folder not in target.resolve().parents:
        raise ModelFormatError(f"{path}: tensor {name!r} refers to external data {location[:200]!r} outside the model's folder")
    if target.resolve() != target:
        raise ModelFormatError(f"{path}: external data {location[:200]!r} for tensor {name!r} is reached through a "
                               "symbolic link; only plain files inside the model's folder are allowed")
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else nbytes
    except ValueError:
        raise ModelFormatError(f"{path}: external data of tensor {name!r} has an offset or length that is not a number") from None
    if length != nbytes or offset < 0:
        raise ModelFormatError(f"{path}: external data of tensor {name!r} is {length} bytes at offset {offset}; its shape needs {nbytes}")
    try:
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: external data file {location[:200]!r} for tensor {name!r} does not exist") from None
    except OSError as exc:
        raise ModelFormatError(f"{path}: external data file {location[:200]!r} for tensor {name!r} cannot be read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ModelFormatError(f"{path}: external data {location[:200]!r} for tensor {name!r} is not a plain file")
        if info.st_size < offset + nbytes:
            raise ModelFormatError(f"{path}: external data file {location[:200]!r} is shorter than tensor {name!r} needs ({offset + nbytes} bytes)")
        fh.seek(offset)
        return fh.read(nbytes)
