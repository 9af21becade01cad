"""Decoding speed: the engine against its baselines, measured side by side in one run.

    python benchmarks/decode.py                 # shipped LSTM architecture and a 2x512 LSTM, CPU
    python benchmarks/decode.py --device cuda --batches 1,64,1024

For each model (weights made once, shared by every contender):
  1. one stream, per token: engine (sampling, T=0.8) vs the bare onnxruntime call of the
     plain step graph (the model's interface at time 1, no sampling, no Python around it); both
     in steady state (one engine and one session across the rounds)                     [target <= 1.15x]
     The engine runs its own decoding step graph (rnngen.model.step_graph.decoding_step_model:
     no time axis, state layer by layer): a second line gives that graph's bare call without the
     sampling head, against the plain step, and the engine against it
  2. one stream, per token: PyTorch eager step loop with torch.multinomial vs the engine  [target >= 2.5x]
  3. prefill of 1,000 tokens: Loop graph vs onnxruntime's fused LSTM op                  [target <= 1.3x]
     and stepping the 1,000 tokens one call each vs the Loop graph                       [target >= 3x]
  4. B rows at once: engine tokens/s vs the bare batched step                             [target >= 0.9x]
  5. host work per row per step at batch 1,024 on a tiny model (1x8 LSTM): the engine's step
     minus its model call, temperature-only and with top-k + top-p + repetition penalty
                                                                     [targets <= 0.5 us, <= 3 us]
  6. peak memory (RSS) of prefilling a 200,000-character prompt vs a 100-character one, each
     in a fresh process; baseline: the whole prompt in one Loop call with every position's
     logits (as before chunked prefill), at 20,000 characters                [target <= 300 MB]
Device paths (issue 13), for every batch size, side by side in the same run:
  7. the slot stepper (rnngen.model.graph_stepper: bound buckets, uniforms in and tokens out
     every step; CUDA graphs on CUDA; the decoding step graph with its sampling head) vs the
     bare bound step: the plain step graph (the model's interface at time 1), fixed batch,
     every input and output an OrtValue at a fixed address, state ping-pong, on CUDA one captured
     graph per parity, nothing copied per step                                 [target <= 1.5x at batch 1]
  8. the fused ONNX LSTM op at time 1 as the bare bound step vs the plain step graph
  9. on CUDA: PyTorch with CUDA graphs (cuDNN LSTM step + Gumbel-max sampling, tokens fed back
     on the device; with and without reading them back each step) vs the bare bound step
  10. prefill of 1,000 tokens: rnngen's Loop graph vs the fused-op graph derived from it
     (rnngen.model.fused_graph), and which one RnnModel.prefill uses here      [target <= 1.3x];
     also for the shipped LSTM, GRU and RNN files themselves (--prefill-models)
Timings interleave the contenders in blocks and report medians; the engine's ratios in 1 and 4
are medians of each round's ratio (two blocks back to back), which hold while this machine's
speed drifts in phases of seconds. PyTorch runs in a
subprocess (onnxruntime's spinning threads slow torch down in the same process).
Needs the train extra (torch) for the PyTorch baseline and to make the weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_weights(cell: str, layers: int, hidden: int, vocab: int, seed: int = 0) -> tuple:
    import torch

    from rnngen.model.config import ModelConfig
    from rnngen.training.model import RNNLanguageModel

    torch.manual_seed(seed)
    config = ModelConfig(cell=cell, vocab_size=vocab, hidden_size=hidden, num_layers=layers)
    return config, RNNLanguageModel(config).numpy_weights()


def write_rnngen_model(path: Path, config, weights) -> None:
    from rnngen.model.file import make_metadata
    from rnngen.model.loop_graph import build_model
    from rnngen.model.tokenizers import CharTokenizer

    symbols = [chr(32 + i) for i in range(config.vocab_size)]
    path.write_bytes(build_model(config, weights, make_metadata(config, CharTokenizer(symbols), {})).SerializeToString())


def fused_lstm_session(config, weights, providers):
    """The same LSTM as onnxruntime's fused LSTM op per layer (the prefill baseline)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    h = config.hidden_size
    order = [0, 3, 1, 2]  # PyTorch gates i, f, g, o → ONNX i, o, f, c

    def reorder(w):
        return np.concatenate([w[k * h:(k + 1) * h] for k in order])

    inits, nodes = [numpy_helper.from_array(weights["embedding.weight"], "emb")], []
    nodes.append(helper.make_node("Transpose", ["tokens"], ["tok_tb"], perm=[1, 0]))
    nodes.append(helper.make_node("Gather", ["emb", "tok_tb"], ["x0"]))
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    x = "x0"
    for k in range(config.num_layers):
        W = reorder(weights[f"rnn.weight_ih_l{k}"])[None]
        R = reorder(weights[f"rnn.weight_hh_l{k}"])[None]
        B = np.concatenate([reorder(weights[f"rnn.bias_ih_l{k}"]), reorder(weights[f"rnn.bias_hh_l{k}"])])[None]
        for name, arr in ((f"W{k}", W), (f"R{k}", R), (f"B{k}", B)):
            inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        nodes.append(helper.make_node("LSTM", [x, f"W{k}", f"R{k}", f"B{k}"], [f"y{k}"], hidden_size=h))
        nodes.append(helper.make_node("Squeeze", [f"y{k}", "axis1"], [f"x{k + 1}"]))
        x = f"x{k + 1}"
    dec = weights.get("decoder.weight", weights["embedding.weight"])
    inits += [numpy_helper.from_array(dec.T.copy(), "dec"), numpy_helper.from_array(weights["decoder.bias"], "dec_b")]
    nodes += [helper.make_node("MatMul", [x, "dec"], ["mm"]), helper.make_node("Add", ["mm", "dec_b"], ["logits"])]
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, "T"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=providers)


