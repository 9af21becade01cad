"""Serving speed: concurrent streaming clients against a local `rnngen serve`, in one run.

    python benchmarks/serve.py                       # shipped LSTM, 1, 8, 64, 256 streams, CPU
    python benchmarks/serve.py --streams 256,1024 --device cuda

Prints, per concurrency: aggregate tokens/s and p50/p99 of time-to-first-token
and inter-token latency (gaps between a stream's messages). Then, at 64 streams
(targets from the project's issue):
  - aggregate vs the engine's bare batch-64 throughput (same model, in-process)  [>= 0.7x]
  - aggregate vs the same server decoding each stream on its own (--per-stream)  [>= 4x]
  - p99 inter-token latency vs the engine's batch-64 step time                   [<= 3x]
Clients run in this process on grpc.aio; the server is a separate process.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def start_server(model: str, device: str, per_stream: bool, max_active: int, threads: int) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "rnngen", "serve", "-m", model, "--port", "0", "--device", device,
           "--max-active", str(max_active), "--max-queued", str(max_active), "--grace", "1", "--threads", str(threads)]
    if per_stream:
        cmd.append("--per-stream")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    match = re.search(r":(\d+) \(", line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, int(match.group(1))


async def run_streams(port: int, streams: int, tokens: int) -> dict:
    import grpc

    from rnngen.v1 import rnngen_pb2 as pb
    from rnngen.v1 import rnngen_pb2_grpc as pb_grpc

    ttft, gaps, counts = [], [], []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GeneratorStub(channel)

        async def one(i: int) -> None:
            request = pb.GenerateRequest(prompt="ROMEO:", params=pb.GenerationParameters(max_new_tokens=tokens, seed=i))
            t0 = time.perf_counter()
            last, n = None, 0
            async for message in stub.Generate(request):
                now = time.perf_counter()
                if last is None:
                    ttft.append(now - t0)
                else:
                    gaps.append(now - last)
                last = now
                if message.usage.completion_tokens:
                    n = message.usage.completion_tokens
            counts.append(n)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(streams)))
        wall = time.perf_counter() - t0
    return {"tps": sum(counts) / wall, "ttft": ttft, "gaps": gaps}


def pct(values, q):
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


def engine_batch(model_path: str, device: str, batch: int, tokens: int) -> tuple[float, float]:
    """The engine alone, in-process: aggregate tokens/s and median step time at this batch size."""
    from rnngen.decoding.engine import DecodeEngine
    from rnngen.decoding.rows import Row, row_generator
    from rnngen.model.runtime import RnnModel
    from rnngen.decoding.params import GenerationParams

    model = RnnModel.load(model_path, device=device)
    params = GenerationParams(max_new_tokens=tokens, seed=0)
    rates, steps = [], []
    for _ in range(3):
        engine = DecodeEngine(model)
        logits, state = engine.prefill(model.tokenizer.encode("ROMEO:"))
        rows = [Row.start(params, row_generator(i, 0), model.tokenizer, [0], tag=i) for i in range(batch)]
        engine.add(rows, logits[[0] * batch], state.select([0] * batch))
        t0 = time.perf_counter()
        while len(engine):
            s = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - s)
        rates.append(batch * tokens / (time.perf_counter() - t0))
    return statistics.median(rates), statistics.median(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "exported" / "lstm.onnx"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--streams", default="1,8,64,256")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    parser.add_argument("--threads", type=int, default=0, help="the server's onnxruntime threads (0: one per core)")
    args = parser.parse_args()
    levels = [int(s) for s in args.streams.split(",")]
    print(f"rnngen serve benchmark: {args.model}, {args.tokens} tokens per stream, device {args.device}, "
          f"server onnxruntime threads {args.threads or 'auto'}")

    results = {}
    proc, port = start_server(args.model, args.device, per_stream=False, max_active=max(levels), threads=args.threads)
    try:
        asyncio.run(run_streams(port, 4, 20))  # warm-up
        for n in levels:
            r = results[n] = asyncio.run(run_streams(port, n, args.tokens))
            print(f"batched server | {n:4d} streams | {r['tps']:10,.0f} tok/s | TTFT p50 {pct(r['ttft'], 50):7.2f} ms "
                  f"p99 {pct(r['ttft'], 99):7.2f} ms | inter-token p50 {pct(r['gaps'], 50):6.2f} ms p99 {pct(r['gaps'], 99):6.2f} ms",
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(10)

    if 64 in results:
        proc, port = start_server(args.model, args.device, per_stream=True, max_active=64, threads=args.threads)
        try:
            per = asyncio.run(run_streams(port, 64, args.tokens))
        finally:
            proc.terminate()
            proc.wait(10)
        engine_tps, step_s = engine_batch(args.model, args.device, 64, args.tokens)
        r = results[64]
        print(f"per-stream server |   64 streams | {per['tps']:10,.0f} tok/s | inter-token p99 {pct(per['gaps'], 99):.2f} ms")
        print(f"64 streams | batched server {r['tps']:,.0f} tok/s vs engine bare batch 64 {engine_tps:,.0f} tok/s | "
              f"ratio {r['tps'] / engine_tps:.2f}x (target >= 0.7x)")
        print(f"64 streams | batched server {r['tps']:,.0f} tok/s vs per-stream server {per['tps']:,.0f} tok/s | "
              f"{r['tps'] / per['tps']:.2f}x (target >= 4x)")
        print(f"64 streams | inter-token p99 {pct(r['gaps'], 99):.2f} ms vs engine batch-64 step {step_s * 1e3:.2f} ms | "
              f"ratio {pct(r['gaps'], 99) / (step_s * 1e3):.2f}x (target <= 3x)")


if __name__ == "__main__":
    main()
