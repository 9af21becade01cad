"""Builds the rnngen ONNX graph from numpy weights (no torch needed).

Interface of every rnngen model file:
  inputs   tokens  int64   (batch, time)
           h       float32 (num_layers, batch, hidden)      [and c for LSTM]
  outputs  logits  float32 (batch, time, vocab)
           h_out   float32 (num_layers, batch, hidden)      [and c_out for LSTM]
Batch and time are dynamic; time = 1 is a decoding step.

The recurrence over time is an ONNX `Loop`, one per layer. Only the recurrent
product W_hh h_{t-1} stays inside the loop: each layer's input projection
W_xh x_t + b is computed for all time steps at once, before its loop, as one
matrix product (this is what makes a fused LSTM op fast, and a Loop can do the
same). For layer 0 the projection of every vocabulary symbol is precomputed
(embedding @ W_xh^T + b), so the input side of a step is a table lookup, when
that table is no larger than the matrices it replaces.

Weights use PyTorch's names and gate order (`rnn.weight_ih_l0`, ...), so a
model trained with the fused nn.LSTM/nn.GRU/nn.RNN maps onto this graph as is.
The graph's structure depends on the config alone (`model_structure`); its
weights (`graph_weights`, shapes in `graph_weight_shapes`) are added to it. A
loaded file is held to that structure (see `canonical`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rnngen.model.config import ModelConfig

OPSET = 17
IR_VERSION = 8  # IR version that goes with opset 17; readable by onnxruntime >= 1.13
TOKENS = "tokens"
LOGITS = "logits"
# Names of the weights inside the graph (derived graphs read them back: rnngen.model.fused_graph).
EMBEDDING = "embedding"  # (V, I): only where layer 0 has no input table
DECODER_W_T = "decoder_w_t"  # (H, V)
DECODER_B = "decoder_b"  # (V,)
INPUT_TABLE, W_IH_T, B_IN, W_HH_T, B_HH = "input_table", "w_ih_t", "b_in", "w_hh_t", "b_hh"


def layer_weight(k: int, part: str) -> str:
    """Layer k's weight `part`: input_table (V, G*H), w_ih_t (I, G*H), b_in, w_hh_t (H, G*H), b_hh (GRU)."""
    return f"l{k}_{part}"


def state_output_name(state_name: str) -> str:
    return f"{state_name}_out"


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight the graph needs, with its shape (PyTorch naming)."""
    gh, hidden = config.gates * config.hidden_size, config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (config.vocab_size, config.input_size)}
    for k in range(config.num_layers):
        fan_in = config.input_size if k == 0 else hidden
        shapes[f"rnn.weight_ih_l{k}"] = (gh, fan_in)
        shapes[f"rnn.weight_hh_l{k}"] = (gh, hidden)
        shapes[f"rnn.bias_ih_l{k}"] = (gh,)
        shapes[f"rnn.bias_hh_l{k}"] = (gh,)
    if not config.tied:
        shapes["decoder.weight"] = (config.vocab_size, hidden)
    shapes["decoder.bias"] = (config.vocab_size,)
    return shapes


def check_weights(config: ModelConfig, weights: dict[str, np.ndarray]) -> None:
    for name, shape in expected_weight_shapes(config).items():
        if name not in weights:
            raise ValueError(f"weight {name} is missing")
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"weight {name} has shape {tuple(weights[name].shape)}, expected {shape}")


def fold_embedding(config: ModelConfig) -> bool:
    """Precompute layer 0's input projection per symbol when that does not grow the file."""
    gh = config.gates * config.hidden_size
    return config.vocab_size * gh <= config.vocab_size * config.input_size + gh * config.input_size


