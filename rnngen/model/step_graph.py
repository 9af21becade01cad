"""Loop-free graphs for one token at a time, made from a model's own Loop graph.

Decoding calls the model once per token. Through the Loop graph that costs a
Loop per layer (onnxruntime sets up a subgraph frame each time); a step graph
is a plain graph of a few matrix products. Two are made here, neither stored:

- `derive_step_model`: the model's own interface at time = 1 (tokens (B, 1),
  state (L, B, H)), every Loop replaced by one inlined copy of its body. Layer
  introspection (rnngen.inspect) and the benchmarks' bare baseline use it.
- `decoding_step_model`: what the decoding engine runs, with the sampling head
  of `add_sampling_head`: the same cells (rnngen.model.loop_graph.cell_step) with
  the same weights, but tokens (B,), logits (B, V) and each layer's state as a
  tensor of its own, so no node only moves data between the model's interface
  and the cells.

Both come from rnngen's own graph with the file's weights (never the file's
graph), and compute what the Loop graph computes for one time step (tests hold
them to it).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rnngen.model.config import ModelConfig
from rnngen.model.loop_graph import (B_HH, B_IN, DECODER_B, DECODER_W_T, EMBEDDING, INPUT_TABLE, LOGITS, TOKENS, W_HH_T,
                                     W_IH_T, GraphBuilder, cell_step, fold_embedding, layer_weight)

STEP_ITER = "step__iteration"  # the one iteration's number: 0
STEP_COND = "step__condition"


def derive_step_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` for time = 1: every top-level Loop inlined as a single iteration."""
    graph = model.graph
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "Loop":
            nodes.extend(_inline_one_iteration(node))
        else:
            nodes.append(node)
    initializers = list(graph.initializer) + [
        numpy_helper.from_array(np.array(0, dtype=np.int64), STEP_ITER),
        numpy_helper.from_array(np.array(True), STEP_COND),
    ]
    nodes = _live_nodes(nodes, [o.name for o in graph.output])
    used = {name for n in nodes for name in n.input}
    initializers = [t for t in initializers if t.name in used]
    step_graph = helper.make_graph(nodes, graph.name + "_step", list(graph.input), list(graph.output), initializers)
    step = helper.make_model(step_graph, opset_imports=list(model.opset_import), producer_name=model.producer_name)
    step.ir_version = model.ir_version
    return step


def _inline_one_iteration(loop: onnx.NodeProto) -> list[onnx.NodeProto]:
    body = next(a.g for a in loop.attribute if a.name == "body")
    carried = len(loop.input) - 2
    prefix = loop.name + "/"
    rename = {body.input[0].name: STEP_ITER, body.input[1].name: STEP_COND}
    for inner, outer in zip(body.input[2:], loop.input[2:]):
        rename[inner.name] = outer  # loop-carried values start from the Loop's initial inputs
    for inner_node in body.node:
        for out in inner_node.output:
            rename[out] = prefix + out  # values made inside the body get names of their own
    out_nodes = []
    for inner_node in body.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(inner_node)
        copy.name = prefix + inner_node.name
        copy.ClearField("input")
        copy.input.extend(rename.get(name, name) for name in inner_node.input)  # others: outer scope
        copy.ClearField("output")
        copy.output.extend(rename[name] for name in inner_node.output)
        out_nodes.append(copy)
    body_outputs = [rename.get(o.name, o.name) for o in body.output]
    for final, value in zip(loop.output[:carried], body_outputs[1 : 1 + carried]):
        out_nodes.append(helper.make_node("Identity", [value], [final], name=prefix + "final_" + final))
    axis = prefix + "scan_axis"
    scans = list(zip(loop.output[carried:], body_outputs[1 + carried :]))
    if scans:  # scan outputs of one iteration: stacked along a new time axis of length 1
        out_nodes.append(helper.make_node("Constant", [], [axis], name=axis, value=numpy_helper.from_array(np.array([0], np.int64))))
    for stacked, value in scans:
        out_nodes.append(helper.make_node("Unsqueeze", [value, axis], [stacked], name=prefix + "scan_" + stacked))
    return out_nodes


def _live_nodes(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """Nodes that the graph outputs depend on, in their original (topological) order."""
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}
    needed, stack = set(), list(outputs)
    while stack:
        name = stack.pop()
        i = producer.get(name)
        if i is None or i in needed:
            continue
        needed.add(i)
        stack.extend(nodes[i].input)
    return [n for i, n in enumerate(nodes) if i in needed]


