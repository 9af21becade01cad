"""Where a training process runs: its device, and its place among data-parallel processes.

One process trains on one device (`--device auto|cpu|cuda`). Under `torchrun`
(which sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address) several
processes train one model with PyTorch DDP: NCCL between GPUs, gloo between
CPU processes. Every rank reads the same corpus and keeps its own share of the
batch's streams (`stream_rows`), so the ranks together read exactly what one
process with the whole batch reads; DDP averages the gradients, rank 0 writes
checkpoints and the display.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from rnngen.checks import check_choice
from rnngen.errors import DeviceError, InvalidParameterError, RnngenError
from rnngen.model.devices import DEVICES

PRECISIONS = ("fp32", "bf16")
# Environment hook (tests, debugging): each rank writes the SHA-256 of its parameters to DIR/rank<R>.sha256
# when training ends, so that runs and ranks can be compared bit for bit from outside.
DIGEST_DIR_ENV = "RNNGEN_DEBUG_PARAM_DIGEST_DIR"

T = TypeVar("T")


def cuda_unusable_reason() -> str | None:
    """Why torch cannot train on CUDA here, or None when it can."""
    if not torch.backends.cuda.is_built():
        return f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch"
    if not torch.cuda.is_available():
        return "torch sees no usable CUDA GPU (no GPU visible, or the NVIDIA driver is missing or too old)"
    return None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """--device auto|cpu|cuda → a torch device; `cuda` fails with the reason where it cannot be used."""
    check_choice("device", name, DEVICES)
    if name == "cpu":
        return torch.device("cpu")
    reason = cuda_unusable_reason()
    if reason is not None:
        if name == "cuda":
            raise DeviceError(f"--device cuda: CUDA cannot be used: {reason}; use --device cpu or auto")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError(f"--device {name}: process {local_rank} on this machine needs GPU {local_rank}, "
                          f"but only {count} are visible; start at most {count} processes per machine")
    return torch.device("cuda", local_rank)


def allow_tf32() -> None:
    """fp32 weights, TF32 tensor-core math for matrix products on GPUs that have it."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.fp32_precision = "tf32"


@dataclass(frozen=True)
class Placement:
    """This process's device and its rank among `world_size` data-parallel processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, the loss plot and the display."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def agree(self, make: Callable[[], T]) -> T:
        """Run `make` on every rank; if it fails anywhere, fail everywhere (no rank waits forever for another)."""
        error: RnngenError | None = None
        try:
            value = make()
        except RnngenError as exc:
            error = exc
        if self.distributed:
            failed = torch.tensor([float(error is not None)], device=self.device)
            dist.all_reduce(failed)
            if failed.item() and error is None:
                raise RnngenError("another training process failed to start; its message is in its output")
        if error is not None:
            raise error
        return value

    def all_mean(self, values: list[float]) -> list[float]:
        """The mean of each value over the ranks (the values themselves in a single process)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (a stop request reaches all of them)."""
        return bool(self.all_sum([float(flag)])[0]) if self.distributed else flag

    def gather_rows(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's slice of a batch-sharded tensor, put back together along `dim` (on every rank)."""
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=dim)

    def gather_bytes(self, data: torch.Tensor) -> list[torch.Tensor]:
        """A uint8 tensor (an RNG state) from every rank, in rank order, on the CPU."""
        if not self.distributed:
            return [data]
        local = data.to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return [p.cpu() for p in parts]


def stream_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """The rows (streams) of the global batch that `rank` trains on: a contiguous block of batch_size / world_size."""
    if batch_size % world_size:
        raise InvalidParameterError(
            f"--batch-size: {batch_size} streams do not split evenly over {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    per_rank = batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def torchrun_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise InvalidParameterError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None


def start(device: str) -> Placement:
    """This process's placement; joins torchrun's process group when there are several processes."""
    rank, world_size, local_rank = torchrun_world()
    target = resolve_device(device, local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
        allow_tf32()
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        kwargs = {"device_id": target} if target.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    return Placement(target, rank, world_size)


def stop(placement: Placement) -> None:
    if placement.distributed and dist.is_initialized():
        try:  # every rank done with its collectives before any tears the group down
            dist.barrier()
        finally:
            dist.destroy_process_group()


def write_param_digest(model: torch.nn.Module, placement: Placement) -> None:
    """With RNNGEN_DEBUG_PARAM_DIGEST_DIR set: this rank's parameter digest, for comparing ranks and runs."""
    folder = os.environ.get(DIGEST_DIR_ENV)
    if not folder:
        return
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{placement.rank}.sha256"), "w") as f:
        f.write(digest.hexdigest() + "\n")
