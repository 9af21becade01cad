"""`rnngen train` and `rnngen export` (torch is imported inside them, never at start-up)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console

from rnngen.cli.console import EXIT_INTERRUPTED
from rnngen.errors import MissingExtraError

TRAIN_EXTRA = ("torch", "safetensors", "matplotlib")  # pyproject's `train` extra


@contextlib.contextmanager
def _train_extra() -> Iterator[None]:
    """A module of the train extra missing (the runtime install) is one line on how to install it."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in TRAIN_EXTRA:
            raise
        raise MissingExtraError(
            f"training and export need the train extra, and {exc.name} is not installed: install torch first "
            "(the CPU build, or a CUDA one), then pip install 'rnngen[train]'") from None


def train(
    data: Path = typer.Argument(..., help="UTF-8 text file to train on."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", show_default="runs/CELL", help="Run directory for checkpoints and the loss curve."),
    cell: str = typer.Option("lstm", help="Recurrent cell: rnn, lstm or gru."),
    layers: int = typer.Option(2, help="Number of stacked recurrent layers."),
    hidden: int = typer.Option(512, help="Hidden units per layer."),
    embedding: int = typer.Option(0, help="Embedding size; 0 means equal to --hidden."),
    tokenizer: str = typer.Option("char", help="Tokenizer: char, byte or word."),
    max_vocab: int = typer.Option(10_000, help="Word tokenizer: keep this many most frequent words."),
    seq_len: int = typer.Option(128, help="Truncated BPTT length in tokens."),
    batch_size: int = typer.Option(32, help="Parallel streams per step."),
    lr: float = typer.Option(2e-3, help="Peak learning rate (AdamW)."),
    warmup: int = typer.Option(100, help="Linear warm-up steps."),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay on weight matrices."),
    dropout: float = typer.Option(0.2, help="Dropout on embedding, between layers and before the decoder."),
    grad_clip: float = typer.Option(1.0, help="Clip the gradient norm to this (0 disables)."),
    steps: Optional[int] = typer.Option(None, show_default="5000", help="Optimizer steps."),
    epochs: Optional[float] = typer.Option(None, help="Train this many passes over the data instead of --steps."),
    val_fraction: Optional[float] = typer.Option(None, show_default="0.1", help="Share of the corpus, from its end, held out for validation (word models: cut at a line start)."),
    val_file: Optional[Path] = typer.Option(None, "--val-file", help="Validate on this UTF-8 text instead of holding out part of DATA."),
    eval_every: str = typer.Option("250", help="Steps between validation, samples and checkpoints, or 'epoch'."),
    sample_tokens: int = typer.Option(200, help="Length of the sample shown at each evaluation (0: none, no cost)."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write loss.png at each evaluation (--no-plot: never load matplotlib)."),
    seed: int = typer.Option(1337, help="Random seed (weights, dropout, samples)."),
    threads: int = typer.Option(0, help="CPU threads for torch (0: torch's default)."),
    tie: Optional[bool] = typer.Option(None, "--tie/--no-tie", show_default="tie when the sizes are equal", help="Share the embedding with the decoder (needs --embedding 0 or equal to --hidden)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA where torch sees a GPU), cpu or cuda; under torchrun each process uses GPU LOCAL_RANK."),
    precision: Optional[str] = typer.Option(None, "--precision", show_default="fp32; on --resume the run's", help="fp32 (TF32 matrix math on GPUs that have it) or bf16 autocast; fp32 measured faster for LSTMs on an H100."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this directory from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start over in a non-empty run directory (replaces its checkpoints)."),
) -> None:
    options = dict(locals())
    with _train_extra():
        from rnngen.cli.train_progress import run_training
        from rnngen.plugins import tokenizer_kinds

        trainer = run_training(**options, tokenizers=tokenizer_kinds())
    if trainer.step < trainer.cfg.steps:  # stopped by Ctrl-C, after saving `last`
        raise typer.Exit(EXIT_INTERRUPTED)


def export(
    checkpoint: Path = typer.Argument(..., help="Run directory (uses best, else last) or a checkpoint .json file."),
    output: Path = typer.Option(..., "--output", "-o", help="The .onnx file to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
) -> None:
    with _train_extra():
        from rnngen.plugins import tokenizer_kinds
        from rnngen.training.export import export_checkpoint

        report = export_checkpoint(checkpoint, output, force=force, tokenizers=tokenizer_kinds())
    shapes = ", ".join(f"{b}x{t}" for b, t in report.shapes)
    console = Console(highlight=False)
    console.print("onnx.checker: passed")
    console.print(
        f"parity onnxruntime vs PyTorch (batch x time {shapes}): "
        f"max |diff| logits {report.max_logit_diff:.2e}, state {report.max_state_diff:.2e}"
    )
    console.print(f"wrote {report.path} ({report.bytes / 1e6:.2f} MB, {report.parameters:,} parameters)")