def layer_state_name(state: str, layer: int) -> str:
    """The decoding step graph's input for one layer's state (B, H) (see decoding_step_model)."""
    return f"{state}_l{layer}"


def layer_state_output_name(state: str, layer: int) -> str:
    return f"{state}_out_l{layer}"


def layer_states(config: ModelConfig) -> list[tuple[str, int]]:
    """The decoding step graph's per-layer state tensors, in its input and output order: (state, layer)."""
    return [(s, k) for s in config.state_names for k in range(config.num_layers)]


def decoding_step_model(model: onnx.ModelProto, config: ModelConfig) -> onnx.ModelProto:
    """The graph decoding runs once per token: one token per row through every layer, with the
    weights of `model` (rnngen's own graph, see rnngen.model.canonical).

      inputs   tokens  int64   (batch,)
               each layer's state: layer_state_name(s, k)          float32 (batch, hidden)
      outputs  logits  float32 (batch, vocab)
               each layer's new state: layer_state_output_name(s, k) float32 (batch, hidden)

    Built from the same cell as the Loop graph's body (loop_graph.cell_step), so it computes
    what the Loop graph computes for one time step (tests hold the two to each other; the last
    bits differ, since onnxruntime fuses its 2-D products and their biases into Gemms). It differs
    from `derive_step_model` (the model's interface at time 1) only in where tensors come from:
    no time axis (the inlined body takes its step out of a (1, B, .) tensor and stacks it back
    into one, with a Transpose, Gather or Unsqueeze each time), and the state layer by layer,
    which decoding binds to each layer's slice of its (L, B, H) arrays (rnngen.model.slots,
    rnngen.model.graph_stepper) where the stacked interface would split and join it, copying it,
    every step. After onnxruntime's own optimisations the shipped 2-layer LSTM's step runs 25 nodes
    instead of 43.
    """
    g = GraphBuilder()
    states = config.state_names
    split = g.const("gate_split", np.full(config.gates, config.hidden_size, dtype=np.int64))
    layer_input = TOKENS
    renames: dict[str, str] = {}
    for k in range(config.num_layers):
        p = f"l{k}_"
        if k == 0 and fold_embedding(config):
            x_t = g.node("Gather", [layer_weight(k, INPUT_TABLE), TOKENS], p + "xp")  # (B, G*H)
        else:
            if k == 0:
                layer_input = g.node("Gather", [EMBEDDING, TOKENS], "embedded")
            proj = g.node("MatMul", [layer_input, layer_weight(k, W_IH_T)], p + "proj")
            x_t = g.node("Add", [proj, layer_weight(k, B_IN)], p + "xp")
        bhh = layer_weight(k, B_HH) if config.cell == "gru" else ""
        prev = [layer_state_name(s, k) for s in states]
        new = cell_step(g, config, k, x_t, prev, layer_weight(k, W_HH_T), bhh, split)
        renames.update({made: layer_state_output_name(s, k) for s, made in zip(states, new)})
        layer_input = new[0]
    g.node("Add", [g.node("MatMul", [layer_input, DECODER_W_T], "decoder_mm"), DECODER_B], LOGITS)
    for node in g.nodes:  # the new states are the graph's outputs themselves (no Identity copies them out)
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]

    f32, hidden = onnx.TensorProto.FLOAT, config.hidden_size
    per_layer = layer_states(config)
    inputs = [helper.make_tensor_value_info(TOKENS, onnx.TensorProto.INT64, ["batch"])]
    inputs += [helper.make_tensor_value_info(layer_state_name(s, k), f32, ["batch", hidden]) for s, k in per_layer]
    outputs = [helper.make_tensor_value_info(LOGITS, f32, ["batch", config.vocab_size])]
    outputs += [helper.make_tensor_value_info(layer_state_output_name(s, k), f32, ["batch", hidden]) for s, k in per_layer]
    used = {name for n in g.nodes for name in n.input}
    weights = [t for t in model.graph.initializer if t.name in used and t.name not in {c.name for c in g.initializers}]
    graph = helper.make_graph(g.nodes, model.graph.name + "_decoding_step", inputs, outputs, g.initializers + weights)
    step = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name=model.producer_name)
    step.ir_version = model.ir_version
    return step


SAMPLE_INV_TEMPERATURE = "inv_temperature"  # (B, 1) float32: 1 / temperature (1 for greedy rows)
SAMPLE_GREEDY = "greedy"  # (B,) bool: rows that take the argmax
SAMPLE_UNIFORM = "uniform"  # (B, 1) float32 in [0, 1): the row's random draw for its next token


