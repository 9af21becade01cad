"""benchmarks/gpu_check.sh runs where CUDA is not usable: it says so and still runs the CPU parts."""

import os
import subprocess
import sys
from pathlib import Path

from rnngen.model.devices import cuda_unusable_reason

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=240)


def test_script_parses_and_refuses_unknown_options():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    result = run("--fast")
    assert result.returncode == 2
    assert "unknown option --fast (allowed: --cpu-only, --smoke)" in result.stderr


def test_smoke_run_checks_text_and_device_paths():
    result = run("--smoke")
    out = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    assert "onnxruntime" in out and "providers available" in out
    device = "cuda" if cuda_unusable_reason() is None else "cpu"
    if device == "cpu":
        assert "CUDA is not available here: running the CPU parts only" in out
        assert "lstm greedy: CPU text (CUDA not run): $'ROMEO:" in out
    else:
        assert "lstm greedy: CUDA vs CPU text identical" in out
    assert "lstm.onnx | prefill of 200 tokens" in out and "same argmax at 100.0% of positions" in out
    assert f"lstm.onnx | slot stepper on {device} vs step_sample on the CPU | 3 rows x 20 steps: identical tokens" in out
    assert f"gpu_check done in" in out and "Traceback" not in out + result.stderr
