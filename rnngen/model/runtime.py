"""An rnngen model on onnxruntime, run with explicit state (no torch here).

`RnnModel` holds sessions made from one file: the Loop graph, which takes a
whole prompt in one call (`run`, `prefill`), and the loop-free step graph derived
from it with a sampling head (`step`, `step_sample`), which decoding calls once
per token. Where the runtime has a fused kernel that beats the Loop (see
FUSED_RUN_CELLS), `run` goes through a graph of standard ONNX LSTM/GRU/RNN ops
derived from the same weights instead (rnngen.model.fused_graph); the Loop graph
stays the file's canonical graph. `BoundStepper` runs the step graph with the
state kept on the device.
"""

from __future__ import annotations

import os

import numpy as np

from rnngen.errors import DeviceError, InvalidParameterError, ModelFormatError
from rnngen.model.devices import CUDA_PROVIDER, SessionOptions, ort_session_options, select_providers
from rnngen.model.file import ModelFile, read_model_file
from rnngen.model.fused_graph import agrees_with, derive_fused_model
from rnngen.model.tokenizers import TokenizerKinds
from rnngen.model.loop_graph import LOGITS, TOKENS, state_output_name
from rnngen.model.prefill_graph import PREFILL_CHUNK, derive_last_logits_model
from rnngen.model.step_graph import LOG_Z, NEXT_TOKEN, SAMPLE_GREEDY, SAMPLE_INV_TEMPERATURE, SAMPLE_UNIFORM, add_sampling_head, derive_step_model

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
        self._sample_outputs = [*self._outputs, NEXT_TOKEN, LOG_Z]
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
        # Decoding steps go through the loop-free step graph derived from the same file, with
        # temperature sampling of the next token added inside it (rows that need more use the logits).
        step_proto = sampled_step_proto(proto, self.config.vocab_size)
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
        feeds = {TOKENS: tokens.reshape(-1, 1)}
        feeds.update(sampling_feeds(len(tokens)))
        feeds.update(state)
        logits, *new_state = self.step_session.run(self._outputs, feeds)
        return logits[:, 0], dict(zip(self.state_names, new_state))

    def step_sample(self, tokens: np.ndarray, state: dict[str, np.ndarray], sampling: dict[str, np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """A step that also samples each row's next token in the graph (temperature only).

        `sampling` comes from `sampling_feeds`. Returns logits (B, V), next tokens (B,), log_z (B,)
        (log of each row's softmax denominator) and the state.
        """
        feeds = {TOKENS: tokens.reshape(-1, 1)}
        feeds.update(sampling)
        feeds.update(state)
        logits, *rest = self.step_session.run(self._sample_outputs, feeds)
        new_state = rest[: len(self.state_names)]
        next_tokens, log_z = rest[len(self.state_names) :]
        return logits[:, 0], next_tokens, log_z, dict(zip(self.state_names, new_state))


def sampling_feeds(batch: int, temperature: np.ndarray | None = None, uniform: np.ndarray | None = None
                   ) -> dict[str, np.ndarray]:
    """Inputs of the step graph's sampling head; without temperatures every row is greedy."""
    if temperature is None:
        temperature = np.zeros(batch, dtype=np.float32)
    greedy = temperature == 0.0
    inv = np.where(greedy, 1.0, 1.0 / np.where(greedy, 1.0, temperature)).astype(np.float32).reshape(-1, 1)
    if uniform is None:
        uniform = np.zeros(batch, dtype=np.float32)
    return {SAMPLE_INV_TEMPERATURE: inv, SAMPLE_GREEDY: greedy, SAMPLE_UNIFORM: uniform.reshape(-1, 1)}


def sampled_step_proto(proto, vocab_size: int):
    """The loop-free step graph with its sampling head, derived from the model's ModelProto."""
    return add_sampling_head(derive_step_model(proto), vocab_size)


def full_proto(model_file: ModelFile):
    """The canonical ModelProto that the model runs (weights inline), from which derived graphs are built."""
    import onnx

    return onnx.ModelProto.FromString(model_file.model_bytes)


class BoundStepper:
    """Decoding steps with the state resident on the device, through onnxruntime's IOBinding.

    The state lives in two preallocated device buffers per state name, used in
    turn (ping-pong): each step reads one and writes the other, so nothing but
    the tokens (in) and the logits (out, for sampling on the host) crosses to
    the host. On CUDA that is the main lever; on CPU the same code runs with
    CPU buffers, which is how its logic is tested.
    """

    def __init__(self, model: RnnModel, device_type: str | None = None, device_id: int = 0):
        self.model = model
        self.device_type = device_type or ("cuda" if model.device == "cuda" else "cpu")
        self.device_id = device_id
        self.session = model.step_session
        self.batch = 0
        self._current: dict[str, object] = {}
        self._spare: dict[str, object] = {}

    def _buffer(self, batch: int):
        import onnxruntime as ort

        shape = (self.model.config.num_layers, batch, self.model.config.hidden_size)
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.device_type, self.device_id)

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Host state → device (once per change of the batch's rows, not per step)."""
        import onnxruntime as ort

        self.batch = next(iter(state.values())).shape[1]
        self._current = {
            name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(state[name]), self.device_type, self.device_id)
            for name in self.model.state_names
        }
        self._spare = {name: self._buffer(self.batch) for name in self.model.state_names}

    def read_state(self) -> dict[str, np.ndarray]:
        """Device state → host (for row changes, or to save a session)."""
        return {name: value.numpy() for name, value in self._current.items()}

    def step(self, tokens: np.ndarray, sampling: dict[str, np.ndarray] | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One step for the bound batch: logits (B, V), next tokens (B,) and log_z (B,) on the host.

        The state stays on the device. (On CUDA, a batch of temperature-only rows could leave the
        logits there too; they come back here because rows with other processors need them.)
        """
        if sampling is None:
            sampling = sampling_feeds(len(tokens))
        binding = self.session.io_binding()
        binding.bind_cpu_input(TOKENS, np.ascontiguousarray(tokens.reshape(-1, 1), dtype=np.int64))
        for name, value in sampling.items():
            binding.bind_cpu_input(name, value)
        for name in (LOGITS, NEXT_TOKEN, LOG_Z):  # bound first: outputs come back in binding order
            binding.bind_output(name, "cpu")
        for name in self.model.state_names:
            binding.bind_ortvalue_input(name, self._current[name])
            binding.bind_ortvalue_output(state_output_name(name), self._spare[name])
        self.session.run_with_iobinding(binding)
        logits, next_tokens, log_z = binding.copy_outputs_to_cpu()[:3]
        self._current, self._spare = self._spare, self._current
        return logits[:, 0], next_tokens, log_z
