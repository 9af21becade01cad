"""Recurrent language models in PyTorch: the cells as equations, and the model.

The cells below are the textbook equations, one time step each, with weights in
PyTorch's layout (gate blocks stacked in W_ih / W_hh). Training runs the fused
nn.RNN/nn.LSTM/nn.GRU, which hold the same parameters and compute the same
function; `forward(..., fused=False)` runs the written-out cells instead, and
tests hold the two (and the exported ONNX graph) to each other.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rnngen.model.config import ModelConfig

Tensor = torch.Tensor


def rnn_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """Elman RNN: h_t = tanh(W_xh x_t + b_xh + W_hh h_{t-1} + b_hh)."""
    return torch.tanh(x @ w_ih.T + b_ih + h @ w_hh.T + b_hh)  # (B, H)


def lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh) -> tuple[Tensor, Tensor]:
    """LSTM (Hochreiter & Schmidhuber; with forget gate, Gers et al.).

    i = σ(W_ii x + b_ii + W_hi h + b_hi)    input gate
    f = σ(W_if x + b_if + W_hf h + b_hf)    forget gate
    g = tanh(W_ig x + b_ig + W_hg h + b_hg) candidate cell
    o = σ(W_io x + b_io + W_ho h + b_ho)    output gate
    c_t = f ⊙ c_{t-1} + i ⊙ g ;  h_t = o ⊙ tanh(c_t)
    """
    gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=1)  # (B, H) each
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_t = f * c + i * g
    h_t = o * torch.tanh(c_t)
    return h_t, c_t


def gru_cell(x, h, w_ih, w_hh, b_ih, b_hh) -> Tensor:
    """GRU (Cho et al. 2014), PyTorch's variant (r applied after the W_hn product).

    r = σ(W_ir x + b_ir + W_hr h + b_hr)          reset gate
    z = σ(W_iz x + b_iz + W_hz h + b_hz)          update gate
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)) candidate
    h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}
    """
    xr, xz, xn = (x @ w_ih.T + b_ih).chunk(3, dim=1)  # (B, H) each
    hr, hz, hn = (h @ w_hh.T + b_hh).chunk(3, dim=1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


_FUSED = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class RNNLanguageModel(nn.Module):
    """Embedding → stacked recurrent layers → linear decoder over the vocabulary."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        h, e, v = config.hidden_size, config.input_size, config.vocab_size
        self.embedding = nn.Embedding(v, e)
        between = config.dropout if config.num_layers > 1 else 0.0
        kwargs = {"nonlinearity": "tanh"} if config.cell == "rnn" else {}
        self.rnn = _FUSED[config.cell](e, h, num_layers=config.num_layers, dropout=between, **kwargs)
        self.drop = nn.Dropout(config.dropout)
        self.decoder = nn.Linear(h, v)
        if config.tied:
            self.decoder.weight = self.embedding.weight  # (V, H) shared with the (V, E) embedding
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not self.config.tied:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        if self.config.cell == "lstm":  # forget gates start open, so early gradients flow through time
            h = self.config.hidden_size
            for k in range(self.config.num_layers):
                getattr(self.rnn, f"bias_ih_l{k}").data[h : 2 * h].fill_(1.0)

    def initial_state(self, batch: int, device=None) -> tuple[Tensor, ...]:
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        return tuple(torch.zeros(shape, device=device) for _ in self.config.state_names)

    def forward(self, tokens: Tensor, state: tuple[Tensor, ...], fused: bool = True):
        """tokens (B, T) → logits (B, T, V) and the state after the last step, each (L, B, H).

        Inside, time comes first: the recurrent kernels' own layout (batch-first costs them a
        copy of every layer's input and output, and of their gradients). The logits are a
        (B, T, V) view of time-major (T, B, V) memory; `logits.transpose(0, 1)` is contiguous.
        """
        x = self.drop(self.embedding(tokens.t()))  # (T, B, E)
        if fused:
            out, new = self.rnn(x, state if self.config.cell == "lstm" else state[0])  # (T, B, H)
            new_state = tuple(new) if isinstance(new, tuple) else (new,)
        else:
            out, new_state = self._forward_cells(x, state)
        return self.decoder(self.drop(out)).transpose(0, 1), new_state  # (B, T, V)

    def _forward_cells(self, x: Tensor, state: tuple[Tensor, ...]):
        """The same function as the fused module, written with the cells above, layer by layer."""
        cell = self.config.cell
        finals: list[list[Tensor]] = [[] for _ in state]
        for k in range(self.config.num_layers):
            w = [getattr(self.rnn, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            h = state[0][k]  # (B, H)
            c = state[1][k] if cell == "lstm" else None
            outs = []
            for t in range(x.shape[0]):  # x: (T, B, E)
                if cell == "lstm":
                    h, c = lstm_cell(x[t], h, c, *w)
                elif cell == "gru":
                    h = gru_cell(x[t], h, *w)
                else:
                    h = rnn_cell(x[t], h, *w)
                outs.append(h)
            finals[0].append(h)
            if cell == "lstm":
                finals[1].append(c)
            x = torch.stack(outs)  # (T, B, H)
            if k < self.config.num_layers - 1:
                x = F.dropout(x, self.rnn.dropout, self.training)
        return x, tuple(torch.stack(f) for f in finals)

    def load_weights(self, state: dict[str, Tensor]) -> None:
        """Load parameters saved by name (a tied decoder weight is stored once, as the embedding)."""
        expected = {name for name, _ in self.named_parameters()}
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"weights do not fit the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        for name, param in self.named_parameters():
            if tuple(state[name].shape) != tuple(param.shape):
                raise ValueError(f"weight {name} has shape {tuple(state[name].shape)}, the model needs {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(state[name])

    def numpy_weights(self) -> dict:
        """Weights as float32 numpy arrays under PyTorch's names (the exporter's input)."""
        return {name: p.detach().cpu().float().numpy() for name, p in self.named_parameters()}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
