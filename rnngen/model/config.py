"""Model configuration, shared by training, export and the runtime (no torch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rnngen.checks import check_choice, check_int, check_number
from rnngen.errors import InvalidParameterError

CELLS = ("rnn", "lstm", "gru")

# The one gate table. Each cell's gates, in the order PyTorch stacks their blocks in a layer's
# weight matrices (lstm: input, forget, cell candidate, output; gru: reset, update, new), named as
# the Loop graph names their activations (`l{layer}_{gate}`). A vanilla RNN has no gate: its
# weights hold one tanh block.
GATES = {"rnn": (), "lstm": ("i", "f", "g", "o"), "gru": ("r", "z", "n")}


@dataclass(frozen=True)
class ModelConfig:
    cell: str = "lstm"  # "rnn" (h_t = tanh(W_hh h_{t-1} + W_xh x_t)), "lstm" or "gru"
    vocab_size: int = 65  # number of symbols; set from the tokenizer
    hidden_size: int = 512  # units per recurrent layer (the state size)
    num_layers: int = 2  # stacked recurrent layers
    embedding_size: int = 0  # input embedding width; 0 means equal to hidden_size
    dropout: float = 0.0  # on embedding, between layers and before the decoder (training only)
    tie_weights: bool = True  # decoder reuses the embedding matrix when the sizes match

    def __post_init__(self) -> None:
        check_choice("cell", self.cell, CELLS)
        check_int("vocab_size", self.vocab_size, 2, 10_000_000)
        check_int("hidden_size", self.hidden_size, 1, 65_536)
        check_int("num_layers", self.num_layers, 1, 64)
        check_int("embedding_size", self.embedding_size, 0, 65_536)
        check_number("dropout", self.dropout, 0.0, 1.0, hi_open=True)

    @property
    def input_size(self) -> int:
        """Width of the embedding that feeds the first layer."""
        return self.embedding_size or self.hidden_size

    @property
    def tied(self) -> bool:
        """Whether the decoder really shares the embedding (only if sizes allow)."""
        return self.tie_weights and self.input_size == self.hidden_size

    @property
    def gates(self) -> int:
        return max(1, len(GATES[self.cell]))  # weight blocks per layer

    @property
    def state_names(self) -> tuple[str, ...]:
        """Recurrent state tensors, each of shape (num_layers, batch, hidden_size)."""
        return ("h", "c") if self.cell == "lstm" else ("h",)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidParameterError(f"model config: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

