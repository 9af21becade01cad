"""The fused-op graphs (standard ONNX LSTM/GRU/RNN ops) compute what the Loop graph computes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rnngen.model.config import ModelConfig
from rnngen.model.fused_graph import NotDerivable, derive_fused_model
from rnngen.model.loop_graph import LOGITS, W_HH_T, build_model, layer_weight, state_output_name
from rnngen.model.runtime import RnnModel

from conftest import random_weights, write_model


def session(proto: onnx.ModelProto):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


# (embedding_size, vocab, hidden): layer 0 as a folded input table read one-hot (V <= gates), the
# table through an identity (V > gates, a vanilla RNN), and a plain embedding with its projection.
SHAPES = [(0, 11, 16), (0, 40, 16), (5, 11, 16)]


@pytest.mark.parametrize("embedding,vocab,hidden", SHAPES)
def test_fused_graph_matches_loop_graph(cell, embedding, vocab, hidden):
    config = ModelConfig(cell=cell, vocab_size=vocab, hidden_size=hidden, num_layers=2, embedding_size=embedding, tie_weights=False)
    loop_proto = build_model(config, random_weights(config, seed=3), {})
    loop, fused = session(loop_proto), session(derive_fused_model(loop_proto, config))
    outputs = [LOGITS, *(state_output_name(s) for s in config.state_names)]
    rng = np.random.default_rng(1)
    for batch, time in [(1, 1), (3, 1), (1, 9), (4, 6)]:
        feeds = {"tokens": rng.integers(0, vocab, (batch, time))}
        feeds.update({s: rng.standard_normal((2, batch, hidden)).astype(np.float32) for s in config.state_names})
        for want, got in zip(loop.run(outputs, feeds), fused.run(outputs, feeds)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_foreign_weights_are_not_derived(tmp_path, char_tokenizer):
    config = ModelConfig(cell="lstm", vocab_size=char_tokenizer.vocab_size, hidden_size=8, num_layers=1)
    proto = onnx.load(str(write_model(tmp_path / "m.onnx", config, char_tokenizer)))
    name = layer_weight(0, W_HH_T)
    next(t for t in proto.graph.initializer if t.name == name).name = "renamed"
    with pytest.raises(NotDerivable, match="l0_w_hh_t"):
        derive_fused_model(proto, config)


def test_runtime_runs_lstm_prompts_through_the_fused_graph(char_model_file):
    model = RnnModel.load(char_model_file, device="cpu")
    assert model.uses_fused_run  # an LSTM on the CPU (FUSED_RUN_CELLS)
    tokens = np.array([[1, 2, 3, 4, 5]])
    state = model.initial_state(1)
    logits, new_state = model.run(tokens, state)
    loop = model.session.run(None, {"tokens": tokens, **state})
    np.testing.assert_allclose(logits, loop[0], atol=1e-5)
    np.testing.assert_allclose(new_state["c"], loop[2], atol=1e-5)


def test_runtime_keeps_the_loop_where_the_fused_graph_disagrees(tmp_path, char_tokenizer, monkeypatch):
    """A fused graph that computes something else (here its cell function swapped) is caught by the
    load-time agreement check: the model keeps running the Loop graph. (A file whose own graph was
    edited never gets this far: loading refuses any graph that is not rnngen's.)"""
    import rnngen.model.runtime as runtime

    config = ModelConfig(cell="lstm", vocab_size=char_tokenizer.vocab_size, hidden_size=8, num_layers=1)
    path = write_model(tmp_path / "m.onnx", config, char_tokenizer)
    assert RnnModel.load(path, device="cpu").uses_fused_run
    derive = runtime.derive_fused_model

    def wrong(proto, cfg):
        fused = derive(proto, cfg)
        lstm = next(n for n in fused.graph.node if n.op_type == "LSTM")
        lstm.attribute.append(onnx.helper.make_attribute("activations", ["Sigmoid", "Sigmoid", "Sigmoid"]))
        return fused

    monkeypatch.setattr(runtime, "derive_fused_model", wrong)
    model = RnnModel.load(path, device="cpu")
    assert not model.uses_fused_run
    logits, _ = model.run(np.array([[1, 2]]), model.initial_state(1))
    np.testing.assert_array_equal(logits, model.session.run([LOGITS], {"tokens": np.array([[1, 2]]), **model.initial_state(1)})[0])
