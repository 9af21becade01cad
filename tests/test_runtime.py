"""Loading refuses what is not an rnngen model; device selection is honest. No torch here."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rnngen.model.config import ModelConfig
from rnngen.errors import DeviceError, InvalidParameterError, ModelFormatError
from rnngen.model.file import FORMAT_VERSION, read_model_file
from rnngen.model.runtime import RnnModel, full_proto
from rnngen.model.step_graph import decoding_step_model
from rnngen.model.devices import cuda_unusable_reason, select_providers
from rnngen.model.tokenizers import CharTokenizer

from conftest import write_model


def test_loads_a_valid_model_and_runs_it(char_model_file):
    rnn = RnnModel.load(char_model_file, device="cpu")
    assert rnn.config.cell == "lstm" and rnn.state_names == ("h", "c")
    assert rnn.providers == ["CPUExecutionProvider"]
    logits, state = rnn.run(np.array([[1, 2, 3]]), rnn.initial_state(1))
    assert logits.shape == (1, 3, rnn.config.vocab_size)
    assert state["h"].shape == state["c"].shape == (2, 1, 16)
    assert np.isfinite(logits).all()


def refusal(path) -> str:
    with pytest.raises(ModelFormatError) as err:
        read_model_file(path)
    return str(err.value)


def test_refuses_missing_empty_and_non_onnx_files(tmp_path):
    assert "model file not found" in refusal(tmp_path / "nope.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert "is empty" in refusal(tmp_path / "empty.onnx")
    (tmp_path / "text.onnx").write_text("this is a text file, not a model\n" * 20)
    assert "not an ONNX model" in refusal(tmp_path / "text.onnx")
    assert "model path is not a file" in refusal(tmp_path)


def test_refuses_truncated_model(char_model_file, tmp_path):
    data = char_model_file.read_bytes()
    for cut in (len(data) // 3, len(data) - 40, len(data) - 1):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        message = refusal(path)
        assert "truncated" in message or "damaged" in message or "not an ONNX model" in message, message


def test_refuses_another_tools_model(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, producer_name="pytorch")
    (tmp_path / "other.onnx").write_bytes(model.SerializeToString())
    message = refusal(tmp_path / "other.onnx")
    assert "another tool (producer 'pytorch')" in message


def rewrite(path, out, change):
    model = onnx.load_from_string(path.read_bytes())
    change(model)
    out.write_bytes(model.SerializeToString())
    return out


def set_meta(model, key, value):
    for p in model.metadata_props:
        if p.key == key:
            p.value = value


def test_refuses_newer_format_version(char_model_file, tmp_path):
    path = rewrite(char_model_file, tmp_path / "new.onnx", lambda m: set_meta(m, "rnngen.format_version", str(FORMAT_VERSION + 1)))
    message = refusal(path)
    assert f"format version {FORMAT_VERSION + 1}" in message and "upgrade rnngen" in message


def test_refuses_broken_metadata(char_model_file, tmp_path):
    path = rewrite(char_model_file, tmp_path / "m.onnx", lambda m: set_meta(m, "rnngen.config", "{not json"))
    assert "metadata rnngen.config: the value is not valid JSON" in refusal(path)
    path = rewrite(char_model_file, tmp_path / "m2.onnx", lambda m: set_meta(m, "rnngen.tokenizer", json.dumps({"kind": "char", "symbols": ["a", "b"]})))
    assert "tokenizer has 2 symbols" in refusal(path)


def test_refuses_inputs_that_do_not_match_the_state_layout(char_model_file, tmp_path):
    def rename_c(model):
        for v in model.graph.input:
            if v.name == "c":
                v.name = "cell_state"
    assert "do not match the state layout" in refusal(rewrite(char_model_file, tmp_path / "a.onnx", rename_c))

    def wrong_hidden(model):
        model.graph.input[1].type.tensor_type.shape.dim[2].dim_value = 99
    assert "expected FLOAT [2, 'batch', 16]" in refusal(rewrite(char_model_file, tmp_path / "b.onnx", wrong_hidden))

    path = rewrite(char_model_file, tmp_path / "c.onnx", lambda m: set_meta(m, "rnngen.state", '["h"]'))
    assert "state layout" in refusal(path)


def make_external(char_model_file, tmp_path, location):
    def to_external(model):
        tensor = next(t for t in model.graph.initializer if t.name == "decoder_b")
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", location
    return rewrite(char_model_file, tmp_path / "ext.onnx", to_external)


@pytest.mark.parametrize("location,needle", [
    ("/etc/passwd", "only relative paths"),
    ("../secret.bin", "outside the model's folder"),
    ("sub/../../secret.bin", "outside the model's folder"),
    ("missing.bin", "does not exist"),
])
def test_refuses_external_data_outside_the_model_folder(char_model_file, tmp_path, location, needle):
    (tmp_path.parent / "secret.bin").write_bytes(b"\0" * 64)
    assert needle in refusal(make_external(char_model_file, tmp_path, location))


def test_accepts_external_data_inside_the_model_folder(char_model_file, tmp_path):
    vocab = read_model_file(char_model_file).config.vocab_size
    bias = np.linspace(-1, 1, vocab).astype(np.float32)
    (tmp_path / "weights.bin").write_bytes(bias.tobytes())
    rnn = RnnModel.load(make_external(char_model_file, tmp_path, "weights.bin"), device="cpu")
    assert rnn.file.has_external_data
    plain = RnnModel.load(char_model_file, device="cpu")
    tokens = np.array([[3]])
    a, _ = rnn.run(tokens, rnn.initial_state(1))
    b, _ = plain.run(tokens, plain.initial_state(1))
    plain_bias = onnx.numpy_helper.to_array(next(t for t in onnx.load(str(char_model_file)).graph.initializer if t.name == "decoder_b"))
    np.testing.assert_allclose(a - b, np.broadcast_to(bias - plain_bias, a.shape), atol=1e-5)


def test_refuses_non_standard_operator_domains(char_model_file, tmp_path):
    def custom(model):
        model.graph.node[0].domain = "com.example.evil"
    assert "operator domain 'com.example.evil'" in refusal(rewrite(char_model_file, tmp_path / "d.onnx", custom))


def test_device_selection():
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(InvalidParameterError, match="device: 'tpu' is not one of auto, cpu, cuda"):
        select_providers("tpu")
    reason = cuda_unusable_reason()
    if reason is None:
        pytest.skip("CUDA is usable on this machine")
    assert select_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(DeviceError) as err:
        select_providers("cuda")
    assert "--device cuda: CUDA cannot be used" in str(err.value) and reason in str(err.value)


def test_auto_falls_back_quietly_when_cuda_libraries_are_missing(monkeypatch, capfd):
    import onnxruntime as ort

    import rnngen.model.devices as devices

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(devices, "_CUDART", ("libcudart-not-here.so.13",))
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: None, raising=False)
    assert "CUDA runtime library" in cuda_unusable_reason()
    assert select_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(DeviceError, match="libcudart-not-here"):
        select_providers("cuda")
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_model_config_mismatch_between_graph_and_metadata(tmp_path):
    tok = CharTokenizer(list("abcdef"))
    path = write_model(tmp_path / "m.onnx", ModelConfig(cell="gru", vocab_size=6, hidden_size=8, num_layers=1), tok)
    cfg = json.dumps(ModelConfig(cell="gru", vocab_size=6, hidden_size=9, num_layers=1).to_dict())
    message = refusal(rewrite(path, tmp_path / "x.onnx", lambda m: set_meta(m, "rnngen.config", cfg)))
    assert "expected FLOAT [1, 'batch', 9]" in message


@pytest.mark.parametrize("layers, embedding", [(1, 0), (3, 0), (2, 2)])  # (2, 2): layer 0 without an input table
def test_the_decoding_step_takes_each_layers_state_and_steps_as_the_loop_graph(cell, layers, embedding, tmp_path, char_tokenizer):
    """The decoding step graph's per-layer state inputs and outputs carry the (L, B, H) state of the
    model's Loop graph, layer by layer in order: stepping token by token gives the Loop graph's
    logits and state."""
    config = ModelConfig(cell=cell, vocab_size=char_tokenizer.vocab_size, hidden_size=9, num_layers=layers,
                         embedding_size=embedding)
    model = RnnModel.load(write_model(tmp_path / "m.onnx", config, char_tokenizer))
    names = [i.name for i in model.step_session.get_inputs()] + [o.name for o in model.step_session.get_outputs()]
    assert not set(config.state_names) & set(names)  # no stacked state in or out
    ops = {n.op_type for n in decoding_step_model(full_proto(model.file), config).graph.node}
    assert not ops & {"Transpose", "Unsqueeze", "Squeeze", "Concat", "Identity", "Loop"}  # nothing that only moves data
    gen = np.random.default_rng(0)
    tokens = gen.integers(0, config.vocab_size, (3, 7))
    state = {s: gen.normal(0, 0.5, (layers, 3, 9)).astype(np.float32) for s in config.state_names}
    want_logits, want_state = model.run(tokens, state)
    for t in range(tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state)
        np.testing.assert_allclose(logits, want_logits[:, t], atol=1e-5)
    for s in config.state_names:
        np.testing.assert_allclose(state[s], want_state[s], atol=1e-5)
