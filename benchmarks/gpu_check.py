"""The Python part of benchmarks/gpu_check.sh: where rnngen runs and whether the device paths agree.

    python3 benchmarks/gpu_check.py providers
    python3 benchmarks/gpu_check.py paths exported/lstm.onnx [--device cuda|cpu] [--steps N]

`providers` prints onnxruntime's version, its providers, and whether CUDA can be used (and why not).
`paths` prints, for one model file: the providers its sessions use; whether prefill goes through the
fused-op graph, and how far its logits are from the CPU's Loop graph; whether the slot stepper's
CUDA graph path is active (captures, and its step time against the same bindings uncaptured); and
whether the slot stepper draws the same tokens as RnnModel.step_sample on the CPU (mixed greedy and
sampled rows, rows in a padded bucket). Needs no torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def providers() -> None:
    import onnxruntime as ort

    from rnngen.model.devices import cuda_unusable_reason

    print(f"onnxruntime {ort.__version__}, providers available: {', '.join(ort.get_available_providers())}")
    reason = cuda_unusable_reason()
    print("CUDA: usable" if reason is None else f"CUDA: not available ({reason})")


def stepper_tokens(model, device_steps, rows: int, steps: int) -> tuple[np.ndarray, float]:
    """Tokens drawn by `device_steps` for `rows` rows over `steps` steps, and seconds per step."""
    rng = np.random.default_rng(0)
    tokens, out = np.arange(rows) % model.config.vocab_size, []
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = device_steps(tokens, rng.random(rows, dtype=np.float32))
        out.append(tokens)
    return np.stack(out), (time.perf_counter() - t0) / steps


def paths(model_path: str, device: str, steps: int) -> None:
    from rnngen.model.graph_stepper import SlotStepper
    from rnngen.model.runtime import RnnModel, sampling_feeds

    cpu = RnnModel.load(model_path, device="cpu")
    model = RnnModel.load(model_path, device=device) if device != "cpu" else cpu
    name = Path(model_path).name
    print(f"{name} | sessions on {', '.join(model.providers)} | prefill through the "
          f"{'fused-op' if model.uses_fused_run else 'Loop'} graph")
    prompt = np.random.default_rng(1).integers(0, cpu.config.vocab_size, (1, 200))
    logits, _ = model.run(prompt, model.initial_state(1))
    reference = cpu.session.run(["logits"], {"tokens": prompt, **cpu.initial_state(1)})[0]
    same_argmax = float((logits.argmax(-1) == reference.argmax(-1)).mean())
    print(f"{name} | prefill of 200 tokens on {model.device} vs the CPU's Loop graph | max |logit diff| "
          f"{np.abs(logits - reference).max():.2e}, same argmax at {same_argmax:.1%} of positions")

    rows = 3  # a bucket of 4: one padding row
    temperature = np.array([0.0, 0.8, 1.2], np.float32)
    state = {k: (np.random.default_rng(2).standard_normal(v.shape) * 0.3).astype(np.float32)
             for k, v in cpu.initial_state(rows).items()}
    timings, drawn, active = {}, {}, False
    for graphs in (True, False) if model.device == "cuda" else (True,):  # uncaptured: the comparison
        stepper = SlotStepper(model, capacity=8, cuda_graphs=graphs)
        stepper.write_rows(stepper.allocate(rows), state, temperature)
        drawn[graphs], timings[graphs] = stepper_tokens(model, stepper.step, rows, steps)
        active = active or stepper.captures
    host_state = dict(state)

    def reference_steps(tokens, uniform):
        nonlocal host_state
        _, nxt, _, host_state = cpu.step_sample(tokens, host_state, sampling_feeds(rows, temperature, uniform))
        return nxt

    want, _ = stepper_tokens(cpu, reference_steps, rows, steps)
    if model.device == "cuda":
        print(f"{name} | CUDA graph path: {'active' if active else 'NOT active'} (enable_cuda_graph on the stepper's "
              f"session); slot stepper {timings[True] * 1e6:.1f} us/step vs {timings[False] * 1e6:.1f} us/step uncaptured")
    else:
        print(f"{name} | CUDA graph path: not used on {model.device} (the same bindings, no capture)")
    same = (drawn[True] == want).all(axis=1)
    first = int(np.argmin(same)) if not same.all() else steps
    print(f"{name} | slot stepper on {model.device} vs step_sample on the CPU | {rows} rows x {steps} steps: "
          f"{'identical tokens' if same.all() else f'tokens differ from step {first}'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("providers")
    p = sub.add_parser("paths")
    p.add_argument("model")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    if args.what == "providers":
        providers()
    else:
        paths(args.model, args.device, args.steps)


if __name__ == "__main__":
    main()