def graph_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The float32 initializers of the graph (what `graph_weights` computes), by name, with their shapes.

    Everything else in an rnngen model follows from the config: a loaded file's weights are
    checked against these shapes before anything is built from them.
    """
    gh, hidden, vocab = config.gates * config.hidden_size, config.hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(config.num_layers):
        p = f"l{k}_"
        if k == 0 and fold_embedding(config):
            shapes[p + "input_table"] = (vocab, gh)
        else:
            if k == 0:
                shapes["embedding"] = (vocab, config.input_size)
            shapes[p + "w_ih_t"] = (config.input_size if k == 0 else hidden, gh)
            shapes[p + "b_in"] = (gh,)
        shapes[p + "w_hh_t"] = (hidden, gh)
        if config.cell == "gru":
            shapes[p + "b_hh"] = (gh,)
    shapes["decoder_w_t"] = (hidden, vocab)
    shapes["decoder_b"] = (vocab,)
    return shapes


def graph_weights(config: ModelConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph's float32 initializers from PyTorch-named weights: transposed, biases folded."""
    check_weights(config, weights)
    w = {name: np.asarray(value, dtype=np.float32) for name, value in weights.items()}
    out: dict[str, np.ndarray] = {}
    for k in range(config.num_layers):
        p = f"l{k}_"
        w_ih, w_hh = w[f"rnn.weight_ih_l{k}"], w[f"rnn.weight_hh_l{k}"]
        b_ih, b_hh = w[f"rnn.bias_ih_l{k}"], w[f"rnn.bias_hh_l{k}"]
        # GRU keeps b_hh inside the loop (b_hn is multiplied by r); the others fold it into the input side.
        b_in = b_ih if config.cell == "gru" else b_ih + b_hh
        if k == 0 and fold_embedding(config):
            out[layer_weight(k, INPUT_TABLE)] = w["embedding.weight"] @ w_ih.T + b_in  # (V, G*H)
        else:
            if k == 0:
                out[EMBEDDING] = w["embedding.weight"]
            out[layer_weight(k, W_IH_T)] = w_ih.T
            out[layer_weight(k, B_IN)] = b_in
        out[layer_weight(k, W_HH_T)] = w_hh.T  # (H, G*H)
        if config.cell == "gru":
            out[layer_weight(k, B_HH)] = b_hh
    out[DECODER_W_T] = (w["embedding.weight"] if config.tied else w["decoder.weight"]).T  # (H, V)
    out[DECODER_B] = w["decoder.bias"]
    return {name: np.array(value, dtype=np.float32, order="C") for name, value in out.items()}


class GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))  # 0-d stays 0-d
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def _recurrent_body(config: ModelConfig, k: int, xp: str, whh_t: str, bhh: str, split: str) -> onnx.GraphProto:
    """One time step of layer k; reads its input projection xp (T, B, G*H) from the outer scope."""
    p = f"l{k}_"
    g = GraphBuilder()
    hidden = config.hidden_size
    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info(p + "iter", TensorProto.INT64, []),
        helper.make_tensor_value_info(p + "cond_in", TensorProto.BOOL, []),
        helper.make_tensor_value_info(p + "h_prev", f32, ["batch", hidden]),
    ]
    if config.cell == "lstm":
        inputs.append(helper.make_tensor_value_info(p + "c_prev", f32, ["batch", hidden]))
    # The iteration number may arrive as shape [] or [1]; as a scalar index, Gather drops the time axis.
    t = g.node("Reshape", [p + "iter", "scalar_shape"], p + "t")
    x_t = g.node("Gather", [xp, t], p + "x_t", axis=0)  # (B, G*H): W_xh x_t + b
    carried = cell_step(g, config, k, x_t, [p + "h_prev", p + "c_prev"], whh_t, bhh, split)
    cond_out = g.node("Identity", [p + "cond_in"], p + "cond_out")
    y_t = g.node("Identity", [carried[0]], p + "y_t")  # scan output: stacked to (T, B, H)
    outputs = [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, [])]
    outputs += [helper.make_tensor_value_info(name, f32, ["batch", hidden]) for name in carried]
    outputs.append(helper.make_tensor_value_info(y_t, f32, ["batch", hidden]))
    return helper.make_graph(g.nodes, f"layer{k}_step", inputs, outputs)


