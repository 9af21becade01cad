"""The inference core: an rnngen model on onnxruntime, stepped with explicit state.

No torch here. `RnnModel.run(tokens, state)` is the whole interface: a prompt
goes through the Loop graph in one call (time = prompt length), then decoding
calls it with time = 1, carrying the state it returned.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from rnngen.errors import DeviceError, InvalidParameterError, ModelFormatError
from rnngen.modelfile import ModelFile, read_model_file
from rnngen.onnx_graph import LOGITS, TOKENS, state_output_name
from rnngen.step_graph import (
    LOG_Z, NEXT_TOKEN, SAMPLE_GREEDY, SAMPLE_INV_TEMPERATURE, SAMPLE_UNIFORM, add_sampling_head, derive_step_model,
)

DEVICES = ("auto", "cpu", "cuda")
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
# CUDA runtime and cuDNN libraries the onnxruntime-gpu CUDA provider loads (CUDA 13 or 12 builds).
_CUDART = ("libcudart.so.13", "libcudart.so.12")
_CUDNN = ("libcudnn.so.9",)


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _load_any(names: tuple[str, ...]):
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def cuda_unusable_reason() -> str | None:
    """Why CUDA cannot be used here, or None when it can.

    Checked before onnxruntime is asked for CUDA, because a failed request makes
    it log loud errors: the provider must be built in, the CUDA runtime and cuDNN
    libraries must load, and at least one GPU must be visible.
    """
    import onnxruntime as ort

    if CUDA_PROVIDER not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA execution provider (install onnxruntime-gpu)"
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None and _load_any(_CUDART) is None:
        try:  # onnxruntime-gpu can load CUDA/cuDNN from the NVIDIA pip wheels
            preload()
        except Exception:
            pass
    cudart = _load_any(_CUDART)
    if cudart is None:
        return f"the CUDA runtime library ({' or '.join(_CUDART)}) cannot be loaded"
    if _load_any(_CUDNN) is None:
        return f"the cuDNN library ({' or '.join(_CUDNN)}) cannot be loaded"
    count = ctypes.c_int(0)
    try:
        status = cudart.cudaGetDeviceCount(ctypes.byref(count))
    except AttributeError:
        return "the CUDA runtime library has no cudaGetDeviceCount"
    if status != 0 or count.value < 1:
        return f"no CUDA GPU is visible (cudaGetDeviceCount returned {status}, {count.value} devices)"
    return None


def select_providers(device: str) -> list[str]:
    """Execution providers for --device auto|cpu|cuda; 'cuda' fails clearly where CUDA is unusable."""
    if device not in DEVICES:
        raise InvalidParameterError(f"device: {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cpu":
        return [CPU_PROVIDER]
    reason = cuda_unusable_reason()
    if reason is None:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if device == "cuda":
        raise DeviceError(f"--device cuda: CUDA cannot be used: {reason}; use --device cpu or auto")
    return [CPU_PROVIDER]


@dataclass
class SessionOptions:
    intra_op_threads: int = 0  # 0 lets onnxruntime choose (one per core)


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
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only: no warnings noise on the user's terminal
        if options and options.intra_op_threads:
            so.intra_op_num_threads = options.intra_op_threads
        # rnngen's own graph with the file's weights (external ones read in by rnngen): onnxruntime
        # never sees the file's graph nor opens a path.
        try:
            self.session = ort.InferenceSession(model_file.model_bytes, sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelFormatError(f"{model_file.path}: onnxruntime cannot load the graph: {exc}") from None
        self.providers = self.session.get_providers()
        # Decoding steps go through the loop-free step graph derived from the same graph, with
        # temperature sampling of the next token added inside it (rows that need more use the logits).
        step_proto = add_sampling_head(derive_step_model(_full_proto(model_file)), self.config.vocab_size)
        self.step_session = ort.InferenceSession(step_proto.SerializeToString(), sess_options=so, providers=self.providers)
        if device == "cuda" and CUDA_PROVIDER not in self.providers:
            raise DeviceError("--device cuda: onnxruntime did not enable the CUDA provider for this model")

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", options: SessionOptions | None = None) -> "RnnModel":
        """Load a model file; `path` may also be a model name or SCHEME:... of a model source (rnngen.plugins)."""
        from rnngen.plugins import resolve_model

        return cls(read_model_file(resolve_model(path)), device, options)

    @property
    def device(self) -> str:
        return "cuda" if self.providers and self.providers[0] == CUDA_PROVIDER else "cpu"

    def initial_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        return {s: np.zeros(shape, dtype=np.float32) for s in self.state_names}

    def run(self, tokens: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """logits (B, T, V) and the state after the last of T tokens, from tokens (B, T)."""
        feeds = {TOKENS: tokens}
        feeds.update(state)
        logits, *new_state = self.session.run(self._outputs, feeds)
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


def _full_proto(model_file: ModelFile):
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
