"""Device-resident decoding slots, stepped through captured CUDA graphs.

`SlotStepper` keeps the recurrent state of up to `capacity` rows (slots) on the
device and steps them with the sampling step graph:

- Buckets: the rows stepped are the first `bucket` slots, `bucket` the smallest
  power of two (or the capacity) that covers every used slot. Slots between are
  padding rows: stepped like the others, never reported. Per bucket, every
  input and output of the step graph is an OrtValue at a fixed address, bound
  once in two IOBindings, one per direction of the state ping-pong (each step
  reads one state buffer and writes the other).
- CUDA graphs: on CUDA the step session has `enable_cuda_graph` on and each
  (bucket, parity) pair is its own captured graph, selected by the run option
  `gpu_graph_id`. Graph ids, buckets and padding rows stay inside this class.
  On the CPU the same code runs without capture (how it is tested).
- Per step only the tokens (B int64) and each row's uniform draw go in, written
  into the bound buffers in place; the drawn tokens come back, and the logits
  and log-z when read (`read_logits`, `read_log_z`: the engine reads them every
  step, for the drawn tokens' log-probabilities).
- Rows join by writing their state into free slots, leave by freeing their
  slots, and move (beam reorder, compaction) by a device-side gather; these run
  through a second, small session (a Scatter and a Gather graph) that writes
  the spare state buffer, so the captured graphs' addresses never change.

Sampling inside the graph is the step graph's head (temperature only; greedy
where a row's temperature is 0): the uniforms come from each row's own random
generator on the host, so a row draws the same tokens here as through
`RnnModel.step_sample`, alone or in any batch.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from rnngen.errors import InvalidParameterError, OverloadedError
from rnngen.model.devices import CUDA_PROVIDER, ort_session_options
from rnngen.model.loop_graph import IR_VERSION, LOGITS, OPSET, TOKENS, state_output_name
from rnngen.model.runtime import RnnModel, full_proto, sampled_step_proto
from rnngen.model.step_graph import (LOG_Z, NEXT_TOKEN, SAMPLE_GREEDY, SAMPLE_INV_TEMPERATURE, SAMPLE_UNIFORM,
                                     layer_state_name, layer_state_output_name, layer_states, temperature_inputs)

SLOTS = "slots"  # (n,) int64: slot indices of the slot-operation graphs
ROWS_SUFFIX = "_rows"  # (L, n, H): rows written into slots


def bucket_sizes(capacity: int) -> list[int]:
    """Powers of two below the capacity, then the capacity itself."""
    sizes, size = [], 1
    while size < capacity:
        sizes.append(size)
        size *= 2
    return sizes + [capacity]


def slot_ops_models(state_names: tuple[str, ...], num_layers: int, hidden: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Two tiny graphs over every state tensor (L, B, H):
    gather:  s_out = s[:, slots]                      (B_out = len(slots))
    scatter: s_out = s with s_out[:, slots] = s_rows  (B unchanged)
    """
    f32 = TensorProto.FLOAT

    def state(name: str, batch: str):
        return helper.make_tensor_value_info(name, f32, [num_layers, batch, hidden])

    slots = helper.make_tensor_value_info(SLOTS, TensorProto.INT64, ["n"])
    gather_nodes = [helper.make_node("Gather", [s, SLOTS], [state_output_name(s)], axis=1) for s in state_names]
    gather = helper.make_graph(gather_nodes, "slot_gather", [state(s, "batch") for s in state_names] + [slots],
                               [state(state_output_name(s), "n") for s in state_names])
    # ScatterElements wants an index per element: the slot number broadcast over layers and units.
    scatter_nodes = [helper.make_node("Reshape", [SLOTS, "index_shape"], ["slot_index"]),
                     helper.make_node("Shape", [state_names[0] + ROWS_SUFFIX], ["rows_shape"])]
    scatter_nodes.append(helper.make_node("Expand", ["slot_index", "rows_shape"], ["element_index"]))
    scatter_nodes += [helper.make_node("ScatterElements", [s, "element_index", s + ROWS_SUFFIX], [state_output_name(s)], axis=1)
                      for s in state_names]
    scatter = helper.make_graph(
        scatter_nodes, "slot_scatter",
        [state(s, "batch") for s in state_names] + [slots] + [state(s + ROWS_SUFFIX, "n") for s in state_names],
        [state(state_output_name(s), "batch") for s in state_names],
        [helper.make_tensor("index_shape", TensorProto.INT64, [3], [1, -1, 1])])
    models = []
    for graph in (gather, scatter):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="rnngen")
        model.ir_version = IR_VERSION
        models.append(model)
    return models[0], models[1]