def cell_step(g: "GraphBuilder", config: ModelConfig, k: int, x_t: str, prev: list[str], whh_t: str, bhh: str,
              split: str) -> list[str]:
    """Layer k's cell for one time step, as nodes added to `g`: from its input projection x_t
    (B, G*H) and its previous state `prev` (h, and c for the LSTM; (B, H) each), the new state
    [h_t] or [h_t, c_t]. The Loop graph's body and the decoding step graph (rnngen.model.step_graph)
    are both made of it."""
    p = f"l{k}_"
    h_prev = prev[0]
    rec = g.node("MatMul", [h_prev, whh_t], p + "rec")  # (B, G*H): W_hh h_{t-1}

    if config.cell == "rnn":
        # h_t = tanh(W_xh x_t + b_xh + W_hh h_{t-1} + b_hh)   (both biases folded into x_t)
        pre = g.node("Add", [x_t, rec], p + "pre")
        return [g.node("Tanh", [pre], p + "h_t")]
    if config.cell == "lstm":
        gates = g.node("Add", [x_t, rec], p + "gates")
        names = [p + "i_pre", p + "f_pre", p + "g_pre", p + "o_pre"]
        g.nodes.append(helper.make_node("Split", [gates, split], names, name=p + "split", axis=1))
        i = g.node("Sigmoid", [names[0]], p + "i")  # input gate
        f = g.node("Sigmoid", [names[1]], p + "f")  # forget gate
        cand = g.node("Tanh", [names[2]], p + "g")  # candidate cell
        o = g.node("Sigmoid", [names[3]], p + "o")  # output gate
        # c_t = f * c_{t-1} + i * g ;  h_t = o * tanh(c_t)
        fc = g.node("Mul", [f, prev[1]], p + "fc")
        ig = g.node("Mul", [i, cand], p + "ig")
        c_t = g.node("Add", [fc, ig], p + "c_t")
        h_t = g.node("Mul", [o, g.node("Tanh", [c_t], p + "tanh_c")], p + "h_t")
        return [h_t, c_t]
    # gru
    rec_b = g.node("Add", [rec, bhh], p + "rec_b")  # W_hh h_{t-1} + b_hh
    xs = [p + "xr", p + "xz", p + "xn"]
    hs = [p + "hr", p + "hz", p + "hn"]
    g.nodes.append(helper.make_node("Split", [x_t, split], xs, name=p + "split_x", axis=1))
    g.nodes.append(helper.make_node("Split", [rec_b, split], hs, name=p + "split_h", axis=1))
    # r = σ(W_ir x + b_ir + W_hr h + b_hr) ; z = σ(W_iz x + b_iz + W_hz h + b_hz)
    r = g.node("Sigmoid", [g.node("Add", [xs[0], hs[0]], p + "r_pre")], p + "r")
    z = g.node("Sigmoid", [g.node("Add", [xs[1], hs[1]], p + "z_pre")], p + "z")
    # n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    n = g.node("Tanh", [g.node("Add", [xs[2], g.node("Mul", [r, hs[2]], p + "r_hn")], p + "n_pre")], p + "n")
    # h_t = (1 - z) * n + z * h_{t-1}  =  n + z * (h_{t-1} - n)
    diff = g.node("Sub", [h_prev, n], p + "h_minus_n")
    return [g.node("Add", [n, g.node("Mul", [z, diff], p + "z_diff")], p + "h_t")]


def build_model(config: ModelConfig, weights: dict[str, np.ndarray], metadata: dict[str, str]) -> onnx.ModelProto:
    """The complete rnngen model: graph, weights and metadata in one ModelProto."""
    tensors = [numpy_helper.from_array(value, name) for name, value in graph_weights(config, weights).items()]
    return complete_model(model_structure(config), tensors, metadata)


def complete_model(structure: onnx.ModelProto, weights: list[onnx.TensorProto], metadata: dict[str, str]) -> onnx.ModelProto:
    """`structure` (from model_structure) with its weight initializers and metadata added."""
    model = onnx.ModelProto()
    model.CopyFrom(structure)
    model.graph.initializer.extend(weights)
    helper.set_model_props(model, metadata)
    return model


