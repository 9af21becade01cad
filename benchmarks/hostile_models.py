"""Time and peak memory of refusing each hostile model file (issue 15), one line per class.

Each figure is measured in a fresh process (so one case's memory cannot hide another's):
the time is the median of --repeat runs, the memory the growth of the process's peak
resident set over its size just before the first run (Linux: /proc/self/clear_refs).

Baselines, measured in the same run:
- `onnx parse`: parsing the same file with onnx.ModelProto.FromString, the first thing the
  reader did before the bounds (what an unbounded reader pays before it can look at anything);
- the valid model every case is made from, loaded with RnnModel.load;
- the shipped LSTM (exported/lstm.onnx): read_model_file (every check and the rebuild of rnngen's
  graph) against parsing the file, and RnnModel.load against onnxruntime opening the file as it is.

    python benchmarks/hostile_models.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the corpus is the tests' own

CHILD = r"""
import json, statistics, sys, time
from pathlib import Path

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

mode, path, repeat = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
import onnx, onnxruntime
from rnngen.errors import RnngenError
from rnngen.model.file import read_model_file
from rnngen.model.runtime import RnnModel

def run():
    if mode == "rnngen":
        RnnModel.load(path, device="cpu")
    elif mode == "read":  # the checks and the rebuild of rnngen's graph, no session
        read_model_file(path)
    elif mode == "onnx-parse":
        onnx.ModelProto.FromString(path.read_bytes())
    else:  # onnxruntime opening the file as it is
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

open("/proc/self/clear_refs", "w").write("5")  # peak resident set := current
start_kib = rss_kib("VmRSS")
times, outcome = [], "ok"
for i in range(repeat):
    t0 = time.perf_counter()
    try:
        run()
    except RnngenError as exc:
        outcome = "refused: " + str(exc).replace(str(path), "FILE")
    except Exception as exc:  # what a reader without the checks may end in
        outcome = f"{type(exc).__name__} (traceback)"
    times.append(time.perf_counter() - t0)
    if i == 0:
        peak_kib = rss_kib("VmHWM") - start_kib
print(json.dumps({"seconds": statistics.median(times), "peak_mib": peak_kib / 1024, "outcome": outcome}))
"""


def measure(mode: str, path: Path, repeat: int, source: Path = ROOT) -> dict:
    """`mode` on `path` in a fresh process that imports rnngen from `source`."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(repeat)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=source)  # cwd first on sys.path: it must be `source`
    if done.returncode != 0:
        return {"seconds": float("nan"), "peak_mib": float("nan"), "outcome": f"process failed: {done.stderr.strip().splitlines()[-1][:120]}"}
    return json.loads(done.stdout)


def fmt(m: dict) -> str:
    return f"{m['seconds'] * 1e3:8.1f} ms, peak +{m['peak_mib']:7.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compare-with", type=Path, help="source tree of another rnngen (e.g. `git archive` of the "
                        "commit before the checks) whose RnnModel.load of the shipped LSTM is measured too")
    args = parser.parse_args()

    import hostile_corpus
    from conftest import corpus_text, write_model

    from rnngen.model.config import ModelConfig
    from rnngen.model.tokenizers import CharTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = CharTokenizer.from_text(corpus_text(1))
        valid = write_model(root / "valid.onnx", ModelConfig(cell="lstm", vocab_size=tokenizer.vocab_size,
                                                             hidden_size=16, num_layers=2), tokenizer)
        cases = hostile_corpus.build_corpus(valid, root / "cases")
        print(f"rnngen hostile-model benchmark: {len(cases)} cases from a char lstm 2x16 (vocabulary "
              f"{tokenizer.vocab_size}); median of {args.repeat} runs, each case in a fresh process")
        print(f"{'valid source model (loads)':52s} | RnnModel.load {fmt(measure('rnngen', valid, args.repeat))}")
        shipped = ROOT / "exported" / "lstm.onnx"
        if shipped.exists():
            read, parse = measure("read", shipped, args.repeat), measure("onnx-parse", shipped, args.repeat)
            print(f"{'shipped lstm 2x384: checks and rebuild':52s} | read_model_file {fmt(read)} | onnx parse {fmt(parse)} "
                  f"| ratio {read['seconds'] / parse['seconds']:.2f}x")
            ours, theirs = measure("rnngen", shipped, args.repeat), measure("onnxruntime", shipped, args.repeat)
            print(f"{'shipped lstm 2x384: whole load':52s} | RnnModel.load {fmt(ours)} | onnxruntime on the file "
                  f"{fmt(theirs)} | ratio {ours['seconds'] / theirs['seconds']:.2f}x (RnnModel also builds its step session)")
            if args.compare_with:
                before = measure("rnngen", shipped, args.repeat, args.compare_with)
                print(f"{'shipped lstm 2x384: whole load':52s} | RnnModel.load {fmt(ours)} | {args.compare_with} "
                      f"{fmt(before)} | ratio {ours['seconds'] / before['seconds']:.2f}x")
        for case in cases:
            ours, parse = measure("rnngen", case.path, args.repeat), measure("onnx-parse", case.path, args.repeat)
            size = case.path.stat().st_size
            line = f"{case.name:52s} | {size / 1e6:6.2f} MB | refused {fmt(ours)} | onnx parse {fmt(parse)} | "
            if args.compare_with:  # how the other rnngen's RnnModel.load ends on the same file
                before = measure("rnngen", case.path, 1, args.compare_with)
                line += f"{args.compare_with}: {fmt(before)}, {before['outcome'][:60]} | "
            print(line + ours["outcome"][:110])


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
