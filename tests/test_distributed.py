"""Training on a chosen device and across processes (torchrun, DDP with gloo on the CPU).

The torchrun runs happen in a private network namespace (`unshare -rn`, loopback only): the
rendezvous store of torchrun listens on every interface, and a test must not be reachable
from outside. Without `unshare` they are skipped, saying why.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")


from rnngen.model.config import ModelConfig  # noqa: E402
from rnngen.errors import CheckpointError, InvalidParameterError  # noqa: E402
from rnngen.training.distributed import DIGEST_DIR_ENV, stream_rows  # noqa: E402
from rnngen.training.trainer import ChunkedStreams, TrainConfig, Trainer  # noqa: E402

from conftest import invoke  # noqa: E402

TINY = ModelConfig(cell="lstm", hidden_size=16, num_layers=2, dropout=0.1)
CUDA = torch.cuda.is_available()

# Brings the namespace's loopback up, then execs torchrun with the given arguments.
NETNS_LAUNCHER = """
import fcntl, os, socket, struct, sys
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    flags = struct.unpack("16sh22x", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sh22x", b"lo", 0)))[1]
    fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | IFF_UP))
os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *sys.argv[1:]])
"""



def test_ranks_share_out_the_single_process_streams():
    ids = np.arange(6 * 41)
    whole = ChunkedStreams(ids, 6, 8).data
    for world in (1, 2, 3, 6):
        parts = [ChunkedStreams(ids, 6, 8, stream_rows(6, rank, world)).data for rank in range(world)]
        assert all(p.shape == (6 // world, 41) for p in parts)
        assert torch.equal(torch.cat(parts), whole)  # together exactly the single-process layout
    with pytest.raises(InvalidParameterError, match="--batch-size: 6 streams do not split evenly over 4 processes"):
        stream_rows(6, 0, 4)


@pytest.mark.skipif(CUDA, reason="checks the error where torch cannot use CUDA")
def test_device_cuda_without_cuda_is_one_clear_line(corpus_file, tmp_path):
    result = invoke("train", corpus_file, "--out", tmp_path / "r", "--device", "cuda", "--steps", "2")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: --device cuda: CUDA cannot be used:") and "use --device cpu or auto" in result.stderr
    assert "Traceback" not in result.output + result.stderr and not (tmp_path / "r").exists()
    result = invoke("train", corpus_file, "--out", tmp_path / "r", "--device", "tpu")
    assert result.exit_code == 1 and "--device: 'tpu' is not one of auto, cpu, cuda" in result.stderr
    result = invoke("train", corpus_file, "--out", tmp_path / "r", "--precision", "fp8")
    assert result.exit_code == 1 and "precision: 'fp8' is not one of fp32, bf16" in result.stderr


def config(corpus_file, out, **kw):
    base = dict(data=str(corpus_file), out_dir=str(out), seq_len=16, batch_size=4, steps=8, eval_every=4,
                sample_tokens=0, plot=False, warmup_steps=2, lr=1e-2, threads=1, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_bf16_autocast_trains_and_keeps_fp32_state(corpus_file, tmp_path):
    trainer = Trainer(TINY, config(corpus_file, tmp_path / "r", precision="bf16", steps=12, lr=2e-2))
    dtypes = set()

    def training_dtype(module, args, out):
        if module.training:
            dtypes.add(out.dtype)
    trainer.model.decoder.register_forward_hook(training_dtype)
    trainer.run()
    assert torch.bfloat16 in dtypes  # the steps really ran under bf16 autocast
    losses = [v for _, v in trainer.history["train"]]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert all(s.dtype == torch.float32 for s in trainer.carry)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def _stop_at(trainer, step):
    def hook(report):
        if report.step == step:
            trainer.request_stop()
    trainer.on_step = hook


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_run_resumes_bit_for_bit_and_checkpoints_move_between_devices(corpus_file, tmp_path):
    straight = Trainer(TINY, config(corpus_file, tmp_path / "a", device="cuda"))
    straight.run()
    assert next(straight.model.parameters()).is_cuda
    first = Trainer(TINY, config(corpus_file, tmp_path / "b", device="cuda"))
    _stop_at(first, 5)
    first.run()
    resumed = Trainer(TINY, config(corpus_file, tmp_path / "b", device="cuda"), resume_from=tmp_path / "b" / "last.json")
    resumed.run()
    assert resumed.history == straight.history
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    on_cpu = Trainer(TINY, config(corpus_file, tmp_path / "a", device="cpu", steps=10), resume_from=tmp_path / "a" / "last.json")
    on_cpu.run()  # a GPU checkpoint continues on the CPU
    assert on_cpu.step == 10 and not next(on_cpu.model.parameters()).is_cuda


def _torchrun(args, cwd: Path, digest_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **{DIGEST_DIR_ENV: str(digest_dir)})
    command = ["unshare", "-rn", sys.executable, "-c", NETNS_LAUNCHER, "--standalone", "--nproc-per-node", "2",
               "-m", "rnngen", "train", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def _digests(folder: Path) -> list[str]:
    return [(folder / f"rank{r}.sha256").read_text().strip() for r in range(2)]


def _can_isolate() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -rn fails here: {probe.stderr.strip()}"


@pytest.mark.skipif(_can_isolate() is not None, reason=f"no private network namespace for torchrun: {_can_isolate()}")
def test_two_processes_with_torchrun_agree_learn_and_resume_exactly(corpus_file, tmp_path):
    # warm-up over all 12 steps: the learning rate of a step then does not depend on --steps,
    # so 6 steps + a resume to 12 must equal 12 straight steps bit for bit.
    common = ["--hidden", "16", "--layers", "2", "--dropout", "0.1", "--seq-len", "16", "--batch-size", "4",
              "--warmup", "12", "--lr", "0.03", "--eval-every", "3", "--sample-tokens", "0", "--no-plot",
              "--device", "cpu", "--threads", "1"]
    straight = _torchrun([corpus_file, "--out", "a", "--steps", "12", *common], tmp_path, tmp_path / "da")
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = " ".join(straight.stdout.split())  # rich wraps long lines
    assert "on cpu, 2 processes" in out and out.count("done: 12 steps") == 1  # rank 0 speaks for both
    a = _digests(tmp_path / "da")
    assert a[0] == a[1]  # every rank ends with the same weights

    meta = json.loads((tmp_path / "a" / "last.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 12
    losses = [v for _, v in meta["history"]["train"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses  # the loss falls

    first = _torchrun([corpus_file, "--out", "b", "--steps", "6", *common], tmp_path, tmp_path / "db1")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _torchrun([corpus_file, "--resume", "b", "--steps", "12", "--device", "cpu"], tmp_path, tmp_path / "db")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming b at step 6 of 12" in " ".join(resumed.stdout.split())
    assert _digests(tmp_path / "db") == a  # bit for bit
    assert json.loads((tmp_path / "b" / "last.json").read_text())["history"] == meta["history"]

    with pytest.raises(CheckpointError, match="trained by 2 process"):  # one process cannot take over two's run
        Trainer(TINY, config(corpus_file, tmp_path / "b", steps=14), resume_from=tmp_path / "b" / "last.json")
