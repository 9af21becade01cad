"""`rnngen train`: truncated BPTT with carried state, clipping, AdamW with warm-up and cosine decay.

Data layout (as in char-rnn): the training split is cut into `batch_size`
contiguous streams; step i reads chunk i of every stream, so each row continues
the text its previous chunk ended on, and the hidden state is carried from one
chunk to the next (detached: gradients stop at the chunk boundary). At the end
of an epoch the streams start over from zero state.

Resume is exact: a checkpoint holds weights, optimizer moments, the torch RNG
state, the carried hidden state and the step, and everything else (learning
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

from rnngen.model.config import ModelConfig
from rnngen.corpus import read_corpus, split_train_val
from rnngen.checks import check_int, check_number
from rnngen.errors import CheckpointError, DataError, InvalidParameterError, OverwriteRefusedError, TrainingDivergedError
from rnngen.model.tokenizers import TokenizerKinds, build_tokenizer, check_tokenizer_kind
from rnngen.training.checkpoint import load_checkpoint, restore_optimizer, save_checkpoint

RUN_FILES = ("last.json", "last.safetensors", "best.json", "best.safetensors", "loss.png")


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
    val_fraction: float = 0.1  # held-out share at the end of the corpus
    eval_every: int = 250  # steps between validation, samples and checkpoints
    sample_tokens: int = 200  # tokens in the sample printed at each evaluation (0: none)
    seed: int = 1337  # seeds weights, dropout and samples
    threads: int = 0  # torch CPU threads; 0 keeps torch's default

    def __post_init__(self) -> None:
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise InvalidParameterError.about("{tokenizer}: {value!r} is not a tokenizer kind", value=self.tokenizer)
        for name, lo, hi in (
            ("max_vocab", 3, 10_000_000), ("seq_len", 1, 100_000), ("batch_size", 1, 1_000_000),
            ("warmup_steps", 0, 10**9), ("steps", 1, 10**9), ("eval_every", 1, 10**9),
            ("sample_tokens", 0, 100_000), ("seed", 0, 2**63 - 1), ("threads", 0, 4096),
        ):
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


class ChunkedStreams:
    """`batch` contiguous streams over a token array, read `seq_len` tokens at a time."""

    def __init__(self, ids: np.ndarray, batch: int, seq_len: int):
        per_stream = len(ids) // batch
        self.data = torch.from_numpy(np.ascontiguousarray(ids[: per_stream * batch].reshape(batch, per_stream)))
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
                 tokenizers: TokenizerKinds | None = None):
        """`tokenizers`: the kinds --tokenizer may name (None: the built-ins; the CLI passes the plugins' too)."""
        self.cfg = train_cfg
        self.on_step = on_step or (lambda r: None)
        self.on_eval = on_eval or (lambda r: None)
        self.run_dir = Path(train_cfg.out_dir)
        self._stop_requested = False
        if train_cfg.threads:
            torch.set_num_threads(train_cfg.threads)

        check_tokenizer_kind(train_cfg.tokenizer, tokenizers)  # before reading a large corpus
        text = read_corpus(train_cfg.data)
        checkpoint = load_checkpoint(resume_from, tokenizers) if resume_from else None
        if checkpoint is not None:
            self.tokenizer = checkpoint.tokenizer
            model_cfg = checkpoint.config
        else:
            self.tokenizer = build_tokenizer(train_cfg.tokenizer, text, train_cfg.max_vocab, tokenizers)
            model_cfg = dataclasses.replace(model_cfg, vocab_size=self.tokenizer.vocab_size)
        ids = np.asarray(self.tokenizer.encode(text, on_unknown="replace" if checkpoint else "error"), dtype=np.int64)
        train_ids, val_ids = split_train_val(ids, train_cfg.val_fraction)
        needed = train_cfg.batch_size * (train_cfg.seq_len + 1)
        if len(train_ids) < needed:
            raise DataError(
                f"corpus too short: the training split has {len(train_ids)} tokens, one batch needs "
                f"batch_size x (seq_len + 1) = {needed}; lower --batch-size or --seq-len, or use more text"
            )
        if len(val_ids) < 2:
            raise DataError(f"validation split has {len(val_ids)} tokens, at least 2 are needed; raise --val-fraction")
        self.corpus = {"name": Path(train_cfg.data).name, "chars": len(text), "tokens": int(len(ids)),
                       "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids))}
        self.train = ChunkedStreams(train_ids, train_cfg.batch_size, train_cfg.seq_len)
        if epochs is not None:
            if not (math.isfinite(epochs) and epochs > 0):
                raise InvalidParameterError.about("{epochs}: {value!r} is not a positive number", value=epochs)
            train_cfg = dataclasses.replace(train_cfg, steps=max(1, math.ceil(epochs * self.train.chunks)))
            self.cfg = train_cfg
        self.val_ids = val_ids

        torch.manual_seed(train_cfg.seed)
        from rnngen.training.model import RNNLanguageModel

        self.model = RNNLanguageModel(model_cfg)
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
        self.carry = self.model.initial_state(train_cfg.batch_size)
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            self._claim_run_dir(force)

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
            for name in RUN_FILES:  # only rnngen's own files; anything else of the user's stays
                (self.run_dir / name).unlink(missing_ok=True)
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
            "history": self.history,
        }

    def _save(self, name: str, rng_state: torch.Tensor) -> None:
        save_checkpoint(self.run_dir, name, self.model, self.optimizer, self._meta(), self.carry, rng_state)

    def _restore(self, ckpt) -> None:
        meta = ckpt.meta
        saved = meta["train"]
        if saved["seq_len"] != self.cfg.seq_len or saved["batch_size"] != self.cfg.batch_size:
            raise CheckpointError("resume: seq_len and batch_size must match the checkpoint's")
        try:
            self.model.load_weights(ckpt.model_state())
            restore_optimizer(self.optimizer, ckpt)
            self.carry = tuple(ckpt.tensors[f"carry.{s}"].clone() for s in self.model.config.state_names)
            torch.set_rng_state(ckpt.tensors["rng.torch"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint does not fit this model: {exc}") from None
        self.step = meta["step"]
        self.history = meta["history"]
        self.best_val = meta["best_val_loss"] if meta["best_val_loss"] is not None else math.inf
        self.train_seconds = meta.get("train_seconds", 0.0)

    # -- evaluation -------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss (nats) over the validation split, read as parallel streams with carried state."""
        self.model.eval()
        streams = max(1, min(self.cfg.batch_size, (len(self.val_ids) - 1) // 64))
        val = ChunkedStreams(self.val_ids, streams, 1)
        data = val.data  # (S, N)
        state = self.model.initial_state(streams)
        total, count = 0.0, 0
        span = 512
        for start in range(0, data.shape[1] - 1, span):
            x = data[:, start : min(start + span, data.shape[1] - 1)]
            y = data[:, start + 1 : start + 1 + x.shape[1]]
            logits, state = self.model(x, state)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
            count += y.numel()
        self.model.train()
        return total / count

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 0.8) -> str:
        """A sample from the model as it is now, with its own generator (training's RNG stream is untouched)."""
        if n <= 0:
            return ""
        self.model.eval()
        gen = torch.Generator().manual_seed(self.cfg.seed + self.step)
        token = torch.tensor([self.tokenizer.start_ids()])
        state = self.model.initial_state(1)
        decoder = self.tokenizer.stream_decoder()
        pieces = []
        for _ in range(n):
            logits, state = self.model(token, state)
            probs = torch.softmax(logits[0, -1] / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
            pieces.append(decoder.push(nxt))
            token = torch.tensor([[nxt]])
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

    def _loop(self) -> None:
        cfg = self.cfg
        self.model.train()
        tokens_per_step = cfg.batch_size * cfg.seq_len
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            chunk = self.step % self.train.chunks
            if chunk == 0:  # a new epoch: streams start over from zero state
                self.carry = self.model.initial_state(cfg.batch_size)
            lr = learning_rate(self.step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x, y = self.train.chunk(chunk)
            logits, carry = self.model(x, self.carry)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss_value = loss.item()
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
            self.carry = tuple(s.detach() for s in carry)  # truncated BPTT: keep the state, drop the graph
            self.step += 1
            elapsed = time.perf_counter() - t0
            self.train_seconds += elapsed
            self.history["train"].append([self.step, loss_value])
            self.on_step(StepReport(self.step, loss_value, lr, tokens_per_step / max(elapsed, 1e-9)))

            rng_now = torch.get_rng_state()
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                self._evaluate_and_save(rng_now)
            elif self._stop_requested:
                self._save("last", rng_now)
            if self._stop_requested:  # checked only between steps, so the checkpoint is consistent
                return

    def _evaluate_and_save(self, rng_state: torch.Tensor) -> None:
        val_loss = self.evaluate()
        if not math.isfinite(val_loss):
            raise TrainingDivergedError(f"validation loss became {val_loss} at step {self.step}; last good checkpoint kept")
        self.history["val"].append([self.step, val_loss])
        improved = val_loss < self.best_val
        if improved:
            self.best_val = val_loss
        self._save("last", rng_state)
        if improved:
            for suffix in (".safetensors", ".json"):
                shutil.copyfile(self.run_dir / f"last{suffix}", self.run_dir / f"best{suffix}.tmp")
            for suffix in (".safetensors", ".json"):
                (self.run_dir / f"best{suffix}.tmp").replace(self.run_dir / f"best{suffix}")
        from rnngen.training.plot import plot_losses

        plot_losses(self.history, self.run_dir / "loss.png")
        self.on_eval(EvalReport(self.step, val_loss, self.sample(self.cfg.sample_tokens)))
