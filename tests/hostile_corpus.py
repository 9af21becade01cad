"""Hostile model files, each made from a small valid rnngen model: one per attack class.

Used by tests/test_hostile_models.py (each must be refused with one line) and by
benchmarks/hostile_models.py (time and memory of each refusal).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HUGE = 2**62


@dataclass
class Case:
    name: str
    path: Path
    needle: str  # what the one-line refusal must say


def _load(valid: Path) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(valid.read_bytes())


def _write(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _set_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    entry = next(p for p in model.metadata_props if p.key == key)
    entry.value = value


def _node(graph: onnx.GraphProto, name: str) -> onnx.NodeProto:
    return next(n for n in graph.node if n.name == name)


def _body(model: onnx.ModelProto, layer: int = 0) -> onnx.GraphProto:
    return next(a.g for a in _node(model.graph, f"l{layer}_loop").attribute if a.name == "body")


def _int_constant(name: str, value: int) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(np.array(value, np.int64)))


def loop_trip_count_top(valid: Path, out: Path) -> Path:
    """Layer 0's Loop runs 2**62 times, whatever the input length."""
    model = _load(valid)
    model.graph.node.insert(0, _int_constant("huge_trips", HUGE))
    _node(model.graph, "l0_loop").input[0] = "huge_trips"
    return _write(model, out)


