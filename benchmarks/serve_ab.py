"""Two `rnngen serve` configurations side by side: which one serves more tokens per second.

    python benchmarks/serve_ab.py --b-args="--message-rate 2000"     # this checkout, default vs a flag
    python benchmarks/serve_ab.py --a-tree ../rnngen-before           # another checkout (A) vs this one (B)
    python benchmarks/serve_ab.py --streams 256 --rounds 10

Both servers start before the first round and stay up; each round sends the
same burst (N streams of T tokens, as benchmarks/serve.py) to A and then to B,
B first in odd rounds. This machine's speed drifts in phases of seconds, so
only the two runs of one round are compared: the figure is the median of the
per-round ratios B/A, with every round's ratio printed. Also printed: each
server's CPU time per generated token (from /proc, the server process's user
and system time during its runs), which drifts less than wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import run_streams, start_server  # noqa: E402  (this directory's serve.py)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "exported" / "lstm.onnx"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--a-tree", type=Path, default=ROOT, help="checkout server A runs from (default: this one)")
    parser.add_argument("--b-tree", type=Path, default=ROOT, help="checkout server B runs from (default: this one)")
    parser.add_argument("--a-args", default="", help="extra `rnngen serve` arguments for A")
    parser.add_argument("--b-args", default="", help="extra `rnngen serve` arguments for B")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    names = ("A", "B")
    trees = (args.a_tree.resolve(), args.b_tree.resolve())
    extras = (shlex.split(args.a_args), shlex.split(args.b_args))
    for name, tree, extra in zip(names, trees, extras):
        print(f"{name}: {tree} {' '.join(extra) or '(defaults)'}")
    servers = []
    try:
        for tree, extra in zip(trees, extras):
            servers.append(start_server(args.model, args.device, False, 1024, 0, tuple(extra), tree))
        for _, port in servers:  # warm-up
            asyncio.run(run_streams(port, min(args.streams, 16), 20))
        rates: tuple[list, list] = ([], [])
        cpu_us: tuple[list, list] = ([], [])
        for r in range(args.rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                proc, port = servers[i]
                before = cpu_seconds(proc.pid)
                rates[i].append(asyncio.run(run_streams(port, args.streams, args.tokens))["tps"])
                cpu_us[i].append((cpu_seconds(proc.pid) - before) / (args.streams * args.tokens) * 1e6)
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(10)
    for i, name in enumerate(names):
        print(f"{name} | tok/s per round {', '.join(f'{x:,.0f}' for x in rates[i])} | median {statistics.median(rates[i]):,.0f} | "
              f"server CPU per token median {statistics.median(cpu_us[i]):.0f} us")
    ratios = [b / a for a, b in zip(*rates)]
    print(f"{args.streams} streams x {args.tokens} tokens | B/A tokens per second {statistics.median(ratios):.2f}x "
          f"(median of {len(ratios)} rounds: {', '.join(f'{x:.2f}' for x in ratios)}) | B/A server CPU per token "
          f"{statistics.median(cpu_us[1]) / statistics.median(cpu_us[0]):.2f}x")


if __name__ == "__main__":
    main()
