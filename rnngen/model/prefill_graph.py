"""The prefill graph: a model's own Loop graph that returns the logits of the last position only.

A prompt needs the state after it and the next-token logits; the logits of
every earlier position are never used. This copy of the file's graph slices
the top layer's output to its last time step before the output projection, so
a prompt costs no (T, vocab) logits, and prefilling in chunks of
PREFILL_CHUNK tokens (carrying the state) keeps memory flat whatever the
prompt's length. Derived, not stored: any rnngen model file gets it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rnngen.model.loop_graph import LOGITS

PREFILL_CHUNK = 2048  # tokens per Loop call: memory ~ chunk x (gates + layers) x hidden floats


def derive_last_logits_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose `logits` output is (B, 1, V): the last position's only."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    producer = {o: node for node in g.node for o in node.output}
    consts = {"last__start": np.array([-1], np.int64), "last__end": np.array([np.iinfo(np.int64).max], np.int64),
              "last__axis": np.array([1], np.int64)}
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    # rnngen's graphs end in logits = MatMul(top (B, T, H), W) + b: slice the MatMul's input.
    # Any other ending is sliced at the output (right, though the full logits are still computed).
    head = producer.get(LOGITS)
    matmul = next((producer[i] for i in head.input if i in producer and producer[i].op_type == "MatMul"), None) if head else None
    if matmul is not None:
        nodes = list(g.node)
        at = nodes.index(matmul)
        nodes.insert(at, helper.make_node("Slice", [matmul.input[0], "last__start", "last__end", "last__axis"],
                                          ["last__top"], name="last__slice"))
        matmul.input[0] = "last__top"
        del g.node[:]
        g.node.extend(nodes)
    else:
        for node in g.node:
            for i, name in enumerate(node.output):
                if name == LOGITS:
                    node.output[i] = "last__all_logits"
        g.node.append(helper.make_node("Slice", ["last__all_logits", "last__start", "last__end", "last__axis"], [LOGITS],
                                       name="last__slice"))
    for value in g.output:
        if value.name == LOGITS:
            value.type.tensor_type.shape.dim[1].dim_value = 1
    return out