class _Bucket:
    """The bound buffers of one bucket: every step-graph input and output at a fixed address."""

    def __init__(self, stepper: "SlotStepper", size: int, index: int):
        import onnxruntime as ort

        self.size = size
        new = stepper._device_value
        cfg = stepper.model.config
        state_shape = (cfg.num_layers, size, cfg.hidden_size)
        self.tokens = new((size,), np.int64)
        self.uniform = new((size, 1), np.float32)
        self.inv_temperature = new((size, 1), np.float32)
        self.greedy = new((size,), np.bool_)
        self.logits = new((size, cfg.vocab_size), np.float32)
        self.next_token = new((size,), np.int64)
        self.log_z = new((size,), np.float32)
        self.state = [{s: new(state_shape, np.float32) for s in stepper.model.state_names} for _ in range(2)]
        self.bindings, self.run_options = [], []
        for parity in (0, 1):
            binding = stepper.step_session.io_binding()
            for name, value in ((TOKENS, self.tokens), (SAMPLE_UNIFORM, self.uniform),
                                (SAMPLE_INV_TEMPERATURE, self.inv_temperature), (SAMPLE_GREEDY, self.greedy)):
                binding.bind_ortvalue_input(name, value)
            for name, value in ((LOGITS, self.logits), (NEXT_TOKEN, self.next_token), (LOG_Z, self.log_z)):
                binding.bind_ortvalue_output(name, value)
            for s, k in layer_states(cfg):  # each layer's state: its slice (size, H) of the (L, size, H) buffer
                binding.bind_input(layer_state_name(s, k), stepper.device_type, 0, np.float32, [size, cfg.hidden_size],
                                   self._layer_address(self.state[parity][s], k))
                binding.bind_output(layer_state_output_name(s, k), stepper.device_type, 0, np.float32,
                                    [size, cfg.hidden_size], self._layer_address(self.state[1 - parity][s], k))
            self.bindings.append(binding)
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(2 * index + parity))  # one captured graph each
            self.run_options.append(options)
        # Host staging arrays: update_inplace copies a whole buffer, padding rows included.
        self.tokens_host = np.zeros(size, np.int64)
        self.uniform_host = np.zeros((size, 1), np.float32)

    @staticmethod
    def _layer_address(value, layer: int) -> int:
        """Where layer `layer` of a contiguous (L, B, H) float32 buffer starts."""
        _, batch, hidden = value.shape()
        return value.data_ptr() + layer * batch * hidden * np.dtype(np.float32).itemsize


