"""`rnngen train`: truncated BPTT with carried state, clipping, AdamW with warm-up and cosine decay.

Data layout (as in char-rnn): the training split is cut into `batch_size`
contiguous streams; step i reads chunk i of every stream, so each row continues
the text its previous chunk ended on, and the hidden state is carried from one
chunk to the next (detached: gradients stop at the chunk boundary). At the end
of an epoch the streams start over from zero state. With several data-parallel
processes (torchrun), each trains on its own contiguous block of the streams
and DDP averages the gradients: together they compute what one process with
the whole batch computes (`distributed.py`).

Resume is exact: a checkpoint holds weights, optimizer moments, the torch RNG
states, the carried hidden state and the step, and everything else (learning
rate, which chunk comes next) is a function of the step.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from rnngen.checks import check_choice, check_int, check_number
from rnngen.corpus import read_corpus, split_text_at_line, split_train_val
from rnngen.errors import CheckpointError, DataError, InvalidParameterError, OverwriteRefusedError, TrainingDivergedError
from rnngen.model.config import ModelConfig
from rnngen.model.tokenizers import TokenizerKinds, build_tokenizer, check_tokenizer_kind, count_unknown, encode_document
from rnngen.training.checkpoint import load_checkpoint, restore_optimizer, save_checkpoint
from rnngen.training.distributed import PRECISIONS, Placement, resolve_device, stream_rows

RUN_FILES = ("last.json", "last.safetensors", "best.json", "best.safetensors", "loss.png")
# Tokenizers whose symbols are characters or bytes: the held-out part is the exact last fraction of the
# tokens (nanoGPT's split, so losses compare) and the vocabulary is every symbol of the corpus. Others
# (words) cut at the start of a line and build the vocabulary from the training part only.
SYMBOL_TOKENIZERS = ("char", "byte")
EVAL_EVERY_EPOCH = "epoch"


@dataclass(frozen=True)
class TrainConfig:
    data: str  # UTF-8 text file to train on
    out_dir: str  # run directory: checkpoints and loss curve
    tokenizer: str = "char"  # char, byte or word
    max_vocab: int = 10_000  # word tokenizer: vocabulary cap (rarer words become <unk>)
    seq_len: int = 128  # BPTT length: tokens per chunk, gradients flow this far back
    batch_size: int = 32  # parallel streams per step
    lr: float = 2e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    weight_decay: float = 0.01  # AdamW decay on weight matrices (not biases)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables
    steps: int = 5000  # optimizer steps in all
    val_fraction: float = 0.1  # held-out share at the end of the corpus (unless val_file is given)
    val_file: str | None = None  # a separate UTF-8 validation text instead of the held-out share
    eval_every: int | str = 250  # steps between validation, samples and checkpoints, or "epoch"
    sample_tokens: int = 200  # tokens in the sample printed at each evaluation (0: none)
    plot: bool = True  # write loss.png at each evaluation
    seed: int = 1337  # seeds weights, dropout and samples
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    device: str = "auto"  # auto (CUDA where torch sees a GPU), cpu or cuda
    precision: str = "fp32"  # fp32 (TF32 matrix math on GPUs that have it) or bf16 (autocast)

    def __post_init__(self) -> None:
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise InvalidParameterError.about("{tokenizer}: {value!r} is not a tokenizer kind", value=self.tokenizer)
        check_choice("precision", self.precision, PRECISIONS)
        ints = [("max_vocab", 3, 10_000_000), ("seq_len", 1, 100_000), ("batch_size", 1, 1_000_000),
                ("warmup_steps", 0, 10**9), ("steps", 1, 10**9), ("sample_tokens", 0, 100_000),
                ("seed", 0, 2**63 - 1), ("threads", 0, 4096)]
        if self.eval_every != EVAL_EVERY_EPOCH:
            ints.append(("eval_every", 1, 10**9))
        for name, lo, hi in ints:
            check_int(name, getattr(self, name), lo, hi)
        for name, lo, hi, lo_open in (
            ("lr", 0.0, 10.0, True), ("min_lr_ratio", 0.0, 1.0, False), ("weight_decay", 0.0, 10.0, False),
            ("grad_clip", 0.0, 1e6, False), ("val_fraction", 0.0, 0.9, True),
        ):
            check_number(name, getattr(self, name), lo, hi, lo_open=lo_open)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against targets (B, T), read time-major as the model lays logits out."""
    by_time = logits.transpose(0, 1)  # (T, B, V), contiguous for RNNLanguageModel's output
    return F.cross_entropy(by_time.reshape(-1, by_time.shape[-1]).float(), targets.t().reshape(-1), reduction=reduction)


