"""Prompts in chunks: the same logits and state as one call, in memory that does not grow with the prompt."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from rnngen.model.config import ModelConfig
from rnngen.model.runtime import RnnModel
from rnngen.model.tokenizers import ByteTokenizer

from conftest import write_model


def test_chunked_prefill_equals_one_call(cell, tmp_path):
    config = ModelConfig(cell=cell, vocab_size=256, hidden_size=12, num_layers=2, embedding_size=8)
    rnn = RnnModel.load(write_model(tmp_path / "m.onnx", config, ByteTokenizer(), seed=3), device="cpu")
    ids = np.random.default_rng(0).integers(0, 256, 333).tolist()
    logits, state = rnn.run(np.array([ids]), rnn.initial_state(1))
    for chunk in (1, 50, 333, 4096):  # one token per call, uneven chunks, exactly one chunk, more than the prompt
        got_logits, got_state = rnn.prefill(ids, chunk=chunk)
        assert got_logits.shape == (1, 256)
        np.testing.assert_allclose(got_logits, logits[:, -1], atol=1e-5)
        for name in rnn.state_names:
            np.testing.assert_allclose(got_state[name], state[name], atol=1e-5)


GROWTH = """
import resource, sys
import numpy as np
from rnngen.model.runtime import RnnModel
model = RnnModel.load(sys.argv[1], device="cpu")
ids = np.random.default_rng(0).integers(0, 256, int(sys.argv[2])).tolist()
model.prefill(ids[:100])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model.prefill(ids)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_a_long_prompt_prefills_in_bounded_memory(tmp_path):
    """20,000 tokens through one Loop call with every position's logits would take about 60 MB more
    here (measured); in chunks with the last logits only, the peak grows by a few MB."""
    config = ModelConfig(cell="lstm", vocab_size=256, hidden_size=64, num_layers=1, embedding_size=16)
    path = write_model(tmp_path / "m.onnx", config, ByteTokenizer())
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(GROWTH), str(path), "20000"], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).parent)
    grown_mb = float(out.stdout.strip().splitlines()[-1])
    assert grown_mb < 25, grown_mb
