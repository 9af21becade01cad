"""The models in exported/ load, carry their training record, and generate. No torch."""

from pathlib import Path

import pytest

from rnngen.decoding.generation import generate
from rnngen.model.runtime import RnnModel
from rnngen.decoding.params import GenerationParams

EXPORTED = Path(__file__).resolve().parent.parent / "exported"


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_shipped_model_loads_and_generates(name):
    model = RnnModel.load(EXPORTED / f"{name}.onnx", device="cpu")
    assert model.config.cell == name
    assert model.tokenizer.kind == "char" and model.config.vocab_size == 65
    training = model.file.training
    assert training["corpus"] == "tinyshakespeare.txt" and training["val_fraction"] == 0.1
    if name == "lstm":
        assert training["val_loss"] <= 1.60
    result = generate(model, "ROMEO:", GenerationParams(max_new_tokens=300, seed=0, temperature=0.5))
    words = result.text.split()
    assert len(words) > 30
    common = {"the", "and", "to", "of", "I", "my", "you", "is", "that", "a", "in", "not", "me", "with", "be"}
    assert sum(w.strip(",.;:!?").lower() in {c.lower() for c in common} for w in words) >= 5
