"""An rnngen model on onnxruntime, run with explicit state (no torch here).

`RnnModel` holds sessions made from one file: the Loop graph (`run`: T tokens
in one call), a copy of it that returns the last position's logits only
(`prefill`: a prompt in chunks of PREFILL_CHUNK tokens, carrying the state), and
the loop-free decoding step graph made from it, with a sampling head (`step`,
`step_sample`, and `step_bound` on buffers bound once: how decoding steps, once per token). Where the runtime has a
fused kernel that beats the Loop (see FUSED_RUN_CELLS), `run` and `prefill` go
through a graph of standard ONNX LSTM/GRU/RNN ops
derived from the same weights instead (rnngen.model.fused_graph); the Loop graph
stays the file's canonical graph. Decoding many rows at once keeps their state in
slots (rnngen.model.slots; on CUDA rnngen.model.graph_stepper, with CUDA graphs).
"""

from __future__ import annotations

import os

import numpy as np

from rnngen.errors import DeviceError, InvalidParameterError, ModelFormatError
from rnngen.model.config import ModelConfig
from rnngen.model.devices import CUDA_PROVIDER, SessionOptions, ort_session_options, select_providers
from rnngen.model.file import ModelFile, read_model_file
from rnngen.model.fused_graph import agrees_with, derive_fused_model
from rnngen.model.tokenizers import TokenizerKinds
from rnngen.model.loop_graph import LOGITS, TOKENS, state_output_name
from rnngen.model.prefill_graph import PREFILL_CHUNK, derive_last_logits_model
from rnngen.model.step_graph import (LOG_Z, NEXT_TOKEN, SAMPLE_GREEDY, SAMPLE_INV_TEMPERATURE, SAMPLE_UNIFORM, add_sampling_head,
                                     decoding_step_model, layer_state_name, layer_state_output_name, layer_states,
                                     temperature_inputs)

# Cells whose whole-sequence calls (`run`, `prefill`) go through the fused-op graph, per device.
# Measured (benchmarks/decode.py, prefill of 1,000 tokens): on an H100 the CUDA provider's fused
# LSTM (cuDNN) is 9x faster than the Loop graph, whose control runs on the host; on a 2-core CPU the
# shipped models' fused LSTM is 1.2-1.3x and fused GRU 1.4-1.5x faster, the fused RNN 1.1-1.2x slower.
# Single steps keep the plain step graph on every device (the fused op at time 1 gains nothing on the CPU;
# CUDA: benchmarks/decode.py measures it).
FUSED_RUN_CELLS = {"cuda": ("lstm", "gru", "rnn"), "cpu": ("lstm", "gru")}