def model_structure(config: ModelConfig) -> onnx.ModelProto:
    """Everything of the rnngen model for `config` but its weights and metadata.

    The graph names the weight initializers of `graph_weight_shapes` without holding them;
    its only initializers are the small integer constants the graph itself needs.
    """
    g = GraphBuilder()
    hidden, layers, vocab = config.hidden_size, config.num_layers, config.vocab_size
    f32 = TensorProto.FLOAT
    states = config.state_names

    g.const("one_idx", np.array(1, dtype=np.int64))
    g.const("scalar_shape", np.zeros(0, dtype=np.int64))
    split = g.const("gate_split", np.full(config.gates, hidden, dtype=np.int64))
    tokens_tb = g.node("Transpose", [TOKENS], "tokens_tb", perm=[1, 0])  # (T, B)
    trip_count = g.node("Gather", [g.node("Shape", [TOKENS], "tokens_shape"), "one_idx"], "time_steps")

    layer_input = ""
    finals: dict[str, list[str]] = {s: [] for s in states}
    for k in range(layers):
        p = f"l{k}_"
        if k == 0 and fold_embedding(config):
            xp = g.node("Gather", [layer_weight(k, INPUT_TABLE), tokens_tb], p + "xp")  # (T, B, G*H)
        else:
            if k == 0:
                layer_input = g.node("Gather", [EMBEDDING, tokens_tb], "embedded")
            proj = g.node("MatMul", [layer_input, layer_weight(k, W_IH_T)], p + "proj")
            xp = g.node("Add", [proj, layer_weight(k, B_IN)], p + "xp")  # (T, B, G*H)
        bhh = layer_weight(k, B_HH) if config.cell == "gru" else ""
        body = _recurrent_body(config, k, xp, layer_weight(k, W_HH_T), bhh, split)

        layer_idx = g.const(p + "idx", np.array(k, dtype=np.int64))
        initial = [g.node("Gather", [s, layer_idx], f"{p}{s}0") for s in states]  # (B, H) each
        outs = [f"{p}{s}_last" for s in states] + [p + "ys"]
        g.nodes.append(helper.make_node("Loop", [trip_count, ""] + initial, outs, name=p + "loop", body=body))
        for s, out in zip(states, outs):
            finals[s].append(out)
        layer_input = p + "ys"  # (T, B, H); feeds the next layer's projection

    out_bth = g.node("Transpose", [layer_input], "top_bth", perm=[1, 0, 2])  # (B, T, H)
    dec_mm = g.node("MatMul", [out_bth, DECODER_W_T], "decoder_mm")  # decoder (V, H): the embedding when tied
    g.node("Add", [dec_mm, DECODER_B], LOGITS)  # (B, T, V)

    for s in states:
        parts = [g.node("Unsqueeze", [f, g.const(f"{f}_axis", np.array([0], np.int64))], f + "_3d") for f in finals[s]]
        out = state_output_name(s)
        if len(parts) == 1:
            g.node("Identity", parts, out)
        else:
            g.node("Concat", parts, out, axis=0)

    graph_inputs = [helper.make_tensor_value_info(TOKENS, TensorProto.INT64, ["batch", "time"])]
    graph_inputs += [helper.make_tensor_value_info(s, f32, [layers, "batch", hidden]) for s in states]
    graph_outputs = [helper.make_tensor_value_info(LOGITS, f32, ["batch", "time", vocab])]
    graph_outputs += [helper.make_tensor_value_info(state_output_name(s), f32, [layers, "batch", hidden]) for s in states]
    graph = helper.make_graph(g.nodes, f"rnngen_{config.cell}", graph_inputs, graph_outputs, g.initializers)

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="rnngen")
    model.ir_version = IR_VERSION
    from rnngen import __version__

    model.producer_version = __version__
    return model
