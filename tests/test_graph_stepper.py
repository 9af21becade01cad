"""The device-resident slot stepper, on the CPU provider (the same code path as CUDA, no capture)."""

import numpy as np
import pytest

from rnngen.errors import InvalidParameterError, OverloadedError
from rnngen.model.config import ModelConfig
from rnngen.model.graph_stepper import SlotStepper, bucket_sizes
from rnngen.model.runtime import RnnModel, sampling_feeds

from conftest import write_model


@pytest.fixture
def model(tmp_path, char_tokenizer, cell) -> RnnModel:
    config = ModelConfig(cell=cell, vocab_size=char_tokenizer.vocab_size, hidden_size=12, num_layers=2)
    return RnnModel.load(write_model(tmp_path / f"{cell}.onnx", config, char_tokenizer, seed=4), device="cpu")


def random_state(model: RnnModel, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(v.shape) * 0.5).astype(np.float32) for k, v in model.initial_state(batch).items()}


def test_steps_like_step_sample(model):
    temperature = np.array([0.0, 0.8, 1.3], np.float32)
    state = random_state(model, 3, seed=1)
    stepper = SlotStepper(model, capacity=8)
    stepper.write_rows(stepper.allocate(3), state, temperature)
    assert stepper.rows == 3 and stepper.bucket_size == 4  # one padding row
    tokens = want = np.array([1, 2, 3])
    rng = np.random.default_rng(2)
    for _ in range(12):
        uniform = rng.random(3).astype(np.float32)
        tokens = stepper.step(tokens, uniform)
        logits, want, _, state = model.step_sample(want, state, sampling_feeds(3, temperature, uniform))
        np.testing.assert_array_equal(tokens, want)
    np.testing.assert_allclose(stepper.read_logits(), logits, atol=1e-6)
    for name, value in stepper.read_rows([0, 1, 2]).items():
        np.testing.assert_allclose(value, state[name], atol=1e-6)


class Stream:
    """A row decoded alone through RnnModel.step_sample: the reference for every batch arrangement."""

    def __init__(self, model, seed: int, temperature: float, steps: int = 40):
        self.state0 = random_state(model, 1, seed)
        self.temperature = temperature
        self.uniforms = np.random.default_rng(seed).random(steps).astype(np.float32)
        self.expected, state, token = [], self.state0, np.array([seed % 7])
        self.first = int(token[0])
        for u in self.uniforms:
            _, token, _, state = model.step_sample(token, state, sampling_feeds(1, np.array([temperature], np.float32), np.array([u])))
            self.expected.append(int(token[0]))
        self.got: list[int] = []

    def next_input(self) -> tuple[int, float]:
        return (self.got[-1] if self.got else self.first), float(self.uniforms[len(self.got)])


def step_all(stepper: SlotStepper, rows: dict[int, Stream]) -> None:
    tokens = np.full(stepper.rows, 10_000)  # padding entries: ignored, even when out of range
    uniforms = np.full(stepper.rows, 0.5, np.float32)
    for slot, stream in rows.items():
        tokens[slot], uniforms[slot] = stream.next_input()
    out = stepper.step(tokens, uniforms)
    for slot, stream in rows.items():
        stream.got.append(int(out[slot]))


def join(stepper: SlotStepper, rows: dict[int, Stream], stream: Stream, slot: int | None = None) -> None:
    slot = int(stepper.allocate(1)[0]) if slot is None else slot
    stepper.write_rows([slot], stream.state0, np.array([stream.temperature]))
    rows[slot] = stream


def test_rows_join_and_leave_while_others_decode(model):
    stepper = SlotStepper(model, capacity=8)
    streams = [Stream(model, seed, temperature) for seed, temperature in enumerate([0.0, 0.9, 1.5, 0.0, 0.7, 1.1])]
    rows: dict[int, Stream] = {}
    join(stepper, rows, streams[0])
    join(stepper, rows, streams[1])
    for _ in range(3):
        step_all(stepper, rows)
    join(stepper, rows, streams[2])
    step_all(stepper, rows)
    stepper.free([0])  # a hole: slot 0 becomes a padding row
    del rows[0]
    step_all(stepper, rows)
    join(stepper, rows, streams[3], slot=6)  # grows the bucket to 8, holes at 0, 3, 4, 5
    assert stepper.bucket_size == 8
    for _ in range(2):
        step_all(stepper, rows)
    join(stepper, rows, streams[4])  # reuses the lowest free slot
    assert 0 in rows and rows[0] is streams[4]
    step_all(stepper, rows)
    stepper.free([6])
    del rows[6]
    assert stepper.bucket_size == 4  # shrank back, the other rows kept their state
    join(stepper, rows, streams[5])
    for _ in range(3):
        step_all(stepper, rows)
    for stream in streams:
        assert stream.got and stream.got == stream.expected[: len(stream.got)]


def test_gather_reorders_copies_and_drops_rows(model):
    temperature = np.array([0.0, 0.8, 1.3], np.float32)
    state = random_state(model, 3, seed=5)
    stepper = SlotStepper(model, capacity=4)
    stepper.write_rows([0, 1, 2], state, temperature)
    tokens = stepper.step(np.array([1, 2, 3]), np.full(3, 0.3, np.float32))
    before = stepper.read_rows([0, 1, 2])
    order = np.array([2, 0, 0])
    stepper.gather(order)
    for name, value in stepper.read_rows([0, 1, 2]).items():
        np.testing.assert_array_equal(value, before[name][:, order])
    uniform = np.array([0.6, 0.2, 0.9], np.float32)
    got = stepper.step(tokens[order], uniform)
    _, want, _, _ = model.step_sample(tokens[order], {k: v[:, order] for k, v in before.items()},
                                      sampling_feeds(3, temperature[order], uniform))
    np.testing.assert_array_equal(got, want)  # each row's temperature moved with it
    stepper.gather([1])
    assert stepper.rows == 1 and stepper.bucket_size == 1


def test_buckets_are_powers_of_two_up_to_the_capacity():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(6) == [1, 2, 4, 6]


def test_slot_misuse_is_refused_with_a_reason(model):
    stepper = SlotStepper(model, capacity=2)
    with pytest.raises(InvalidParameterError, match="no rows"):
        stepper.step(np.array([1]), np.array([0.5]))
    stepper.write_rows(stepper.allocate(2), random_state(model, 2, seed=0))
    with pytest.raises(OverloadedError, match="0 of 2 slots are free"):
        stepper.allocate(1)
    with pytest.raises(InvalidParameterError, match="outside 0..1"):
        stepper.free([2])
    with pytest.raises(InvalidParameterError, match="2 entries"):
        stepper.step(np.array([1]), np.array([0.5]))
    stepper.free([1])
    with pytest.raises(InvalidParameterError, match="holds no row"):
        stepper.gather([1])
    with pytest.raises(InvalidParameterError, match="capacity"):
        SlotStepper(model, capacity=0)
