"""Training speed: rnngen's training step against plain PyTorch, measured side by side in one run.

    python benchmarks/train.py                          # 2x512 LSTM, batch 128 x 128 tokens, CPU
    python benchmarks/train.py --device cuda            # the same on a GPU
    python benchmarks/train.py --batch 32 --rounds 3    # smaller, for a slow CPU

Contenders, each the same model (embedding, stacked LSTM, linear decoder tied to the
embedding, dropout 0.2 on embedding, between layers and before the decoder) on the same
batch shape with AdamW and gradient-norm clipping at 1.0:
  rnngen       `Trainer.train_step()`: one step of `rnngen train` (chunk of the carried
               streams, learning-rate schedule, loss agreed over ranks, NaN check)
  plain        `nn.LSTM` in its default (time, batch) layout, as pytorch/examples'
               word_language_model writes it, with the state carried and detached
Both read the loss back each step (as a training loop that logs it does). Rounds interleave
the two; each reports the median time per step. Target: rnngen >= 0.9x plain tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rnngen.model.config import ModelConfig  # noqa: E402
from rnngen.training.trainer import TrainConfig, Trainer  # noqa: E402

DROPOUT = 0.2
LR = 2e-3


class PlainLSTM(nn.Module):
    """The baseline: a character LSTM language model as plain PyTorch code writes it."""

    def __init__(self, vocab: int, hidden: int, layers: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, dropout=DROPOUT)
        self.drop = nn.Dropout(DROPOUT)
        self.decoder = nn.Linear(hidden, vocab)
        self.decoder.weight = self.embedding.weight

    def forward(self, tokens, state):  # tokens (T, B)
        out, state = self.lstm(self.drop(self.embedding(tokens)), state)
        return self.decoder(self.drop(out)), state  # (T, B, V)


def plain_step_fn(args, device: torch.device):
    torch.manual_seed(0)
    model = PlainLSTM(args.vocab, args.hidden, args.layers).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (args.seq_len + 1, args.batch), generator=gen).to(device)  # (T + 1, B)
    zeros = torch.zeros(args.layers, args.batch, args.hidden, device=device)
    state = [(zeros, zeros)]

    def step() -> float:
        x, y = data[:-1], data[1:]
        logits, new = model(x, state[0])
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        state[0] = tuple(s.detach() for s in new)
        return loss.item()

    return step


def rnngen_step_fn(args, device: torch.device, folder: Path):
    """A Trainer on a random text of `vocab` symbols, long enough that the timed steps never wrap an epoch."""
    steps = 2 + 2 * args.rounds * args.steps_per_round
    symbols = np.array([chr(0x21 + i) for i in range(args.vocab)])
    tokens = int(args.batch * (args.seq_len * (steps + 2) + 1) / 0.85)  # 10% of it is held out
    corpus = folder / "corpus.txt"
    corpus.write_text("".join(symbols[np.random.default_rng(0).integers(0, args.vocab, tokens)]))
    cfg = TrainConfig(data=str(corpus), out_dir=str(folder / "run"), seq_len=args.seq_len, batch_size=args.batch,
                      steps=steps, lr=LR, val_fraction=0.1, sample_tokens=0, plot=False, device=device.type,
                      precision=args.precision)
    trainer = Trainer(ModelConfig(cell="lstm", hidden_size=args.hidden, num_layers=args.layers, dropout=DROPOUT), cfg)
    trainer.model.train()
    assert trainer.model.config.vocab_size == args.vocab and trainer.model.config.tied
    return lambda: trainer.train_step()[0]


def timed(step, device: torch.device, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=65)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="rnngen's --precision (the baseline stays fp32)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from rnngen.training.distributed import start

    device = start(args.device).device  # the same device checks and TF32 setting as `rnngen train`
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"rnngen training benchmark: torch {torch.__version__}, {device.type} ({name}); "
          f"medians of {args.rounds} interleaved rounds x {args.steps_per_round} steps")
    with tempfile.TemporaryDirectory() as tmp:
        contenders = {"rnngen": rnngen_step_fn(args, device, Path(tmp)), "plain": plain_step_fn(args, device)}
        for step in contenders.values():  # warm-up: allocator, cuDNN plans, optimizer state
            timed(step, device, 2)
        samples: dict[str, list[float]] = {k: [] for k in contenders}
        for r in range(args.rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for key in order:
                samples[key] += timed(contenders[key], device, args.steps_per_round)
    tokens = args.batch * args.seq_len
    rate = {k: tokens / statistics.median(v) for k, v in samples.items()}
    print(f"lstm {args.layers}x{args.hidden} | batch {args.batch} x {args.seq_len} | {device.type} | "
          f"rnngen ({args.precision}) {rate['rnngen']:,.0f} tok/s vs plain PyTorch nn.LSTM {rate['plain']:,.0f} tok/s | "
          f"ratio {rate['rnngen'] / rate['plain']:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
