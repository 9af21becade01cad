"""Fused-op graphs: the model rebuilt from the standard ONNX LSTM/GRU/RNN operators.

Derived at load time from the Loop graph's own weights, never stored. The
interface is the Loop graph's (tokens, state in; logits, state out; batch and
time dynamic), so either can serve a call. The point is speed where a runtime
has a fused kernel for the cell: onnxruntime's CUDA provider runs these ops
with cuDNN (one call per layer for a whole prompt), while it drives a Loop from
the host one iteration at a time.

Mapping of the Loop graph's weights (PyTorch gate order, transposed) onto the
ONNX operators' W/R/B (rows per gate, in the ONNX gate order):
  LSTM  PyTorch i f g o  ->  ONNX i o f c ; the Loop folds b_ih + b_hh into b_in: Wb = b_in, Rb = 0
  GRU   PyTorch r z n    ->  ONNX z r h   ; linear_before_reset = 1 (b_hn inside r * (...)): Wb = b_in, Rb = b_hh
  RNN   one tanh block                   ; Wb = b_in, Rb = 0
Where layer 0 holds a per-symbol input table (embedding @ W_ih^T + b, see
loop_graph), the operator's input is the one-hot token (W = the table, V
columns), or for vocabularies wider than the gates the table row itself
(W = identity); either gives the table's row exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rnngen.model.config import GATES, ModelConfig
from rnngen.model.loop_graph import (B_HH, B_IN, DECODER_B, DECODER_W_T, EMBEDDING, INPUT_TABLE, LOGITS, TOKENS,
                                     W_HH_T, W_IH_T, layer_weight, state_output_name)

ONNX_OPS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
ONNX_GATE_ORDER = {"lstm": ("i", "o", "f", "g"), "gru": ("z", "r", "n"), "rnn": ()}


class NotDerivable(ValueError):
    """The file's graph lacks the weights of the canonical Loop graph (hand-made or foreign)."""


def _gate_rows(config: ModelConfig, matrix: np.ndarray) -> np.ndarray:
    """Blocks of rows (one per gate, PyTorch order) reordered to the ONNX operator's gate order."""
    hidden = config.hidden_size
    if config.cell == "rnn":
        return matrix
    order = [GATES[config.cell].index(g) for g in ONNX_GATE_ORDER[config.cell]]
    return np.concatenate([matrix[j * hidden:(j + 1) * hidden] for j in order])


