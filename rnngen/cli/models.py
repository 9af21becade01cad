"""`rnngen info` and `rnngen score`: what a model is, and how well it predicts a text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.console import Console

from rnngen.cli.console import stderr

def info(
    model: Path = typer.Argument(..., help="An rnngen .onnx model."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    from rich.table import Table

    from rnngen.cli.loading import load_model
    from rnngen.model.devices import available_providers

    rnn = load_model(model, device=device)
    cfg, meta, training = rnn.config, rnn.file.metadata, rnn.file.training
    val_loss = training.get("val_loss")
    facts = {  # typed values under stable keys: what --json prints
        "file": str(rnn.file.path),
        "size_bytes": len(rnn.file.model_bytes),
        "format_version": rnn.file.format_version,
        "cell": cfg.cell,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "embedding_size": cfg.input_size,
        "tied_weights": cfg.tied,
        "state": list(cfg.state_names),  # each (layers, batch, hidden_size)
        "tokenizer": rnn.tokenizer.kind,
        "vocab_size": rnn.tokenizer.vocab_size,
        "parameters": training.get("parameters"),
        "corpus": training.get("corpus"),
        "corpus_chars": training.get("corpus_chars"),
        "val_loss_nats": val_loss if isinstance(val_loss, (int, float)) else None,
        "val_fraction": training.get("val_fraction"),
        "training_steps": training.get("steps"),
        "rnngen_version": meta.get("rnngen.version"),
        "created": meta.get("rnngen.created"),
        "providers_available": list(available_providers()),
        "providers_used": list(rnn.providers),
    }
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    table = Table(show_header=False, title=f"rnngen model {model.name}")
    table.add_column(style="bold")
    table.add_column()
    for key, value in _info_rows(facts):
        table.add_row(key, value)
    Console().print(table)


def _info_rows(f: dict) -> list[tuple[str, str]]:
    """info's facts as the table shows them."""
    def known(value, shown=str) -> str:
        return "unknown" if value is None else shown(value)

    val = "unknown"
    if f["val_loss_nats"] is not None:
        val = f"{f['val_loss_nats']:.4f} nats/token ({f['val_loss_nats'] / math.log(2):.4f} bits)"
        val += f", last {f['val_fraction']:.0%} of the corpus" if f["val_fraction"] else ""
    return [
        ("file", f["file"]), ("size", f"{f['size_bytes'] / 1e6:.2f} MB"), ("format version", str(f["format_version"])),
        ("cell", f["cell"]), ("layers", str(f["layers"])), ("hidden size", str(f["hidden_size"])),
        ("embedding size", str(f["embedding_size"])), ("tied weights", str(f["tied_weights"])),
        ("state", ", ".join(f"{s} ({f['layers']}, batch, {f['hidden_size']})" for s in f["state"])),
        ("tokenizer", f"{f['tokenizer']}, {f['vocab_size']} symbols"),
        ("parameters", known(f["parameters"], "{:,}".format)),
        ("corpus", known(f["corpus"], lambda c: f"{c} ({f['corpus_chars'] or 0:,} chars)")),
        ("validation loss", val), ("training steps", known(f["training_steps"])),
        ("rnngen version", known(f["rnngen_version"])), ("created", known(f["created"])),
        ("providers available", ", ".join(f["providers_available"])),
        ("providers used", ", ".join(f["providers_used"])),
    ]





def score(
    model: Path = typer.Argument(..., help="An rnngen .onnx model."),
    file: Path = typer.Argument(..., help="UTF-8 text file to score."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    unknown: str = typer.Option("error", "--unknown", help="Characters outside the vocabulary: error, replace or skip."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from rnngen.cli.loading import load_model
    from rnngen.scoring import score_file

    rnn = load_model(model, device=device)
    # The bar is the share of the file's bytes scored, the count the tokens scored; on a terminal only.
    columns = (TextColumn("scoring"), BarColumn(), TextColumn("{task.fields[tokens]:,} tokens"), TimeRemainingColumn())
    console = stderr()
    with Progress(*columns, console=console, transient=True, disable=as_json or not console.is_terminal) as progress:
        task = progress.add_task("score", total=file.stat().st_size if file.is_file() else None, tokens=0)
        result = score_file(rnn, file, on_unknown=unknown,
                            on_progress=lambda tokens, done: progress.update(task, completed=done, tokens=tokens))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    Console(highlight=False).print(
        f"{file}: {result.tokens:,} tokens, {result.chars:,} chars\n"
        f"  {result.nats_per_token:.4f} nats/token  {result.bits_per_token:.4f} bits/token  "
        f"perplexity {result.perplexity:.3f}\n"
        f"  {result.nats_per_char:.4f} nats/char   {result.bits_per_char:.4f} bits/char"
        + ("" if result.unknown_tokens is None else
           f"\n  {result.unknown_tokens:,} tokens outside the vocabulary ({result.unknown_tokens / result.tokens:.2%})")
    )