class ChunkedStreams:
    """`batch` contiguous streams over a token array, read `seq_len` tokens at a time.

    `rows` keeps only some of the streams (a data-parallel rank's share), on `device`.
    """

    def __init__(self, ids: np.ndarray, batch: int, seq_len: int, rows: slice = slice(None),
                 device: torch.device | None = None):
        per_stream = len(ids) // batch
        streams = ids[: per_stream * batch].reshape(batch, per_stream)[rows]  # (B_rank, N)
        self.data = torch.from_numpy(np.ascontiguousarray(streams)).to(device)
        self.seq_len = seq_len
        self.chunks = (per_stream - 1) // seq_len  # each chunk needs seq_len inputs + 1 target

    def chunk(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.seq_len
        x = self.data[:, start : start + self.seq_len]  # (B, T)
        y = self.data[:, start + 1 : start + self.seq_len + 1]  # (B, T), next tokens
        return x, y


@dataclass
class StepReport:
    step: int
    loss: float
    lr: float
    tokens_per_s: float


@dataclass
class EvalReport:
    step: int
    val_loss: float  # nats per token
    sample: str


class Trainer:
    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, resume_from: Path | None = None,
                 force: bool = False, on_step: Callable[[StepReport], None] | None = None,
                 on_eval: Callable[[EvalReport], None] | None = None, epochs: float | None = None,
                 placement: Placement | None = None, tokenizers: TokenizerKinds | None = None):
        """`tokenizers`: the kinds --tokenizer may name (None: the built-ins; the CLI passes the plugins' too)."""
        self.cfg = train_cfg
        self.on_step = on_step or (lambda r: None)
        self.on_eval = on_eval or (lambda r: None)
        self.run_dir = Path(train_cfg.out_dir)
        self.placement = placement or Placement(resolve_device(train_cfg.device))
        self.device = self.placement.device
        self._stop_requested = False
        if train_cfg.threads:
            torch.set_num_threads(train_cfg.threads)

        check_tokenizer_kind(train_cfg.tokenizer, tokenizers)  # before reading a large corpus
        self._tokenizer_kinds = tokenizers
        checkpoint = load_checkpoint(resume_from, tokenizers) if resume_from else None
        train_ids, val_ids = self._read_data(train_cfg, checkpoint)
        if checkpoint is not None:
            model_cfg = checkpoint.config
        else:
            model_cfg = dataclasses.replace(model_cfg, vocab_size=self.tokenizer.vocab_size)
        needed = train_cfg.batch_size * (train_cfg.seq_len + 1)
        if len(train_ids) < needed:
            raise DataError(
                f"corpus too short: the training split has {len(train_ids)} tokens, one batch needs "
                f"batch_size x (seq_len + 1) = {needed}; lower --batch-size or --seq-len, or use more text"
            )
        if len(val_ids) < 2:
            raise DataError(f"validation split has {len(val_ids)} tokens, at least 2 are needed; raise --val-fraction or use a longer --val-file")
        rank, world = self.placement.rank, self.placement.world_size
        self.train = ChunkedStreams(train_ids, train_cfg.batch_size, train_cfg.seq_len,
                                    stream_rows(train_cfg.batch_size, rank, world), self.device)
        if epochs is not None:
            if not (math.isfinite(epochs) and epochs > 0):
                raise InvalidParameterError.about("{epochs}: {value!r} is not a positive number", value=epochs)
            train_cfg = dataclasses.replace(train_cfg, steps=max(1, math.ceil(epochs * self.train.chunks)))
            self.cfg = train_cfg
        self.eval_interval = self.train.chunks if train_cfg.eval_every == EVAL_EVERY_EPOCH else train_cfg.eval_every
        # Validation streams, shared out over the ranks (any split works: each stream has its own state).
        val_streams = max(1, min(train_cfg.batch_size, (len(val_ids) - 1) // 64))
        self.val_data = ChunkedStreams(val_ids, val_streams, 1, slice(rank, None, world), self.device).data  # (S_rank, N)

        torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank
        from rnngen.training.model import RNNLanguageModel

        self.model = RNNLanguageModel(model_cfg).to(self.device)
        if rank > 0:  # rank 0 continues the seed's stream as a single process does; the others draw their own dropout
            torch.manual_seed(train_cfg.seed + rank)
        self.forward_model: torch.nn.Module = self.model
        if self.placement.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.forward_model = DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=train_cfg.lr, betas=(0.9, 0.99),
        )
        self.step = 0
        self.history: dict[str, list] = {"train": [], "val": []}
        self.best_val = math.inf
        self.train_seconds = 0.0
        self.carry = self.model.initial_state(self.train.data.shape[0], self.device)
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            self._claim_run_dir(force)

    def _read_data(self, cfg: TrainConfig, checkpoint) -> tuple[np.ndarray, np.ndarray]:
        """Training and validation ids; sets the tokenizer (the checkpoint's, or built here) and the corpus summary."""
        text = read_corpus(cfg.data)
        val_text = read_corpus(cfg.val_file) if cfg.val_file else None
        symbols = cfg.tokenizer in SYMBOL_TOKENIZERS
        train_text = text
        if val_text is None and not symbols:
            train_text, val_text = split_text_at_line(text, cfg.val_fraction)
        if checkpoint is not None:
            self.tokenizer = checkpoint.tokenizer
        else:  # characters: every symbol of the corpus (a set, as nanoGPT); words: the training part only
            fit_on = train_text if not symbols else text + (val_text or "")
            self.tokenizer = build_tokenizer(cfg.tokenizer, fit_on, cfg.max_vocab, self._tokenizer_kinds)
        policy = "replace" if checkpoint is not None else "error"
        if val_text is None:  # the exact last fraction of the tokens
            ids = np.asarray(encode_document(self.tokenizer, text, policy), dtype=np.int64)
            train_ids, val_ids = split_train_val(ids, cfg.val_fraction)
        else:
            train_ids = np.asarray(encode_document(self.tokenizer, train_text, policy), dtype=np.int64)
            val_ids = np.asarray(encode_document(self.tokenizer, val_text, "replace"), dtype=np.int64)
        self.corpus = {"name": Path(cfg.data).name, "chars": len(text), "tokens": int(len(train_ids) + len(val_ids)),
                       "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids))}
        if cfg.val_file:
            self.corpus["val_name"] = Path(cfg.val_file).name
        if val_text is not None:  # words outside a vocabulary fitted on the training part become <unk>
            unknown = (count_unknown(self.tokenizer, train_text), count_unknown(self.tokenizer, val_text))
            if None not in unknown:
                self.corpus["train_unknown"], self.corpus["val_unknown"] = unknown
        return train_ids, val_ids

    # -- run directory and checkpoints -------------------------------------------------

    def _claim_run_dir(self, force: bool) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise OverwriteRefusedError(f"output path {self.run_dir} exists and is not a directory")
        if self.run_dir.is_dir() and any(self.run_dir.iterdir()):
            if not force:
                raise OverwriteRefusedError(
                    f"run directory {self.run_dir} already exists and is not empty; "
                    "use --resume to continue it, --force to start over in it, or another --out"
                )
            if self.placement.is_main:  # only rnngen's own files; anything else of the user's stays
                for name in RUN_FILES:
                    (self.run_dir / name).unlink(missing_ok=True)
        if self.placement.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def _meta(self) -> dict:
        return {
            "model": self.model.config.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "train": dataclasses.asdict(self.cfg),
            "step": self.step,
            "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
            "train_seconds": self.train_seconds,
            "parameters": self.model.num_parameters(),
            "corpus": self.corpus,
            "world_size": self.placement.world_size,
            "history": self.history,
        }

    def _rng_states(self) -> dict[str, torch.Tensor]:
        """This rank's RNG states, gathered from every rank (a collective: every rank calls it)."""
        states = {}
        kinds = [("torch", torch.get_rng_state)]
        if self.device.type == "cuda":
            kinds.append(("cuda", lambda: torch.cuda.get_rng_state(self.device)))
        for kind, get in kinds:
            for rank, state in enumerate(self.placement.gather_bytes(get())):
                states[f"rng.{kind}" + (f".{rank}" if rank else "")] = state
        return states

    def _save(self, name: str, rng_states: dict[str, torch.Tensor]) -> None:
        carry = tuple(self.placement.gather_rows(s, dim=1) for s in self.carry)  # (L, B, H): every rank's rows
        if self.placement.is_main:
            save_checkpoint(self.run_dir, name, self.model, self.optimizer, self._meta(), carry, rng_states)

    def _restore(self, ckpt) -> None:
        meta = ckpt.meta
        saved = meta["train"]
        if saved["seq_len"] != self.cfg.seq_len or saved["batch_size"] != self.cfg.batch_size:
            raise CheckpointError("resume: seq_len and batch_size must match the checkpoint's")
        saved_world, world = meta.get("world_size", 1), self.placement.world_size
        if saved_world != world:
            raise CheckpointError(
                f"resume: the run was trained by {saved_world} process(es), this is {world}; resume it with "
                f"the same number (torchrun --nnodes x --nproc-per-node = {saved_world}, or plain rnngen for 1)"
            )
        rank, rows = self.placement.rank, stream_rows(self.cfg.batch_size, self.placement.rank, world)
        suffix = f".{rank}" if rank else ""
        try:
            self.model.load_weights(ckpt.model_state())
            restore_optimizer(self.optimizer, ckpt)
            self.carry = tuple(ckpt.tensors[f"carry.{s}"][:, rows].to(self.device).clone()
                               for s in self.model.config.state_names)
            torch.set_rng_state(ckpt.tensors[f"rng.torch{suffix}"])
            if self.device.type == "cuda" and f"rng.cuda{suffix}" in ckpt.tensors:  # absent: a run moved from the CPU
                torch.cuda.set_rng_state(ckpt.tensors[f"rng.cuda{suffix}"], self.device)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint does not fit this model: {exc}") from None
        self.step = meta["step"]
        self.history = meta["history"]
        self.best_val = meta["best_val_loss"] if meta["best_val_loss"] is not None else math.inf
        self.train_seconds = meta.get("train_seconds", 0.0)

    # -- evaluation -------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss (nats) over the validation split, read as parallel streams with carried state."""
        self.model.eval()
        data = self.val_data  # (S, N): this rank's validation streams
        state = self.model.initial_state(data.shape[0], self.device)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        span = 512
        for start in range(0, data.shape[1] - 1 if data.shape[0] else 0, span):  # a rank may have no stream
            x = data[:, start : min(start + span, data.shape[1] - 1)]
            y = data[:, start + 1 : start + 1 + x.shape[1]]
            with self._autocast():
                logits, state = self.model(x, state)
            total += next_token_loss(logits, y, reduction="sum")
        self.model.train()
        count = data.shape[0] * max(0, data.shape[1] - 1)
        total_all, count_all = self.placement.all_sum([total.item(), float(count)])
        return total_all / count_all

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 0.8) -> str:
        """A sample from the model as it is now, with its own generator (training's RNG stream is untouched)."""
        if n <= 0:
            return ""
        self.model.eval()
        gen = torch.Generator().manual_seed(self.cfg.seed + self.step)
        token = torch.tensor([self.tokenizer.start_ids()], device=self.device)
        state = self.model.initial_state(1, self.device)
        decoder = self.tokenizer.stream_decoder()
        pieces = []
        for _ in range(n):
            logits, state = self.model(token, state)
            probs = torch.softmax(logits[0, -1].float().cpu() / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
            pieces.append(decoder.push(nxt))
            token = torch.tensor([[nxt]], device=self.device)
        self.model.train()
        return "".join(pieces) + decoder.flush()

    # -- training loop ------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop after the current step, saving a checkpoint to resume from (Ctrl-C does this)."""
        self._stop_requested = True

    def run(self) -> None:
        previous = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        except ValueError:  # not the main thread: no handler, request_stop still works
            previous = None
        try:
            self._loop()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step on the next chunk: (loss over the whole batch, learning rate)."""
        cfg = self.cfg
        chunk = self.step % self.train.chunks
        if chunk == 0:  # a new epoch: streams start over from zero state
            self.carry = self.model.initial_state(self.train.data.shape[0], self.device)
        lr = learning_rate(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.train.chunk(chunk)
        with self._autocast():
            logits, carry = self.forward_model(x, self.carry)
            loss = next_token_loss(logits, y)
        # Every rank learns the whole batch's loss before going on, so a NaN anywhere stops every rank here.
        (loss_value,) = self.placement.all_mean([loss.item()])
        if not math.isfinite(loss_value):
            kept = " (kept: last.* in the run directory)" if (self.run_dir / "last.json").exists() else ""
            raise TrainingDivergedError(
                f"loss became {loss_value} at step {self.step + 1}; stopped without saving{kept}. "
                "Try a lower --lr or a --grad-clip"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.carry = tuple(s.detach().float() for s in carry)  # truncated BPTT: keep the state, drop the graph
        self.step += 1
        return loss_value, lr

    def _loop(self) -> None:
        cfg = self.cfg
        self.model.train()
        tokens_per_step = cfg.batch_size * cfg.seq_len  # the whole batch, every rank's streams
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            loss_value, lr = self.train_step()
            elapsed = time.perf_counter() - t0
            self.train_seconds += elapsed
            self.history["train"].append([self.step, loss_value])
            self.on_step(StepReport(self.step, loss_value, lr, tokens_per_step / max(elapsed, 1e-9)))
            stop = self.placement.any(self._stop_requested)  # a stop on any rank stops all of them after this step

            if self.step % self.eval_interval == 0 or self.step == cfg.steps:
                self._evaluate_and_save(self._rng_states())
            elif stop:
                self._save("last", self._rng_states())
            if stop:  # checked only between steps, so the checkpoint is consistent
                return

    def _evaluate_and_save(self, rng_states: dict[str, torch.Tensor]) -> None:
        val_loss = self.evaluate()
        if not math.isfinite(val_loss):
            raise TrainingDivergedError(f"validation loss became {val_loss} at step {self.step}; last good checkpoint kept")
        self.history["val"].append([self.step, val_loss])
        improved = val_loss < self.best_val
        if improved:
            self.best_val = val_loss
        self._save("last", rng_states)
        if not self.placement.is_main:
            return
        if improved:
            for suffix in (".safetensors", ".json"):
                shutil.copyfile(self.run_dir / f"last{suffix}", self.run_dir / f"best{suffix}.tmp")
            for suffix in (".safetensors", ".json"):
                (self.run_dir / f"best{suffix}.tmp").replace(self.run_dir / f"best{suffix}")
        if self.cfg.plot:
            from rnngen.training.plot import plot_losses

            plot_losses(self.history, self.run_dir / "loss.png")
        self.on_eval(EvalReport(self.step, val_loss, self.sample(self.cfg.sample_tokens)))