class SlotStepper:
    """Up to `capacity` rows of decoding state on the device, stepped with fixed bindings.

    The interface the decoding engine adopts: `allocate` / `write_rows` (join), `free` (leave),
    `gather` (reorder, copy, compact), `step` (one token for every row), `read_rows` (a row's
    state back on the host), `read_logits` (only when a row needs them). Arrays passed to and
    returned by `step` are indexed by slot and have `rows` entries (slots past the highest used
    one are not stepped; unused slots below it are padding whose values are ignored).
    `cuda_graphs=False` keeps the same bindings on CUDA without capture (to measure what it buys).
    """

    def __init__(self, model: RnnModel, capacity: int, cuda_graphs: bool = True):
        if capacity < 1:
            raise InvalidParameterError(f"capacity: {capacity} is not a positive number of slots")
        self.model = model
        self.capacity = capacity
        self.device_type = "cuda" if model.device == "cuda" else "cpu"  # device 0, as the model's sessions
        self.step_session, self.captures = self._step_session(cuda_graphs)
        gather, scatter = slot_ops_models(model.state_names, model.config.num_layers, model.config.hidden_size)
        self._gather_session = self._plain_session(gather)
        self._scatter_session = self._plain_session(scatter)
        self._sizes = bucket_sizes(capacity)
        self._buckets: dict[int, _Bucket] = {}
        self._bucket: _Bucket | None = None
        self._parity = 0
        self._used = np.zeros(capacity, dtype=bool)
        self._rows = 0  # one past the highest used slot
        # Each slot's sampling parameters (padding: greedy), written to the device when changed.
        self._inv_temperature = np.ones((capacity, 1), np.float32)
        self._greedy = np.ones(capacity, dtype=bool)
        self._sampling_dirty = True

    # -- sessions and buffers ------------------------------------------------------------------

    def _step_session(self, cuda_graphs: bool):
        """On CUDA a session of its own with CUDA graphs on (it holds no Loop); on the CPU the model's."""
        import onnxruntime as ort

        if self.device_type != "cuda":
            return self.model.step_session, False
        options = {"enable_cuda_graph": "1" if cuda_graphs else "0"}
        proto = sampled_step_proto(full_proto(self.model.file), self.model.config)
        session = ort.InferenceSession(proto.SerializeToString(), sess_options=ort_session_options(),
                                       providers=[(CUDA_PROVIDER, options)])
        return session, session.get_provider_options().get(CUDA_PROVIDER, {}).get("enable_cuda_graph") == "1"

    def _plain_session(self, proto: onnx.ModelProto):
        import onnxruntime as ort

        return ort.InferenceSession(proto.SerializeToString(), sess_options=ort_session_options(),
                                    providers=self.model.providers)

    def _device_value(self, shape: tuple[int, ...], dtype):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device_type, 0)

    def _bucket_for(self, rows: int) -> _Bucket:
        index = next(i for i, size in enumerate(self._sizes) if size >= max(rows, 1))
        if index not in self._buckets:
            self._buckets[index] = _Bucket(self, self._sizes[index], index)
        return self._buckets[index]

    # -- slots ---------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Slots stepped and reported: one past the highest used slot."""
        return self._rows

    def _set_used(self, slots, used: bool) -> None:
        self._used[slots] = used
        occupied = np.flatnonzero(self._used)
        self._rows = int(occupied[-1]) + 1 if len(occupied) else 0

    @property
    def bucket_size(self) -> int:
        """Rows the device computes per step (the rows plus padding); 0 before any row joined."""
        return self._bucket.size if self._bucket else 0

    def allocate(self, count: int) -> np.ndarray:
        """The `count` lowest free slots (not yet used: `write_rows` fills them)."""
        free = np.flatnonzero(~self._used)[:count]
        if len(free) < count:
            raise OverloadedError(f"no room for {count} more rows: {len(free)} of {self.capacity} slots are free")
        return free

    def _check_slots(self, slots) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if len(slots) and (slots.min() < 0 or slots.max() >= self.capacity):
            raise InvalidParameterError(f"slots: {slots.tolist()} reach outside 0..{self.capacity - 1}")
        if len(np.unique(slots)) != len(slots):
            raise InvalidParameterError(f"slots: {slots.tolist()} name a slot twice")
        return slots

    def _state_values(self) -> dict:
        return self._bucket.state[self._parity]

    def _move(self, order: np.ndarray, target: _Bucket) -> None:
        """Target bucket's rows i := current rows order[i] (padding beyond len(order)), on the device."""
        idx = np.zeros(target.size, np.int64)
        idx[: len(order)] = order
        parity = 1 - self._parity if target is self._bucket else 0
        if self._bucket is not None:
            binding = self._gather_session.io_binding()
            for s, value in self._state_values().items():
                binding.bind_ortvalue_input(s, value)
                binding.bind_ortvalue_output(state_output_name(s), target.state[parity][s])
            binding.bind_cpu_input(SLOTS, idx)
            self._gather_session.run_with_iobinding(binding)
        self._bucket, self._parity = target, parity

    def _fit_bucket(self) -> None:
        """Step the smallest bucket that covers every used slot (slots keep their numbers)."""
        target = self._bucket_for(self.rows)
        if target is not self._bucket:
            keep = min(target.size, self._bucket.size if self._bucket else 0)
            self._move(np.arange(keep), target)

    def write_rows(self, slots, state: dict[str, np.ndarray],
                   temperature: np.ndarray | None = None) -> None:
        """Rows join: state (L, n, H) per state name goes into `slots` (n), with each row's
        sampling temperature (0 = greedy; default greedy)."""
        slots = self._check_slots(slots)
        if not len(slots):
            return
        self._set_used(slots, True)
        self._fit_bucket()
        binding = self._scatter_session.io_binding()
        for s, value in self._state_values().items():
            binding.bind_ortvalue_input(s, value)
            binding.bind_cpu_input(s + ROWS_SUFFIX, np.ascontiguousarray(state[s], dtype=np.float32))
            binding.bind_ortvalue_output(state_output_name(s), self._bucket.state[1 - self._parity][s])
        binding.bind_cpu_input(SLOTS, slots)
        self._scatter_session.run_with_iobinding(binding)
        self._parity = 1 - self._parity
        self.set_temperature(slots, np.zeros(len(slots), np.float32) if temperature is None else temperature)

    def set_temperature(self, slots, temperature) -> None:
        """Sampling temperature per slot (0 = greedy), kept until changed."""
        slots = self._check_slots(slots)
        self._greedy[slots], self._inv_temperature[slots, 0] = temperature_inputs(temperature)
        self._sampling_dirty = True

    def free(self, slots) -> None:
        """Rows leave: their slots become padding and may be handed out again."""
        slots = self._check_slots(slots)
        self._set_used(slots, False)
        self._greedy[slots], self._inv_temperature[slots] = True, 1.0
        self._sampling_dirty = True
        if self._bucket is not None and self.rows:
            self._fit_bucket()

    def gather(self, order) -> None:
        """Slot i takes the row of slot order[i] (copies, drops and reorders in one device gather);
        slots from len(order) on are free afterwards."""
        order = np.asarray(order, dtype=np.int64).reshape(-1)
        if len(order) and (order.min() < 0 or order.max() >= self.rows or not self._used[order].all()):
            raise InvalidParameterError(f"gather: {order.tolist()} names a slot that holds no row")
        if len(order) > self.capacity:
            raise OverloadedError(f"gather: {len(order)} rows do not fit in {self.capacity} slots")
        greedy, inv = self._greedy[order].copy(), self._inv_temperature[order].copy()
        self._set_used(slice(None), False)
        self._set_used(slice(0, len(order)), True)
        self._greedy[:] = True
        self._inv_temperature[:] = 1.0
        self._greedy[: len(order)], self._inv_temperature[: len(order)] = greedy, inv
        self._sampling_dirty = True
        if self._bucket is not None and len(order):
            self._move(order, self._bucket_for(len(order)))

    def read_rows(self, slots) -> dict[str, np.ndarray]:
        """The state (L, n, H) of `slots` on the host (to save a session, or for a host-side change)."""
        slots = self._check_slots(slots)
        binding = self._gather_session.io_binding()
        for s, value in self._state_values().items():
            binding.bind_ortvalue_input(s, value)
            binding.bind_output(state_output_name(s), "cpu")
        binding.bind_cpu_input(SLOTS, slots)
        self._gather_session.run_with_iobinding(binding)
        return dict(zip(self.model.state_names, binding.copy_outputs_to_cpu()))

    # -- stepping ------------------------------------------------------------------------------

    def step(self, tokens: np.ndarray, uniforms: np.ndarray | None = None) -> np.ndarray:
        """One token for every row: feeds tokens (rows,), draws with uniforms (rows,) in [0, 1)
        (None: greedy rows only, the last draws stay), returns the drawn tokens (rows,)."""
        rows, bucket = self.rows, self._bucket
        if not rows:
            raise InvalidParameterError("step: no rows; write_rows first")
        if len(tokens) != rows or (uniforms is not None and len(uniforms) != rows):
            raise InvalidParameterError(f"step: tokens and uniforms must have {rows} entries, one per slot up to the last used")
        bucket.tokens_host[:rows] = np.where(self._used[:rows], tokens, 0)  # padding: any valid id
        bucket.tokens.update_inplace(bucket.tokens_host)
        if uniforms is not None:
            bucket.uniform_host[:rows, 0] = uniforms
            bucket.uniform.update_inplace(bucket.uniform_host)
        if self._sampling_dirty:
            bucket.inv_temperature.update_inplace(self._inv_temperature[: bucket.size])
            bucket.greedy.update_inplace(self._greedy[: bucket.size])
            self._sampling_dirty = False
        self.step_session.run_with_iobinding(bucket.bindings[self._parity], bucket.run_options[self._parity])
        self._parity = 1 - self._parity
        return bucket.next_token.numpy()[:rows].copy()  # on the CPU numpy() is a view of the buffer

    def read_logits(self) -> np.ndarray:
        """The last step's logits (rows, V) on the host, valid until the next step (numpy() copies a
        CUDA buffer to the host and views a CPU one)."""
        return self._bucket.logits.numpy()[: self.rows]

    def read_log_z(self) -> np.ndarray:
        """The last step's log softmax denominators (rows,) (for log-probabilities of drawn tokens)."""
        return self._bucket.log_z.numpy()[: self.rows]
