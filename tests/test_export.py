"""Export: the ONNX Loop graph computes what the PyTorch model computes, and carries its metadata."""

import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from rnngen.model.config import ModelConfig  # noqa: E402
from rnngen.errors import OverwriteRefusedError  # noqa: E402
from rnngen.model.file import make_metadata, read_model_file  # noqa: E402
from rnngen.model.loop_graph import build_model  # noqa: E402
from rnngen.model.runtime import RnnModel  # noqa: E402
from rnngen.model.tokenizers import CharTokenizer  # noqa: E402
from rnngen.training.export import export_checkpoint, parity  # noqa: E402
from rnngen.training.model import RNNLanguageModel  # noqa: E402
from rnngen.training.trainer import TrainConfig, Trainer  # noqa: E402

SHAPES = [(1, 1), (1, 30), (4, 1), (3, 17), (5, 2)]


def torch_model(cell, embedding=0, layers=2, vocab=13, hidden=12, seed=0):
    torch.manual_seed(seed)
    model = RNNLanguageModel(ModelConfig(cell=cell, vocab_size=vocab, hidden_size=hidden, num_layers=layers, embedding_size=embedding))
    with torch.no_grad():  # larger weights than the default init, so disagreements would show
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model.eval()


@pytest.mark.parametrize("embedding", [0, 5, 40])  # tied; untied small (folded table); untied wide (not folded)
def test_onnx_matches_pytorch_for_every_cell_and_shape(cell, embedding):
    import onnxruntime as ort

    model = torch_model(cell, embedding=embedding)
    tok = CharTokenizer([chr(97 + i) for i in range(13)])
    proto = build_model(model.config, model.numpy_weights(), make_metadata(model.config, tok, {}))
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    gen = np.random.default_rng(1)
    for batch, time in SHAPES:
        tokens = gen.integers(0, 13, (batch, time))
        state = [gen.normal(0, 0.5, (2, batch, 12)).astype(np.float32) for _ in model.config.state_names]
        outs = session.run(None, {"tokens": tokens, **dict(zip(model.config.state_names, state))})
        with torch.no_grad():
            logits, new_state = model(torch.from_numpy(tokens), tuple(map(torch.from_numpy, state)))
        assert outs[0].shape == (batch, time, 13)
        np.testing.assert_allclose(outs[0], logits.numpy(), atol=1e-4)
        for got, want in zip(outs[1:], new_state):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


def test_stepping_one_token_at_a_time_equals_one_call(cell):
    model = torch_model(cell)
    tok = CharTokenizer([chr(97 + i) for i in range(13)])
    proto = build_model(model.config, model.numpy_weights(), make_metadata(model.config, tok, {}))
    import onnxruntime as ort

    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    tokens = np.random.default_rng(2).integers(0, 13, (2, 12))
    zeros = {n: np.zeros((2, 2, 12), np.float32) for n in model.config.state_names}
    full = s.run(None, {"tokens": tokens, **zeros})
    state = zeros
    for t in range(12):
        out = s.run(None, {"tokens": tokens[:, t:t + 1], **state})
        np.testing.assert_allclose(out[0][:, 0], full[0][:, t], atol=1e-5)
        state = dict(zip(model.config.state_names, out[1:]))
    for name, want in zip(model.config.state_names, full[1:]):
        np.testing.assert_allclose(state[name], want, atol=1e-5)


def test_recurrence_is_an_onnx_loop_not_a_fused_op(cell):
    model = torch_model(cell, layers=3)
    proto = build_model(model.config, model.numpy_weights(), {})
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Loop") == 3
    assert not {"LSTM", "GRU", "RNN", "Scan"} & set(ops)


def train_tiny(corpus_file, out, cell="lstm", steps=6, **kw):
    cfg = TrainConfig(data=str(corpus_file), out_dir=str(out), seq_len=16, batch_size=4, steps=steps,
                      eval_every=3, sample_tokens=0, warmup_steps=2, **kw)
    trainer = Trainer(ModelConfig(cell=cell, hidden_size=16, num_layers=2), cfg)
    trainer.run()
    return trainer


def test_export_writes_checked_self_describing_file(corpus_file, tmp_path):
    trainer = train_tiny(corpus_file, tmp_path / "run")
    report = export_checkpoint(tmp_path / "run", tmp_path / "m.onnx")
    assert report.max_logit_diff <= 1e-4 and report.max_state_diff <= 1e-4
    loaded = read_model_file(tmp_path / "m.onnx")
    assert loaded.config == trainer.model.config
    assert loaded.tokenizer.to_dict() == trainer.tokenizer.to_dict()
    assert loaded.training["corpus"] == "corpus.txt"
    assert loaded.training["corpus_chars"] == len(corpus_file.read_text())
    assert loaded.training["val_loss"] == pytest.approx(trainer.best_val)
    assert loaded.training["parameters"] == trainer.model.num_parameters()
    assert loaded.metadata["rnngen.version"]
    assert loaded.metadata["rnngen.created"]
    assert json.loads(loaded.metadata["rnngen.state"]) == ["h", "c"]
    # The runtime reproduces the PyTorch model's logits on the checkpoint's weights.
    rnn = RnnModel.load(tmp_path / "m.onnx", device="cpu")
    tokens = np.array([trainer.tokenizer.encode("the quick brown fox")])
    logits, _ = rnn.run(tokens, rnn.initial_state(1))
    with torch.no_grad():
        want, _ = trainer.model.eval()(torch.from_numpy(tokens), trainer.model.initial_state(1))
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-4)


def test_export_never_overwrites_without_force(corpus_file, tmp_path):
    train_tiny(corpus_file, tmp_path / "run", steps=3)
    target = tmp_path / "m.onnx"
    target.write_bytes(b"precious")
    with pytest.raises(OverwriteRefusedError, match="--force"):
        export_checkpoint(tmp_path / "run", target)
    assert target.read_bytes() == b"precious"
    export_checkpoint(tmp_path / "run", target, force=True)
    assert read_model_file(target).config.cell == "lstm"


def test_parity_check_detects_a_wrong_graph():
    model = torch_model("lstm")
    weights = model.numpy_weights()
    weights["rnn.weight_hh_l1"] = weights["rnn.weight_hh_l1"] + 0.1  # the graph no longer matches the model
    proto = build_model(model.config, weights, {})
    max_logits, max_state = parity(proto, model)
    assert max_logits > 1e-3 and max_state > 1e-3