class RnnModel:
    """A loaded rnngen model: config, tokenizer, metadata and an onnxruntime session."""

    def __init__(self, model_file: ModelFile, device: str = "auto", options: SessionOptions | None = None):
        import onnxruntime as ort

        self.file = model_file
        self.config = model_file.config
        self.tokenizer = model_file.tokenizer
        self.state_names = self.config.state_names
        self._state_outputs = [state_output_name(s) for s in self.state_names]
        self._outputs = [LOGITS, *self._state_outputs]
        # The decoding step graph takes and gives the state layer by layer (step_graph.decoding_step_model).
        self._layer_states = layer_states(self.config)
        self._step_outputs = [LOGITS, NEXT_TOKEN, LOG_Z, *(layer_state_output_name(s, k) for s, k in self._layer_states)]
        providers = select_providers(device)
        so = ort_session_options(options)
        # rnngen's own graph with the file's weights (external ones read in by rnngen): onnxruntime
        # never sees the file's graph nor opens a path.
        try:
            self.session = ort.InferenceSession(model_file.model_bytes, sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelFormatError(f"{model_file.path}: onnxruntime cannot load the graph: {exc}") from None
        self.providers = self.session.get_providers()
        if device == "cuda" and CUDA_PROVIDER not in self.providers:
            raise DeviceError("--device cuda: onnxruntime did not enable the CUDA provider for this model")
        proto = full_proto(model_file)
        # Decoding steps go through the loop-free decoding step graph made from the same file, with
        # temperature sampling of the next token added inside it (rows that need more use the logits).
        step_proto = sampled_step_proto(proto, self.config)
        self.step_session = ort.InferenceSession(step_proto.SerializeToString(), sess_options=so, providers=self.providers)
        self.run_session, run_proto = self.session, proto
        if self.config.cell in FUSED_RUN_CELLS[self.device]:
            fused = self._fused(proto, so)
            if fused is not None:
                run_proto, self.run_session = fused
        # Prompts go through a copy of the run graph that computes the last position's logits only.
        self.prefill_session = ort.InferenceSession(derive_last_logits_model(run_proto).SerializeToString(),
                                                    sess_options=so, providers=self.providers)

    def _fused(self, proto, so):
        """The fused-op graph and its session, or None where the file's graph does not yield one that agrees."""
        import onnxruntime as ort

        try:
            fused = derive_fused_model(proto, self.config)
            session = ort.InferenceSession(fused.SerializeToString(), sess_options=so, providers=self.providers)
        except Exception:  # NotDerivable, or onnxruntime refusing the graph (it raises its own types)
            return None
        return (fused, session) if agrees_with(session, self.session, self.config) else None

    @property
    def uses_fused_run(self) -> bool:
        """Whether `run` and `prefill` go through the fused-op graph (else the Loop graph)."""
        return self.run_session is not self.session

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", options: SessionOptions | None = None,
             tokenizers: TokenizerKinds | None = None) -> "RnnModel":
        """Load a model file. Its tokenizer kind must be a built-in one or in `tokenizers` (the CLI and
        the server pass the plugins' kinds; model names and sources are resolved there too)."""
        return cls(read_model_file(path, tokenizers), device, options)

    @property
    def device(self) -> str:
        return "cuda" if self.providers and self.providers[0] == CUDA_PROVIDER else "cpu"

    def initial_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        return {s: np.zeros(shape, dtype=np.float32) for s in self.state_names}

    def prefill(self, prompt_ids: list[int], chunk: int = PREFILL_CHUNK) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """A prompt from the zero state: next-token logits (1, V) and the state after it.

        In chunks of `chunk` tokens through the run graph (fused where it wins, else the Loop
        graph), carrying the state, with the logits of the last position only: memory does not
        grow with the prompt.
        """
        if not len(prompt_ids):
            raise InvalidParameterError("prompt: no tokens to start from")
        ids = np.asarray(prompt_ids, dtype=np.int64)
        state = self.initial_state(1)
        for start in range(0, len(ids), chunk):
            feeds = {TOKENS: ids[None, start : start + chunk]}
            feeds.update(state)
            logits, *new_state = self.prefill_session.run(self._outputs, feeds)
            state = dict(zip(self.state_names, new_state))
        return logits[:, -1], state

    def run(self, tokens: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """logits (B, T, V) and the state after the last of T tokens, from tokens (B, T)."""
        feeds = {TOKENS: tokens}
        feeds.update(state)
        logits, *new_state = self.run_session.run(self._outputs, feeds)
        return logits, dict(zip(self.state_names, new_state))

    def step(self, tokens: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One decoding step for a batch: tokens (B,) → logits (B, V) and the next state."""
        logits, _, _, new_state = self.step_sample(tokens, state, sampling_feeds(len(tokens)))
        return logits, new_state

    def step_sample(self, tokens: np.ndarray, state: dict[str, np.ndarray], sampling: dict[str, np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """A step that also samples each row's next token in the graph (temperature only).

        `sampling` comes from `sampling_feeds`. Returns logits (B, V), next tokens (B,), log_z (B,)
        (log of each row's softmax denominator) and the state.
        """
        feeds = {TOKENS: np.asarray(tokens, dtype=np.int64).reshape(-1)}
        feeds.update(sampling)
        feeds.update((layer_state_name(s, k), np.ascontiguousarray(state[s][k], dtype=np.float32)) for s, k in self._layer_states)
        logits, next_tokens, log_z, *layers = self.step_session.run(self._step_outputs, feeds)
        per_state = self.config.num_layers
        new_state = {s: np.stack(layers[i * per_state : (i + 1) * per_state]) for i, s in enumerate(self.state_names)}
        return logits, next_tokens, log_z, new_state

    def step_bound(self, binding, run_options=None) -> None:
        """A step of the sampling step graph on inputs and outputs bound in an IOBinding of
        `step_session` (rnngen.model.slots, rnngen.model.graph_stepper): nothing allocated, nothing copied."""
        self.step_session.run_with_iobinding(binding, run_options)


def sampling_feeds(batch: int, temperature: np.ndarray | None = None, uniform: np.ndarray | None = None
                   ) -> dict[str, np.ndarray]:
    """Inputs of the step graph's sampling head; without temperatures every row is greedy."""
    greedy, inv = temperature_inputs(np.zeros(batch, dtype=np.float32) if temperature is None else temperature)
    inv = inv.reshape(-1, 1)
    if uniform is None:
        uniform = np.zeros(batch, dtype=np.float32)
    return {SAMPLE_INV_TEMPERATURE: inv, SAMPLE_GREEDY: greedy, SAMPLE_UNIFORM: uniform.reshape(-1, 1)}


def sampled_step_proto(proto, config: ModelConfig):
    """The graph decoding steps run (step_graph.decoding_step_model, with the sampling head), from
    the model's ModelProto."""
    return add_sampling_head(decoding_step_model(proto, config), config.vocab_size)


def full_proto(model_file: ModelFile):
    """The canonical ModelProto that the model runs (weights inline), from which derived graphs are built."""
    import onnx

    return onnx.ModelProto.FromString(model_file.model_bytes)
