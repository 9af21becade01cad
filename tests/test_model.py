"""The PyTorch cells against the equations written out in numpy, and fused against unrolled."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rnngen.model.config import ModelConfig  # noqa: E402
from rnngen.errors import InvalidParameterError  # noqa: E402
from rnngen.training.model import RNNLanguageModel, gru_cell, lstm_cell, rnn_cell  # noqa: E402


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture
def small():
    gen = np.random.default_rng(3)
    B, I, H = 2, 3, 4

    def w(*shape):
        return gen.standard_normal(shape)

    return gen, B, I, H, w


def T(a):
    return torch.tensor(a, dtype=torch.float64)


def test_rnn_cell_is_tanh_of_affine(small):
    gen, B, I, H, w = small
    x, h, Wxh, Whh, bx, bh = w(B, I), w(B, H), w(H, I), w(H, H), w(H), w(H)
    expected = np.tanh(x @ Wxh.T + bx + h @ Whh.T + bh)
    got = rnn_cell(T(x), T(h), T(Wxh), T(Whh), T(bx), T(bh)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_lstm_cell_matches_gate_equations(small):
    gen, B, I, H, w = small
    x, h, c = w(B, I), w(B, H), w(B, H)
    Wi, Wh, bi, bh = w(4 * H, I), w(4 * H, H), w(4 * H), w(4 * H)
    blk = lambda M, k: M[k * H:(k + 1) * H]  # noqa: E731  gate k of i, f, g, o
    pre = [x @ blk(Wi, k).T + blk(bi, k) + h @ blk(Wh, k).T + blk(bh, k) for k in range(4)]
    i, f, g, o = sigmoid(pre[0]), sigmoid(pre[1]), np.tanh(pre[2]), sigmoid(pre[3])
    c_new = f * c + i * g
    h_new = o * np.tanh(c_new)
    got_h, got_c = lstm_cell(T(x), T(h), T(c), T(Wi), T(Wh), T(bi), T(bh))
    np.testing.assert_allclose(got_c.numpy(), c_new, rtol=1e-12)
    np.testing.assert_allclose(got_h.numpy(), h_new, rtol=1e-12)


def test_gru_cell_matches_gate_equations(small):
    gen, B, I, H, w = small
    x, h = w(B, I), w(B, H)
    Wi, Wh, bi, bh = w(3 * H, I), w(3 * H, H), w(3 * H), w(3 * H)
    blk = lambda M, k: M[k * H:(k + 1) * H]  # noqa: E731  gate k of r, z, n
    r = sigmoid(x @ blk(Wi, 0).T + blk(bi, 0) + h @ blk(Wh, 0).T + blk(bh, 0))
    z = sigmoid(x @ blk(Wi, 1).T + blk(bi, 1) + h @ blk(Wh, 1).T + blk(bh, 1))
    n = np.tanh(x @ blk(Wi, 2).T + blk(bi, 2) + r * (h @ blk(Wh, 2).T + blk(bh, 2)))
    expected = (1 - z) * n + z * h
    got = gru_cell(T(x), T(h), T(Wi), T(Wh), T(bi), T(bh)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_fused_module_computes_the_written_out_cells(cell):
    torch.manual_seed(0)
    model = RNNLanguageModel(ModelConfig(cell=cell, vocab_size=11, hidden_size=8, num_layers=3, embedding_size=5)).eval()
    tokens = torch.randint(0, 11, (3, 9))
    state = tuple(torch.randn(3, 3, 8) * 0.5 for _ in model.config.state_names)
    with torch.no_grad():
        fused_logits, fused_state = model(tokens, state, fused=True)
        cell_logits, cell_state = model(tokens, state, fused=False)
    torch.testing.assert_close(fused_logits, cell_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_state, cell_state):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_weight_tying_only_where_sizes_allow():
    tied = RNNLanguageModel(ModelConfig(vocab_size=7, hidden_size=6))
    assert tied.decoder.weight is tied.embedding.weight
    assert "decoder.weight" not in dict(tied.named_parameters())
    untied = RNNLanguageModel(ModelConfig(vocab_size=7, hidden_size=6, embedding_size=4))
    assert untied.decoder.weight is not untied.embedding.weight
    assert not untied.config.tied


def test_dropout_is_active_only_in_training():
    model = RNNLanguageModel(ModelConfig(vocab_size=7, hidden_size=6, num_layers=2, dropout=0.5))
    tokens = torch.randint(0, 7, (2, 5))
    state = model.initial_state(2)
    model.train()
    a, _ = model(tokens, state)
    b, _ = model(tokens, state)
    assert not torch.equal(a, b)
    model.eval()
    c, _ = model(tokens, state)
    d, _ = model(tokens, state)
    assert torch.equal(c, d)


@pytest.mark.parametrize("field,value,needle", [
    ("cell", "transformer", "cell: 'transformer' is not one of rnn, lstm, gru"),
    ("hidden_size", 0, "hidden_size: 0 is outside [1, 65536]"),
    ("num_layers", 2.5, "num_layers: 2.5 is not an integer in [1, 64]"),
    ("dropout", 1.0, "dropout: 1.0 is outside [0, 1)"),
])
def test_config_rejects_bad_sizes(field, value, needle):
    with pytest.raises(InvalidParameterError) as err:
        ModelConfig(**{field: value})
    assert needle in str(err.value)