def loop_trip_count_body(valid: Path, out: Path) -> Path:
    """An inner Loop of 2**62 iterations inside layer 0's body (it would survive into the step graph)."""
    model = _load(valid)
    body = _body(model)
    inner = helper.make_graph(
        [helper.make_node("Identity", ["spin_cond_in"], ["spin_cond_out"], name="spin_cond"),
         helper.make_node("Identity", ["spin_x_in"], ["spin_x_out"], name="spin_x")],
        "spin",
        [helper.make_tensor_value_info("spin_i", TensorProto.INT64, []),
         helper.make_tensor_value_info("spin_cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("spin_x_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("spin_cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("spin_x_out", TensorProto.FLOAT, None)],
    )
    rec = _node(body, "l0_rec")
    rec.output[0] = "l0_rec_before_spin"
    body.node.insert(0, _int_constant("l0_spin_trips", HUGE))
    body.node.append(helper.make_node("Loop", ["l0_spin_trips", "", "l0_rec_before_spin"], ["l0_rec"], name="l0_spin", body=inner))
    return _write(model, out)


def _bomb_into_logits(model: onnx.ModelProto, shape_node: onnx.NodeProto | list[onnx.NodeProto], shape: str) -> None:
    """logits = decoder output + sum(ConstantOfShape(shape)): the graph allocates whatever `shape` says."""
    _node(model.graph, "logits").output[0] = "logits_before_bomb"
    extra = shape_node if isinstance(shape_node, list) else [shape_node]
    model.graph.node.extend(extra + [
        helper.make_node("ConstantOfShape", [shape], ["bomb"], name="bomb",
                         value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("ReduceSum", ["bomb"], ["bomb_sum"], name="bomb_sum", keepdims=0),
        helper.make_node("Add", ["logits_before_bomb", "bomb_sum"], ["logits"], name="logits"),
    ])


def constant_of_shape_bomb(valid: Path, out: Path) -> Path:
    """A terabyte of float32 zeros (2**38 of them) from ConstantOfShape."""
    model = _load(valid)
    shape = helper.make_node("Constant", [], ["bomb_shape"], name="bomb_shape",
                             value=numpy_helper.from_array(np.array([2**38], np.int64)))
    _bomb_into_logits(model, shape, "bomb_shape")
    return _write(model, out)


def input_length_bomb(valid: Path, out: Path) -> Path:
    """ConstantOfShape of (batch, time) * 2**30: the allocation grows with the input."""
    model = _load(valid)
    nodes = [
        helper.make_node("Shape", ["tokens"], ["bomb_in_shape"], name="bomb_in_shape"),
        helper.make_node("Constant", [], ["bomb_factor"], name="bomb_factor",
                         value=numpy_helper.from_array(np.array([1, 2**30], np.int64))),
        helper.make_node("Mul", ["bomb_in_shape", "bomb_factor"], ["bomb_shape"], name="bomb_shape"),
    ]
    _bomb_into_logits(model, nodes, "bomb_shape")
    return _write(model, out)


def _with_graph_bytes(model: onnx.ModelProto, graph_bytes: bytes) -> bytes:
    """The model's bytes with its graph field replaced by `graph_bytes` (field 7, length-delimited)."""
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    rest.ClearField("graph")
    length, header = len(graph_bytes), bytearray([7 << 3 | 2])
    while True:
        byte, length = length & 0x7F, length >> 7
        header.append(byte | (0x80 if length else 0))
        if not length:
            break
    return rest.SerializeToString() + bytes(header) + graph_bytes


def padded_top(valid: Path, out: Path, count: int = 1_000_000) -> Path:
    """A million empty nodes after rnngen's (2 bytes each: 2 MB more on disk, about a GB once parsed)."""
    model = _load(valid)
    out.write_bytes(_with_graph_bytes(model, model.graph.SerializeToString() + b"\x0a\x00" * count))
    return out


def padded_body(valid: Path, out: Path, count: int = 6_000) -> Path:
    """Empty nodes inside layer 0's Loop body, few enough to stay within the graph's size allowance."""
    model = _load(valid)
    body = _body(model)
    for _ in range(count):
        body.node.add()
    return _write(model, out)


def _meta_case(key: str, value: str) -> Callable[[Path, Path], Path]:
    def make(valid: Path, out: Path) -> Path:
        model = _load(valid)
        _set_meta(model, key, value)
        return _write(model, out)
    return make


def _tokenizer_with(valid: Path, change: Callable[[dict], None], escape: bool = False) -> Callable[[Path, Path], Path]:
    model = _load(valid)
    data = json.loads(next(p.value for p in model.metadata_props if p.key == "rnngen.tokenizer"))
    change(data)
    return _meta_case("rnngen.tokenizer", json.dumps(data, ensure_ascii=escape))


def _lone_surrogate(data: dict) -> None:
    data["symbols"][-1] = "\ud800"


def function_with_custom_op(valid: Path, out: Path) -> Path:
    """A model-local function wrapping a custom-domain op, called in place of a standard node."""
    model = _load(valid)
    fn = helper.make_function("com.example.fn", "Wrapped", ["x"], ["y"],
                              [helper.make_node("Evil", ["x"], ["y"], domain="com.example.evil")],
                              [helper.make_opsetid("", 17), helper.make_opsetid("com.example.evil", 1)])
    model.functions.append(fn)
    model.opset_import.append(helper.make_opsetid("com.example.fn", 1))
    node = _node(model.graph, "top_bth")
    node.op_type, node.domain = "Wrapped", "com.example.fn"
    node.ClearField("attribute")
    return _write(model, out)


def oversize_tensor(valid: Path, out: Path, extra: int = 5) -> Path:
    """decoder_b with more entries than the config's vocabulary."""
    model = _load(valid)
    tensor = next(t for t in model.graph.initializer if t.name == "decoder_b")
    values = np.concatenate([numpy_helper.to_array(tensor), np.zeros(extra, np.float32)])
    tensor.CopyFrom(numpy_helper.from_array(values, "decoder_b"))
    return _write(model, out)


def claimed_huge_tensor(valid: Path, out: Path) -> Path:
    """A weight whose dims claim 10**12 values (its data is the original few)."""
    model = _load(valid)
    tensor = next(t for t in model.graph.initializer if t.name == "l0_w_hh_t")
    tensor.dims[0] = 10**12
    return _write(model, out)


def _external(model: onnx.ModelProto, location: str) -> onnx.ModelProto:
    tensor = next(t for t in model.graph.initializer if t.name == "decoder_b")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return model


def external_bias(valid: Path, folder: Path, location: str, values: np.ndarray) -> Path:
    """A copy of `valid` in `folder` whose decoder bias lives in `location` (a file written only if absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / location
    if not target.exists() and not target.is_symlink():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(values.astype(np.float32).tobytes())
    return _write(_external(_load(valid), location), folder / "model.onnx")


def symlinked_data(valid: Path, root: Path, vocab: int) -> Path:
    """External data that is a symbolic link to a file outside the model's folder."""
    (root / "outside.bin").write_bytes(np.ones(vocab, np.float32).tobytes())
    folder = root / "linked_data"
    folder.mkdir()
    os.symlink(root / "outside.bin", folder / "w.bin")
    return external_bias(valid, folder, "w.bin", np.zeros(vocab))


def symlinked_subfolder(valid: Path, root: Path, vocab: int) -> Path:
    """External data in a subfolder that is a symbolic link to another folder."""
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "w.bin").write_bytes(np.ones(vocab, np.float32).tobytes())
    folder = root / "linked_folder"
    folder.mkdir()
    os.symlink(elsewhere, folder / "sub")
    return external_bias(valid, folder, "sub/w.bin", np.zeros(vocab))


def symlink_inside(valid: Path, root: Path, vocab: int) -> Path:
    """External data through a symbolic link that stays inside the folder (still refused: plain files only)."""
    folder = root / "link_inside"
    folder.mkdir()
    (folder / "real.bin").write_bytes(np.ones(vocab, np.float32).tobytes())
    os.symlink("real.bin", folder / "w.bin")
    return external_bias(valid, folder, "w.bin", np.zeros(vocab))


def build_corpus(valid: Path, root: Path) -> list[Case]:
    """Every hostile case, written under `root`, from the valid char model `valid`."""
    root.mkdir(parents=True, exist_ok=True)
    vocab = json.loads(next(p.value for p in _load(valid).metadata_props if p.key == "rnngen.config"))["vocab_size"]
    not_rnngens = "graph is not rnngen's"
    makers: list[tuple[str, Callable[[Path, Path], Path], str]] = [
        ("loop trip count 2**62 (top level)", loop_trip_count_top, not_rnngens),
        ("loop trip count 2**62 (inside a layer's body)", loop_trip_count_body, not_rnngens),
        ("ConstantOfShape of 2**38 floats", constant_of_shape_bomb, not_rnngens),
        ("ConstantOfShape sized by the input length", input_length_bomb, not_rnngens),
        ("1,000,000 empty nodes (2 MB)", padded_top, not_rnngens),
        ("6,000 empty nodes inside a Loop body", padded_body, "protobuf fields"),
        ("metadata JSON nested 20,000 deep", _meta_case("rnngen.training", "[" * 20_000 + "]" * 20_000), "at most 8 are allowed"),
        ("metadata entry of 1 MB", _meta_case("rnngen.config", " " * 1_000_000 + "{}"), "at most 65,536 are allowed"),
        ("config is a JSON list", _meta_case("rnngen.config", "[1, 2]"), "rnngen.config: the value is a list, expected a JSON object"),
        ("config hidden_size is a string", _meta_case("rnngen.config", json.dumps(
            {"cell": "lstm", "vocab_size": vocab, "hidden_size": "16", "num_layers": 2})), "hidden_size is a string, expected an integer"),
        ("training val_loss is a string", _meta_case("rnngen.training", '{"val_loss": "low"}'), "val_loss is a string, expected a number or null"),
        ("training is a JSON list", _meta_case("rnngen.training", "[]"), "rnngen.training: the value is a list, expected a JSON object"),
        ("tokenizer is a JSON string", _meta_case("rnngen.tokenizer", '"char"'), "rnngen.tokenizer: the value is a string, expected a JSON object"),
        ("state is a number", _meta_case("rnngen.state", "7"), "state layout 7 does not match"),
        ("val_loss is NaN", _meta_case("rnngen.training", '{"val_loss": NaN}'), "NaN is not a number JSON allows"),
        ("vocabulary with a lone surrogate", _tokenizer_with(valid, _lone_surrogate, escape=True), "lone surrogate"),
        ("word vocabulary symbol with a space", _meta_case("rnngen.tokenizer", json.dumps(
            {"kind": "word", "symbols": ["<unk>", "<eos>", "two words"] + [f"w{i}" for i in range(vocab - 3)]})), "holds whitespace"),
        ("custom-domain op in a model-local function", function_with_custom_op, "the file has functions"),
        ("decoder bias larger than the vocabulary", oversize_tensor, f"weight decoder_b is FLOAT [{vocab + 5}]"),
        ("weight dims claiming 10**12 values", claimed_huge_tensor, "weight l0_w_hh_t is FLOAT [1000000000000,"),
        ("weight of 16 MB against a tiny config", lambda v, o: oversize_tensor(v, o, extra=4_000_000), not_rnngens),
    ]
    cases = [Case(name, make(valid, root / f"case{i}.onnx"), needle) for i, (name, make, needle) in enumerate(makers)]
    cases += [
        Case("external data: symbolic link to a file outside", symlinked_data(valid, root, vocab), "outside the model's folder"),
        Case("external data: symbolic-linked subfolder", symlinked_subfolder(valid, root, vocab), "outside the model's folder"),
        Case("external data: symbolic link inside the folder", symlink_inside(valid, root, vocab), "symbolic link"),
    ]
    return cases
