"""Where a model runs: execution providers for --device auto|cpu|cuda, and session options.

CUDA is checked before onnxruntime is asked for it (a failed request makes it log
loud errors), so `auto` falls back to the CPU silently and `cuda` fails with a reason.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from rnngen.checks import check_choice
from rnngen.errors import DeviceError

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
    check_choice("device", device, DEVICES)
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
    # onnxruntime's intra-op threads spin for a while after a run, ready for the next. Best when
    # runs come back to back (the CLI decoding: stopping them made a batch-1 step 1.3x slower on
    # 2 cores); a server turns it off, since its event loop needs the cores between two steps
    # (benchmarks/README.md, 2 cores: a fifth less CPU per token; 10% more tokens/s at 64 streams,
    # within the comparison's noise, 21% at 256).
    spin_between_runs: bool = True


def ort_session_options(options: SessionOptions | None = None):
    """The one place onnxruntime session options are made: quiet, the thread count asked for, and
    whether those threads spin between runs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: no warnings noise on the user's terminal
    if options and options.intra_op_threads:
        so.intra_op_num_threads = options.intra_op_threads
    if options and not options.spin_between_runs:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so
