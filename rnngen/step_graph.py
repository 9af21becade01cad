"""The loop-free step graph, derived from a model's own Loop graph.

Decoding calls the model with time = 1 once per token. Through the Loop graph
that costs a Loop per layer (onnxruntime sets up a subgraph frame each time);
the step graph is the same model with every Loop replaced by one inlined copy
of its body, so a step is a plain graph of a few matrix products.

Derived, not stored: any rnngen model file gets it, and it is built from the
file's own nodes and weights, so it computes exactly what the Loop graph
computes for one time step (tests hold the two to each other).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

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
