"""The loop-free step graph, derived from a model's own Loop graph.

Decoding calls the model with time = 1 once per token. Through the Loop graph
that costs a Loop per layer (onnxruntime sets up a subgraph frame each time);
the step graph is the same model with every Loop replaced by one inlined copy
of its body, so a step is a plain graph of a few matrix products.

Derived, not stored: any rnngen model gets it, built from the Loop graph that
runs (rnngen's own graph with the file's weights, never the file's graph), so
it computes exactly what the Loop graph computes for one time step (tests hold
the two to each other).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rnngen.model.loop_graph import state_output_name

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
    """The decoding step graph's input for one layer's state (B, H) (see state_by_layer)."""
    return f"{state}_l{layer}"


def layer_state_output_name(state: str, layer: int) -> str:
    return f"{state}_out_l{layer}"


def state_by_layer(step: onnx.ModelProto, state_names: tuple[str, ...], num_layers: int) -> onnx.ModelProto:
    """A copy of the step graph that takes and gives each layer's state as its own tensor (B, H):
    inputs `layer_state_name(s, k)`, outputs `layer_state_output_name(s, k)`.

    The model's interface stacks the layers (L, B, H): the step graph then splits them with a
    Gather per layer and state, and joins them with an Unsqueeze per layer and a Concat, copying
    the whole state every step. Decoding binds each layer's slice of its (L, B, H) arrays instead
    (rnngen.model.slots, rnngen.model.graph_stepper): the same arithmetic, ten fewer nodes for a
    2-layer LSTM. The step graph is rnngen's own (rnngen.model.loop_graph), whose splits and joins
    have exactly this form; anything else is refused.
    """
    model = onnx.ModelProto()
    model.CopyFrom(step)
    g = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    producer = {out: n for n in g.node for out in n.output}
    rename: dict[str, str] = {}  # tensor -> its new name (a per-layer input or output)
    dropped: set[int] = set()  # ids of the split and join nodes
    for node in g.node:  # splits: Gather(state, k) -> layer k's state
        if node.op_type == "Gather" and node.input[0] in state_names:
            layer = constants.get(node.input[1])
            if layer is None or layer.shape != () or any(a.name == "axis" and a.i != 0 for a in node.attribute):
                raise ValueError(f"step graph: {node.name} does not take one layer of {node.input[0]}")
            rename[node.output[0]] = layer_state_name(node.input[0], int(layer))
            dropped.add(id(node))
    for s in state_names:  # joins: Concat(Unsqueeze(layer 0's), ...) or Identity(Unsqueeze(...)) for one layer
        join = producer[state_output_name(s)]
        parts = [producer[name] for name in join.input]
        if join.op_type not in ("Concat", "Identity") or len(parts) != num_layers or any(p.op_type != "Unsqueeze" for p in parts):
            raise ValueError(f"step graph: {state_output_name(s)} is not its layers stacked")
        for k, part in enumerate(parts):
            rename[part.input[0]] = layer_state_output_name(s, k)
            dropped.add(id(part))
        dropped.add(id(join))
    nodes = []
    for node in g.node:
        if id(node) in dropped:
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.ClearField("input")
        copy.input.extend(rename.get(name, name) for name in node.input)
        copy.ClearField("output")
        copy.output.extend(rename.get(name, name) for name in node.output)
        nodes.append(copy)
    f32 = onnx.TensorProto.FLOAT
    hidden = next(i for i in g.input if i.name == state_names[0]).type.tensor_type.shape.dim[2]
    per_layer = [(s, k) for s in state_names for k in range(num_layers)]
    inputs = [i for i in g.input if i.name not in state_names]
    inputs += [helper.make_tensor_value_info(layer_state_name(s, k), f32, ["batch", hidden.dim_value]) for s, k in per_layer]
    outputs = [o for o in g.output if o.name not in {state_output_name(s) for s in state_names}]
    outputs += [helper.make_tensor_value_info(layer_state_output_name(s, k), f32, ["batch", hidden.dim_value]) for s, k in per_layer]
    used = {name for n in nodes for name in n.input}
    initializers = [t for t in g.initializer if t.name in used]
    for field, values in (("node", nodes), ("input", inputs), ("output", outputs), ("initializer", initializers)):
        g.ClearField(field)
        getattr(g, field).extend(values)
    return model


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


def add_sampling_head(step: onnx.ModelProto, vocab_size: int, logits_name: str = "logits") -> onnx.ModelProto:
    """The step graph plus temperature sampling of the next token, inside the graph.

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

    flat = node("Squeeze", [logits_name, "head_axis1"], "head_logits")  # (B, V)
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