def temperature_inputs(temperature: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sampling head's (B,) greedy flags and (B,) inverse temperatures (1 for greedy rows) for
    temperatures (B,), 0 meaning greedy."""
    temperature = np.asarray(temperature, dtype=np.float32).reshape(-1)
    greedy = temperature == 0.0
    return greedy, np.where(greedy, 1.0, 1.0 / np.where(greedy, 1.0, temperature)).astype(np.float32)


NEXT_TOKEN = "next_token"  # (B,) int64
LOG_Z = "log_z"  # (B,) float32: log of the softmax denominator of the logits (for log-probabilities)


def add_sampling_head(step: onnx.ModelProto, vocab_size: int, logits_name: str = LOGITS) -> onnx.ModelProto:
    """The decoding step graph (logits (B, V)) plus temperature sampling of the next token, inside the graph.

    next_token = argmax(logits) for greedy rows, else the inverse-CDF draw at `uniform` from the
    weights exp((logits - max) / temperature) (the first token whose cumulative weight exceeds
    uniform * total: the same rule as the engine's numpy sampler). Rows that need other
    processors (top-k, top-p, penalties, ...) ignore next_token and use the logits. On a GPU this
    keeps sampling on the device: only token ids need to come back.

    Built from few and cheap kernels (measured on onnxruntime's CPU provider: at batch 64,
    ReduceLogSumExp and an int64 ReduceSum took 5-30x longer than the float ReduceMax/ReduceSum and
    Exp used here; at batch 1 each node costs 1-2 us whatever it does).
    """
    model = onnx.ModelProto()
    model.CopyFrom(step)
    g = model.graph
    f32 = onnx.TensorProto.FLOAT
    g.input.extend([helper.make_tensor_value_info(SAMPLE_INV_TEMPERATURE, f32, ["batch", 1]),
                    helper.make_tensor_value_info(SAMPLE_GREEDY, onnx.TensorProto.BOOL, ["batch"]),
                    helper.make_tensor_value_info(SAMPLE_UNIFORM, f32, ["batch", 1])])
    consts = {"head_axis1": np.array([1], np.int64), "head_axis1_scalar": np.array(1, np.int64),
              "head_last_start": np.array([-1], np.int64), "head_last_end": np.array([vocab_size], np.int64)}
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())

    def node(op, inputs, output, **attrs):
        g.node.append(helper.make_node(op, inputs, [output], name="head/" + output, **attrs))
        return output

    flat = logits_name  # (B, V)
    peak = node("ReduceMax", [flat], "head_peak", axes=[1], keepdims=1)  # (B, 1)
    shifted = node("Sub", [flat, peak], "head_shifted")  # <= 0
    total_1 = node("ReduceSum", [node("Exp", [shifted], "head_exp"), "head_axis1"], "head_sum", keepdims=0)
    node("Add", [node("Squeeze", [peak, "head_axis1"], "head_peak_flat"), node("Log", [total_1], "head_log_sum")], LOG_Z)
    greedy = node("ArgMax", [flat], "head_argmax", axis=1, keepdims=0)
    weights = node("Exp", [node("Mul", [shifted, SAMPLE_INV_TEMPERATURE], "head_scaled")], "head_weights")
    cdf = node("CumSum", [weights, "head_axis1_scalar"], "head_cdf")
    total = node("Slice", [cdf, "head_last_start", "head_last_end", "head_axis1"], "head_total")  # (B, 1)
    target = node("Mul", [SAMPLE_UNIFORM, total], "head_target")
    # The first token whose cumulative weight passes the target: the count of those at or below it.
    # ArgMax finds the first 1 of the float mask; one passes, since a draw below 1 keeps the target
    # below the total (see rnngen.decoding.random_streams.BELOW_ONE).
    passed = node("Cast", [node("Greater", [cdf, target], "head_passed_bool")], "head_passed", to=f32)
    sampled = node("ArgMax", [passed], "head_sampled", axis=1, keepdims=0)
    node("Where", [SAMPLE_GREEDY, greedy, sampled], NEXT_TOKEN)
    g.output.extend([helper.make_tensor_value_info(NEXT_TOKEN, onnx.TensorProto.INT64, ["batch"]),
                     helper.make_tensor_value_info(LOG_Z, f32, ["batch"])])
    return model