def loop_graph_weights(model: onnx.ModelProto, config: ModelConfig) -> dict[str, np.ndarray]:
    """The Loop graph's initializers by name, checked against the shapes the config implies."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    gh, hidden, vocab = config.gates * config.hidden_size, config.hidden_size, config.vocab_size
    want = {DECODER_W_T: (hidden, vocab), DECODER_B: (vocab,)}
    if layer_weight(0, INPUT_TABLE) in weights:
        want[layer_weight(0, INPUT_TABLE)] = (vocab, gh)
    else:
        want[EMBEDDING] = (vocab, config.input_size)
        want[layer_weight(0, W_IH_T)] = (config.input_size, gh)
        want[layer_weight(0, B_IN)] = (gh,)
    for k in range(config.num_layers):
        want[layer_weight(k, W_HH_T)] = (hidden, gh)
        if k:
            want[layer_weight(k, W_IH_T)] = (hidden, gh)
            want[layer_weight(k, B_IN)] = (gh,)
        if config.cell == "gru":
            want[layer_weight(k, B_HH)] = (gh,)
    for name, shape in want.items():
        if name not in weights or weights[name].shape != shape or weights[name].dtype != np.float32:
            raise NotDerivable(f"the graph has no float32 weight {name} of shape {shape}")
    return weights


def derive_fused_model(model: onnx.ModelProto, config: ModelConfig) -> onnx.ModelProto:
    """The model with one standard ONNX LSTM/GRU/RNN node per layer in place of each Loop."""
    w = loop_graph_weights(model, config)
    hidden, gh, vocab = config.hidden_size, config.gates * config.hidden_size, config.vocab_size
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> list[str]:
        nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0], **attrs))
        return outputs

    axis0, axis1 = const("axis0", np.array([0], np.int64)), const("axis1", np.array([1], np.int64))
    tokens_tb = node("Transpose", [TOKENS], ["tokens_tb"], perm=[1, 0])[0]  # (T, B)
    no_bias = np.zeros(gh, np.float32)
    finals: dict[str, list[str]] = {s: [] for s in config.state_names}
    x = ""
    for k in range(config.num_layers):
        p = f"l{k}_"
        if k == 0 and layer_weight(0, INPUT_TABLE) in w:
            table = w[layer_weight(0, INPUT_TABLE)]  # (V, G*H), bias included
            if vocab <= gh:  # one-hot @ table^T: V columns per token
                depth, values = const("onehot_depth", np.array(vocab, np.int64)), const("onehot_values", np.array([0, 1], np.float32))
                x = node("OneHot", [tokens_tb, depth, values], ["onehot"], axis=-1)[0]  # (T, B, V)
                w_in = _gate_rows(config, table.T)
            else:  # the table row itself through an identity
                x = node("Gather", [const("gate_table", _gate_rows(config, table.T).T), tokens_tb], ["table_rows"])[0]
                w_in = np.eye(gh, dtype=np.float32)
            b_in = no_bias
        else:
            if k == 0:
                x = node("Gather", [const("embedding", w[EMBEDDING]), tokens_tb], ["embedded"])[0]  # (T, B, I)
            w_in, b_in = _gate_rows(config, w[layer_weight(k, W_IH_T)].T), _gate_rows(config, w[layer_weight(k, B_IN)])
        b_rec = _gate_rows(config, w[layer_weight(k, B_HH)]) if config.cell == "gru" else no_bias
        weight = const(p + "W", w_in[None])  # (1, G*H, input)
        recurrence = const(p + "R", _gate_rows(config, w[layer_weight(k, W_HH_T)].T)[None])  # (1, G*H, H)
        bias = const(p + "B", np.concatenate([b_in, b_rec])[None])  # (1, 2*G*H)
        lo, hi = const(p + "lo", np.array([k], np.int64)), const(p + "hi", np.array([k + 1], np.int64))
        initial = [node("Slice", [s, lo, hi, axis0], [f"{p}{s}0"])[0] for s in config.state_names]  # (1, B, H)
        outs = [p + "y"] + [f"{p}{s}_last" for s in config.state_names]  # Y (T, 1, B, H), Y_h [, Y_c] (1, B, H)
        attrs = {"hidden_size": hidden}
        if config.cell == "gru":
            attrs["linear_before_reset"] = 1  # PyTorch's GRU: r multiplies (W_hn h + b_hn)
        inputs = [x, weight, recurrence, bias, "", initial[0]] + initial[1:]
        node(ONNX_OPS[config.cell], inputs, outs, **attrs)
        for s, out in zip(config.state_names, outs[1:]):
            finals[s].append(out)
        x = node("Squeeze", [outs[0], axis1], [p + "ys"])[0]  # (T, B, H)

    top = node("Transpose", [x], ["top_bth"], perm=[1, 0, 2])[0]  # (B, T, H)
    dec = node("MatMul", [top, const(DECODER_W_T, w[DECODER_W_T])], ["decoder_mm"])[0]
    node("Add", [dec, const(DECODER_B, w[DECODER_B])], [LOGITS])  # (B, T, V)
    for s in config.state_names:
        node("Concat", finals[s], [state_output_name(s)], axis=0)  # (L, B, H)

    stored = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in stored]
    graph = helper.make_graph(nodes, f"rnngen_{config.cell}_fused", inputs, list(model.graph.output), inits)
    fused = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name=model.producer_name)
    fused.ir_version = model.ir_version
    return fused


FUSED_TOKENS_VS_LOOP_CHECK = 5  # tokens of the load-time check that the derived graph computes the Loop graph


def agrees_with(fused_session, loop_session, config: ModelConfig, tolerance: float = 1e-4) -> bool:
    """A short random run through both sessions gives the same logits and state.

    Derivation reads weights by name; a file whose Loop graph computes something
    else under those names (hand-edited, foreign) must not get a fused graph.
    """
    rng = np.random.default_rng(0)
    shape = (config.num_layers, 2, config.hidden_size)
    feeds = {TOKENS: rng.integers(0, config.vocab_size, (2, FUSED_TOKENS_VS_LOOP_CHECK)).astype(np.int64)}
    feeds.update({s: rng.standard_normal(shape).astype(np.float32) * 0.5 for s in config.state_names})
    outputs = [LOGITS, *(state_output_name(s) for s in config.state_names)]
    got = fused_session.run(outputs, feeds)
    want = loop_session.run(outputs, feeds)
    return all(np.allclose(a, b, rtol=tolerance, atol=tolerance) for a, b in zip(got, want))
