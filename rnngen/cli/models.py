"""`rnngen info` and `rnngen score`: what a model is, and how well it predicts a text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.console import Console

from rnngen.cli.console import stderr, user_errors

def info(
    model: Path = typer.Argument(..., help="An rnngen .onnx model."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    with user_errors():
        from rich.table import Table

        from rnngen.cli.loading import load_model
        from rnngen.model.devices import available_providers

        rnn = load_model(model, device=device)
        cfg, meta, training = rnn.config, rnn.file.metadata, rnn.file.training
        rows = {
            "file": str(rnn.file.path),
            "size": f"{len(rnn.file.model_bytes) / 1e6:.2f} MB",
            "format version": str(rnn.file.format_version),
            "cell": cfg.cell,
            "layers": str(cfg.num_layers),
            "hidden size": str(cfg.hidden_size),
            "embedding size": str(cfg.input_size),
            "tied weights": str(cfg.tied),
            "state": ", ".join(f"{s} ({cfg.num_layers}, batch, {cfg.hidden_size})" for s in cfg.state_names),
            "tokenizer": f"{rnn.tokenizer.kind}, {rnn.tokenizer.vocab_size} symbols",
            "parameters": f"{training['parameters']:,}" if training.get("parameters") else "unknown",
            "corpus": f"{training.get('corpus')} ({training.get('corpus_chars') or 0:,} chars)" if training.get("corpus") else "unknown",
            "validation loss": (
                f"{training['val_loss']:.4f} nats/token ({training['val_loss'] / math.log(2):.4f} bits)"
                + (f", last {training['val_fraction']:.0%} of the corpus" if training.get("val_fraction") else "")
                if isinstance(training.get("val_loss"), (int, float)) else "unknown"
            ),
            "training steps": str(training.get("steps", "unknown")),
            "rnngen version": meta.get("rnngen.version", "unknown"),
            "created": meta.get("rnngen.created", "unknown"),
            "providers available": ", ".join(available_providers()),
            "providers used": ", ".join(rnn.providers),
        }
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        table = Table(show_header=False, title=f"rnngen model {model.name}")
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows.items():
            table.add_row(key, value)
        Console().print(table)





def score(
    model: Path = typer.Argument(..., help="An rnngen .onnx model."),
    file: Path = typer.Argument(..., help="UTF-8 text file to score."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    unknown: str = typer.Option("error", "--unknown", help="Characters outside the vocabulary: error, replace or skip."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    with user_errors():
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        from rnngen.cli.loading import load_model
        from rnngen.scoring import score_file

        rnn = load_model(model, device=device)
        columns = (TextColumn("scoring"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
        with Progress(*columns, console=stderr(), transient=True, disable=as_json) as progress:
            task = progress.add_task("score", total=file.stat().st_size if file.is_file() else None)
            result = score_file(rnn, file, on_unknown=unknown, on_progress=lambda n: progress.update(task, completed=n))
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
            return
        Console(highlight=False).print(
            f"{file}: {result.tokens:,} tokens, {result.chars:,} chars\n"
            f"  {result.nats_per_token:.4f} nats/token  {result.bits_per_token:.4f} bits/token  "
            f"perplexity {result.perplexity:.3f}\n"
            f"  {result.nats_per_char:.4f} nats/char   {result.bits_per_char:.4f} bits/char"
        )