def interleave(contenders: dict, rounds: int, rounds_of: dict | None = None) -> dict:
    """Median seconds per call of each contender, run in turn `rounds` times (each round's own
    times go into `rounds_of`, name -> list, when given).

    A contender that sets `fn.elapsed` (its own timing of the part that counts, e.g. without
    its set-up) is measured by that; the others by the whole call.
    """
    times = {name: [] for name in contenders} if rounds_of is None else rounds_of
    for _ in range(rounds):
        for name, fn in contenders.items():
            fn.elapsed = None
            t0 = time.perf_counter()
            fn()
            whole = time.perf_counter() - t0
            times.setdefault(name, []).append(whole if fn.elapsed is None else fn.elapsed)
    return {name: statistics.median(v) for name, v in times.items()}


def paired_ratio(rounds_of: dict, name: str, baseline: str) -> float:
    """The median over rounds of name's time over the baseline's in the same round. This machine's
    speed drifts in phases of seconds; a round's two contenders run back to back, so their ratio
    holds while the times themselves move."""
    return statistics.median(a / b for a, b in zip(rounds_of[name], rounds_of[baseline]))


def bench_model(label: str, path: Path, config, weights, device: str, batches: list[int], quick: bool) -> list[str]:
    from rnngen.decoding.engine import DecodeEngine
    from rnngen.decoding.rows import Row, row_generator
    from rnngen.model.runtime import RnnModel
    from rnngen.decoding.params import GenerationParams

    import onnx
    import onnxruntime as ort

    from rnngen.model.step_graph import decoding_step_model, derive_step_model, layer_state_name, layer_states

    model = RnnModel.load(path, device=device)
    lines = []
    # Short blocks and many rounds: each round's ratio is taken from two blocks run back to back.
    block = 50 if quick else 100
    rounds = 10 if quick else 40
    # The baseline: the plain loop-free step graph (no sampling head), called back to back.
    so = ort.SessionOptions()
    so.log_severity_level = 3
    bare = ort.InferenceSession(derive_step_model(onnx.load(str(path))).SerializeToString(), so, providers=model.providers)
    outputs = [o.name for o in bare.get_outputs()]
    # The graph the engine steps, without its sampling head, called the same way: how much of the
    # engine's time against the baseline is its graph's and how much the sampling and bookkeeping's.
    own = ort.InferenceSession(decoding_step_model(onnx.load(str(path)), config).SerializeToString(), so,
                               providers=model.providers)
    own_outputs = [o.name for o in own.get_outputs()]
    layers = layer_states(config)

    def bare_steps(batch: int, steps: int = block):
        state = model.initial_state(batch)
        feeds = {"tokens": np.zeros((batch, 1), np.int64)}

        def run():
            nonlocal state
            for i in range(steps):
                feeds["tokens"][:, 0] = i % config.vocab_size
                out = bare.run(outputs, {**feeds, **state})
                state = dict(zip(model.state_names, out[1:]))
        return run

    def own_steps(batch: int, steps: int = block):
        zeros = model.initial_state(batch)
        state = {layer_state_name(s, k): zeros[s][k] for s, k in layers}
        feeds = {"tokens": np.zeros(batch, np.int64)}

        def run():
            nonlocal state
            for i in range(steps):
                feeds["tokens"][:] = i % config.vocab_size
                out = own.run(own_outputs, {**feeds, **state})
                state = {layer_state_name(s, k): v for (s, k), v in zip(layers, out[1:])}
        return run

    def engine_steps(batch: int, steps: int = block):
        # One engine for all rounds, as the bare session is one session: both are timed in steady
        # state (a new engine's first steps are slower while onnxruntime sets up its new bindings).
        engine = DecodeEngine(model)
        logits, state = engine.prefill([1])
        steady = GenerationParams(max_new_tokens=10**8, temperature=0.8, seed=0)
        rows = [Row.start(steady, row_generator(0, i), model.tokenizer, [1], tag=i) for i in range(batch)]
        engine.add(rows, logits[[0] * batch], state.select([0] * batch))
        for _ in range(5):
            engine.step()

        def run():
            for _ in range(steps):
                engine.step()
        return run

    # 1. one stream per token.
    eng = engine_steps(1)
    each = {}
    bare_1 = bare_steps(1)
    res = interleave({"bare": bare_1, "engine": eng}, rounds, each)
    bare_us = res["bare"] / block * 1e6
    engine_us = res["engine"] / block * 1e6
    lines.append(f"{label} | batch 1 per token | engine {engine_us:.1f} us vs bare onnxruntime step {bare_us:.1f} us | "
                 f"ratio {paired_ratio(each, 'engine', 'bare'):.2f}x (median of {rounds} paired rounds; target <= 1.15x)")
    # Two contenders at a time, as above: a third session's weights in turn would crowd the caches.
    own_1, graph_each, rest_each = own_steps(1), {}, {}
    own_us = interleave({"bare": bare_1, "own": own_1}, rounds, graph_each)["own"] / block * 1e6
    interleave({"own": own_1, "engine": eng}, rounds, rest_each)
    lines.append(f"{label} | batch 1 per token | the engine's decoding step graph without its sampling head, called as the "
                 f"bare step is: {own_us:.1f} us, {paired_ratio(graph_each, 'own', 'bare'):.2f}x the bare step; the engine "
                 f"{paired_ratio(rest_each, 'engine', 'own'):.2f}x that")

    # 2. PyTorch eager, in a subprocess on the same weights.
    torch_us = torch_eager_per_token(config, weights, block, rounds, device)
    lines.append(f"{label} | batch 1 per token | PyTorch eager {torch_us:.1f} us vs engine {engine_us:.1f} us | "
                 f"engine {torch_us / engine_us:.2f}x faster (target >= 2.5x)")

    # 3. prefill of 1,000 tokens.
    if config.cell == "lstm":
        fused = fused_lstm_session(config, weights, model.providers)
        prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, 1000))
        zeros = model.initial_state(1)

        def loop_prefill():
            model.run(prompt, zeros)

        def fused_prefill():
            fused.run(["logits"], {"tokens": prompt})

        def stepped_prefill():
            state = zeros
            for t in range(prompt.shape[1]):
                _, state = model.step(prompt[:, t], state)

        res = interleave({"loop": loop_prefill, "fused": fused_prefill, "stepped": stepped_prefill}, 3 if quick else 7)
        graph = "fused-op" if model.uses_fused_run else "Loop"  # what RnnModel.run uses here
        lines.append(f"{label} | prefill 1000 tokens | rnngen ({graph} graph) {res['loop'] * 1e3:.1f} ms vs fused LSTM op "
                     f"{res['fused'] * 1e3:.1f} ms | ratio {res['loop'] / res['fused']:.2f}x (target <= 1.3x)")
        lines.append(f"{label} | prefill 1000 tokens | stepping {res['stepped'] * 1e3:.1f} ms vs rnngen ({graph} graph) "
                     f"{res['loop'] * 1e3:.1f} ms | one call {res['stepped'] / res['loop']:.2f}x faster (target >= 3x)")

    # 4. many rows at once.
    for batch in batches:
        if batch == 1:
            continue
        each = {}
        batch_block = max(10, block // 4) if batch >= 512 else block // 2
        res = interleave({"bare": bare_steps(batch, batch_block), "engine": engine_steps(batch, batch_block)}, rounds // 2, each)
        bare_tps = batch * batch_block / res["bare"]
        engine_tps = batch * batch_block / res["engine"]
        lines.append(f"{label} | batch {batch} aggregate | engine {engine_tps:,.0f} tok/s vs bare batched step "
                     f"{bare_tps:,.0f} tok/s | ratio {paired_ratio(each, 'bare', 'engine'):.2f}x "
                     f"(median of {rounds // 2} paired rounds; target >= 0.9x)")
    return lines


def host_work(path: Path, batch: int, steps: int, device: str) -> list[str]:
    """Engine step time minus the time inside the model call, per row per step (medians over steps)."""
    from rnngen.decoding.engine import DecodeEngine
    from rnngen.decoding.params import GenerationParams
    from rnngen.decoding.rows import Row, row_generator
    from rnngen.model.runtime import RnnModel

    model = RnnModel.load(path, device=device)
    inside = []

    def timed(step):
        def run(*args, **kw):
            t0 = time.perf_counter()
            out = step(*args, **kw)
            inside.append(time.perf_counter() - t0)
            return out
        return run

    lines = []
    kinds = {"temperature only": GenerationParams(max_new_tokens=10**6, temperature=0.8, seed=0),
             "top-k 20 + top-p 0.9 + repetition 1.2": GenerationParams(max_new_tokens=10**6, temperature=0.8, seed=0, top_k=20,
                                                                    top_p=0.9, repetition_penalty=1.2)}
    for name, params in kinds.items():
        engine = DecodeEngine(model)
        engine.store.step = timed(engine.store.step)  # the model call: tokens and draws in, the step graph run
        logits, state = engine.prefill([1])
        rows = [Row.start(params, row_generator(0, i), model.tokenizer, [1], tag=i) for i in range(batch)]
        engine.add(rows, logits[[0] * batch], state.select([0] * batch))
        for _ in range(5):  # warm up, and past the first step after joining
            engine.step()
        host = []
        for _ in range(steps):
            inside.clear()
            t0 = time.perf_counter()
            engine.step()
            host.append(time.perf_counter() - t0 - sum(inside))
        us = statistics.median(host) / batch * 1e6
        target = 0.5 if name == "temperature only" else 3.0
        lines.append(f"tiny lstm 1x8 | batch {batch} host work per row-step, {name} | {us:.2f} us "
                     f"(engine step minus model call; target <= {target} us)")
    return lines


def prefill_peak_mb(path: Path, chars: int, one_call: bool) -> float:
    """Peak RSS of a fresh process that loads the model and prefills a prompt of `chars` characters."""
    cmd = [sys.executable, __file__, "--prefill-worker", str(path), str(chars), "one-call" if one_call else "chunked"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def prefill_worker(path: str, chars: int, mode: str) -> None:
    import resource

    from rnngen.model.runtime import RnnModel

    model = RnnModel.load(path, device="cpu")
    symbols = model.tokenizer.symbols
    prompt = "".join(np.random.default_rng(0).choice(symbols, chars))
    ids = model.tokenizer.encode(prompt)
    if mode == "one-call":
        model.run(np.asarray([ids], dtype=np.int64), model.initial_state(1))
    else:
        model.prefill(ids)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def prefill_memory(path: Path, label: str) -> list[str]:
    short = prefill_peak_mb(path, 100, one_call=False)
    t0 = time.perf_counter()
    long = prefill_peak_mb(path, 200_000, one_call=False)
    seconds = time.perf_counter() - t0
    base_short = prefill_peak_mb(path, 100, one_call=True)
    base_long = prefill_peak_mb(path, 20_000, one_call=True)
    return [f"{label} | prefill 200,000 chars | peak RSS {long:,.0f} MB vs {short:,.0f} MB for 100 chars: "
            f"+{long - short:,.0f} MB (target <= 300 MB; process incl. load {seconds:.1f} s)",
            f"{label} | baseline: one Loop call with all logits, 20,000 chars | peak RSS +{base_long - base_short:,.0f} MB "
            f"over 100 chars ({(base_long - base_short) / 19.9:,.1f} KB per char)"]


def bound_step(proto, model, batch: int, device: str):
    """The bare bound step: fixed batch, every input/output an OrtValue at a fixed address, state
    ping-pong between two buffers, tokens left on the device; on CUDA one captured graph per parity."""
    import onnxruntime as ort

    from rnngen.model.devices import CUDA_PROVIDER, ort_session_options
    from rnngen.model.loop_graph import state_output_name

    providers = [(CUDA_PROVIDER, {"enable_cuda_graph": "1"})] if device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(proto.SerializeToString(), ort_session_options(), providers=providers)
    dev = "cuda" if device == "cuda" else "cpu"

    def value(array):
        return ort.OrtValue.ortvalue_from_numpy(array, dev, 0)

    cfg = model.config
    feeds = {"tokens": value(np.ones((batch, 1), np.int64))}
    graph_inputs = {i.name for i in session.get_inputs()}
    if "inv_temperature" in graph_inputs:  # a graph with the sampling head
        feeds.update(inv_temperature=value(np.full((batch, 1), 1.25, np.float32)), greedy=value(np.zeros(batch, bool)),
                     uniform=value(np.full((batch, 1), 0.5, np.float32)))
    states = [{s: value(np.zeros((cfg.num_layers, batch, cfg.hidden_size), np.float32)) for s in model.state_names}
              for _ in range(2)]
    bindings, options = [], []
    for parity in (0, 1):
        binding = session.io_binding()
        for name, v in feeds.items():
            binding.bind_ortvalue_input(name, v)
        for out in session.get_outputs():
            if out.name not in {state_output_name(s) for s in model.state_names}:
                shape = [batch if not isinstance(d, int) else d for d in out.shape]
                shape = [1 if (i == 1 and len(shape) == 3) else d for i, d in enumerate(shape)]  # time = 1
                dtype = np.int64 if "int64" in out.type else np.float32
                binding.bind_ortvalue_output(out.name, ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, dev, 0))
        for s in model.state_names:
            binding.bind_ortvalue_input(s, states[parity][s])
            binding.bind_ortvalue_output(state_output_name(s), states[1 - parity][s])
        bindings.append(binding)
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(parity))
        options.append(run_options)

    def steps(n: int):
        for i in range(n):
            session.run_with_iobinding(bindings[i % 2], options[i % 2])
        if n % 2:  # keep the parity even between blocks
            session.run_with_iobinding(bindings[1], options[1])
    return steps


def stepper_steps(model, batch: int):
    """The slot stepper with `batch` rows at temperature 0.8: tokens and uniforms in, tokens out."""
    from rnngen.model.graph_stepper import SlotStepper

    stepper = SlotStepper(model, capacity=batch)
    stepper.write_rows(stepper.allocate(batch), model.initial_state(batch), np.full(batch, 0.8, np.float32))
    rng = np.random.default_rng(0)
    tokens = np.ones(batch, np.int64)

    def steps(n: int):
        nonlocal tokens
        for _ in range(n):
            tokens = stepper.step(tokens, rng.random(batch, dtype=np.float32))
    return stepper, steps


def bench_device_paths(label: str, path: Path, config, weights, device: str, batches: list[int], quick: bool) -> list[str]:
    import onnx

    from rnngen.model.fused_graph import derive_fused_model
    from rnngen.model.runtime import RnnModel
    from rnngen.model.step_graph import derive_step_model

    model = RnnModel.load(path, device=device)
    proto = onnx.load(str(path))
    plain_step, fused = derive_step_model(proto), derive_fused_model(proto, config)
    block = 100 if quick else 300
    rounds = 5 if quick else 15
    lines = []
    for batch in batches:
        contenders = {"bare": bound_step(plain_step, model, batch, device)}
        stepper, contenders["stepper"] = stepper_steps(model, batch)
        try:  # whether cuDNN's fused step can be captured in a CUDA graph is part of the question
            contenders["fused"] = bound_step(fused, model, batch, device)
            contenders["fused"](4)
        except Exception as exc:  # onnxruntime raises its own exception types
            contenders.pop("fused", None)
            lines.append(f"{label} | batch {batch} | fused LSTM op at time 1: does not run bound here ({str(exc)[:200]})")
        for fn in contenders.values():
            fn(4)  # warm up (and capture, on CUDA)
        res = interleave({k: (lambda fn=fn: fn(block)) for k, fn in contenders.items()},
                         rounds if batch == 1 else max(3, rounds // 3))
        per = {k: v / block for k, v in res.items()}
        capture = "CUDA graphs" if stepper.captures else "no capture"
        if batch == 1:
            lines.append(f"{label} | batch 1 per token | slot stepper ({capture}) {per['stepper'] * 1e6:.1f} us vs bare bound "
                         f"step {per['bare'] * 1e6:.1f} us | ratio {per['stepper'] / per['bare']:.2f}x (target <= 1.5x)")
        else:
            lines.append(f"{label} | batch {batch} aggregate | slot stepper ({capture}) {batch / per['stepper']:,.0f} tok/s vs "
                         f"bare bound step {batch / per['bare']:,.0f} tok/s | ratio {per['bare'] / per['stepper']:.2f}x")
        if "fused" in per:
            lines.append(f"{label} | batch {batch} | fused LSTM op at time 1 {per['fused'] * 1e6:.1f} us/step vs plain step graph "
                         f"{per['bare'] * 1e6:.1f} us/step (both bare bound) | fused/plain {per['fused'] / per['bare']:.2f}x")
        if device == "cuda":
            graph_us, read_us = torch_graph_per_step(config, weights, batch, block, rounds)
            lines.append(f"{label} | batch {batch} | PyTorch CUDA graph step+Gumbel-max {graph_us:.1f} us/step "
                         f"({read_us:.1f} with tokens read back each step) vs bare bound step {per['bare'] * 1e6:.1f} us | "
                         f"stepper/PyTorch-read-back {per['stepper'] * 1e6 / read_us:.2f}x")

    lines.append(prefill_line(label, model, fused, quick))
    return lines


def prefill_line(label: str, model, fused_proto, quick: bool) -> str:
    """Prefill of 1,000 tokens: the Loop graph vs the fused-op graph derived from it."""
    import onnxruntime as ort

    from rnngen.model.devices import ort_session_options

    config = model.config
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, 1000))
    zeros = model.initial_state(1)
    fused = model.run_session if model.uses_fused_run else ort.InferenceSession(
        fused_proto.SerializeToString(), ort_session_options(), providers=model.providers)
    outputs = [o.name for o in model.session.get_outputs()]
    res = interleave({"loop": lambda: model.session.run(outputs, {"tokens": prompt, **zeros}),
                      "fused": lambda: fused.run(outputs, {"tokens": prompt, **zeros})}, 3 if quick else 7)
    used = "fused" if model.uses_fused_run else "loop"
    return (f"{label} | prefill 1000 tokens | Loop graph {res['loop'] * 1e3:.1f} ms vs derived fused-op graph "
            f"{res['fused'] * 1e3:.1f} ms | Loop/fused {res['loop'] / res['fused']:.2f}x; RnnModel.prefill uses the {used} "
            f"graph ({res[used] / res['fused']:.2f}x the fused op, target <= 1.3x)")


def bench_shipped_prefill(paths: list[str], device: str, quick: bool) -> list[str]:
    import onnx

    from rnngen.model.fused_graph import derive_fused_model
    from rnngen.model.runtime import RnnModel

    lines = []
    for path in paths:
        model = RnnModel.load(path, device=device)
        c = model.config
        label = f"{Path(path).name} ({c.cell} {c.num_layers}x{c.hidden_size})"
        lines.append(prefill_line(label, model, derive_fused_model(onnx.load(path), c), quick))
    return lines


def torch_graph_per_step(config, weights, batch: int, block: int, rounds: int) -> tuple[float, float]:
    """us per step of PyTorch's CUDA-graph step: tokens kept on the device, and read back every step."""
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "w.npz", **weights)
        cmd = [sys.executable, __file__, "--torch-graph-worker", json.dumps(config.to_dict()), str(Path(tmp) / "w.npz"),
               str(batch), str(block), str(rounds)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    on_device, read_back = out.stdout.strip().splitlines()[-1].split()
    return float(on_device), float(read_back)


def torch_graph_worker(config_json: str, weights_path: str, batch: int, block: int, rounds: int) -> None:
    """PyTorch's best: one cuDNN step (nn.LSTM), temperature 0.8 and Gumbel-max sampling, captured
    in a CUDA graph; the drawn tokens feed the next step on the device. Prints us per step without
    and with reading the tokens back every step, interleaved."""
    import torch

    from rnngen.model.config import ModelConfig
    from rnngen.training.model import RNNLanguageModel

    config = ModelConfig.from_dict(json.loads(config_json))
    model = RNNLanguageModel(config)
    data = np.load(weights_path)
    model.load_weights({k: torch.from_numpy(data[k]) for k in data.files})
    dev = torch.device("cuda")
    model = model.to(dev).eval()
    token = torch.ones((batch, 1), dtype=torch.long, device=dev)
    state = model.initial_state(batch, device=dev)

    def step():
        logits, new_state = model(token, state)
        noise = -torch.log(-torch.log(torch.rand_like(logits[:, -1]).clamp_min_(1e-20)))
        token.copy_((logits[:, -1] / 0.8 + noise).argmax(-1, keepdim=True))
        for s, n in zip(state, new_state):
            s.copy_(n)

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        per_block = {False: [], True: []}
        for _ in range(rounds):
            for read_back in per_block:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(block):
                    graph.replay()
                    if read_back:
                        token.view(-1).cpu()
                torch.cuda.synchronize()
                per_block[read_back].append((time.perf_counter() - t0) / block)
    print(*(statistics.median(v) * 1e6 for v in per_block.values()))


def torch_eager_per_token(config, weights, block: int, rounds: int, device: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "w.npz", **weights)
        cmd = [sys.executable, __file__, "--torch-worker", json.dumps(config.to_dict()), str(Path(tmp) / "w.npz"),
               str(block), str(rounds), device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def torch_worker(config_json: str, weights_path: str, block: int, rounds: int, device: str) -> None:
    """A char-rnn-style PyTorch loop: model(token, hidden), softmax, torch.multinomial, per token."""
    import torch

    from rnngen.model.config import ModelConfig
    from rnngen.training.model import RNNLanguageModel

    config = ModelConfig.from_dict(json.loads(config_json))
    model = RNNLanguageModel(config)
    data = np.load(weights_path)
    model.load_weights({k: torch.from_numpy(data[k]) for k in data.files})
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    model = model.to(dev).eval()
    per_block = []
    with torch.no_grad():
        for _ in range(rounds):
            state = model.initial_state(1, device=dev)
            token = torch.zeros((1, 1), dtype=torch.long, device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(block):
                logits, state = model(token, state)
                probs = torch.softmax(logits[0, -1] / 0.8, dim=-1)
                token = torch.multinomial(probs, 1).view(1, 1)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per_block.append((time.perf_counter() - t0) / block)
    print(statistics.median(per_block) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "exported" / "lstm.onnx"), help="shipped model whose architecture is measured")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes for aggregate throughput")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run, not for quoting)")
    parser.add_argument("--prefill-models", default=",".join(str(ROOT / "exported" / f"{m}.onnx") for m in ("lstm", "gru", "rnn")),
                        help="model files whose own prefill (Loop vs fused-op graph) is measured with the device paths")
    parser.add_argument("--only", choices=["speed", "host", "memory", "device"],
                        help="run one part: speed (1-4), host (5), memory (6) or device (7-10)")
    parser.add_argument("--torch-worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--prefill-worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--torch-graph-worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        c, w, block, rounds, device = args.torch_worker
        torch_worker(c, w, int(block), int(rounds), device)
        return
    if args.prefill_worker:
        path, chars, mode = args.prefill_worker
        prefill_worker(path, int(chars), mode)
        return
    if args.torch_graph_worker:
        c, w, batch, block, rounds = args.torch_graph_worker
        torch_graph_worker(c, w, int(batch), int(block), int(rounds))
        return

    from rnngen.model.file import read_model_file

    shipped = read_model_file(args.model).config
    batches = [int(b) for b in args.batches.split(",")]
    import onnxruntime

    print(f"rnngen decode benchmark: onnxruntime {onnxruntime.__version__}, device {args.device}; medians of interleaved runs")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "host"):
            config, weights = make_weights("lstm", 1, 8, shipped.vocab_size)
            write_rnngen_model(Path(tmp) / "tiny.onnx", config, weights)
            for line in host_work(Path(tmp) / "tiny.onnx", 1024, 20 if args.quick else 100, args.device):
                print(line, flush=True)
        if args.only in (None, "memory"):
            for line in prefill_memory(Path(args.model), f"shipped {shipped.cell} {shipped.num_layers}x{shipped.hidden_size}"):
                print(line, flush=True)
        if args.only not in (None, "speed"):
            return
        for label, (layers, hidden) in ((f"shipped {shipped.cell} {shipped.num_layers}x{shipped.hidden_size}",
                                        (shipped.num_layers, shipped.hidden_size)), ("lstm 2x512", (2, 512))):
            config, weights = make_weights("lstm", layers, hidden, shipped.vocab_size)
            path = Path(tmp) / f"{layers}x{hidden}.onnx"
            write_rnngen_model(path, config, weights)
            if args.only != "device":
                for line in bench_model(label, path, config, weights, args.device, batches, args.quick):
                    print(line, flush=True)
            if args.only != "engine":
                for line in bench_device_paths(label, path, config, weights, args.device, batches, args.quick):
                    print(line, flush=True)
    if args.only != "engine" and args.prefill_models:
        for line in bench_shipped_prefill(args.prefill_models.split(","), args.device, args.quick):
            print(line, flush=True)


if __name__ == "__main__":
    main()
