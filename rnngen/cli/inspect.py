"""`rnngen inspect`: what the model's units track in a text (HTML report or JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from rnngen.cli.console import stderr

def inspect(
    text_file: Path = typer.Argument(..., help="UTF-8 text to run the model over."),
    model: str = typer.Option(..., "--model", "-m", help="An rnngen model (char- or byte-level)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", show_default="TEXT_FILE's name + .inspect.html, unless --json", help="Write the HTML report here."),
    as_json: bool = typer.Option(False, "--json", help="Print the analysis as JSON (per-token surprise and entropy included)."),
    feature: Optional[List[str]] = typer.Option(None, "--feature", help="Also rank units against NAME=REGEX: 1 inside matches (repeatable)."),
    unit: Optional[List[str]] = typer.Option(None, "--unit", help="Include this unit's activations, e.g. l1.c[42] (repeatable)."),
    top: int = typer.Option(5, "--top", help="Units listed per feature."),
    max_chars: int = typer.Option(20_000, "--max-chars", help="Analyse at most this many characters from the start of the file."),
    show_chars: int = typer.Option(3_000, "--show-chars", help="Characters shown coloured in the report."),
    unknown: str = typer.Option("error", "--unknown", help="Characters outside the vocabulary: error, or replace (features still see the real text)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Replace an existing report file."),
) -> None:
    """Record every unit over a text, find the units that track features of it, and write a report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rnngen.checks import check_int
    from rnngen.errors import InvalidParameterError
    from rnngen.inspect.features import parse_feature_option
    from rnngen.plugins import inspect_features
    from rnngen.inspect.recording import analyse, analysis_to_dict
    from rnngen.model.units import parse_unit
    from rnngen.inspect.report import render_report, report_units
    from rnngen.cli.loading import load_model

    for name, value in (("top", top), ("max_chars", max_chars), ("show_chars", show_chars)):
        check_int(name, value, 1, 10**9)
    if not text_file.is_file():
        raise InvalidParameterError(f"{text_file}: no such file")
    try:
        with open(text_file, encoding="utf-8") as f:
            text = f.read(max_chars)
    except UnicodeDecodeError as exc:
        raise InvalidParameterError(f"{text_file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if output is None and not as_json:
        output = text_file.with_name(text_file.name + ".inspect.html")
    if output is not None and output.exists() and not force:
        raise InvalidParameterError(f"{output} exists; use --force to replace it")
    extra = {}
    for option in feature or []:
        name, compute = parse_feature_option(option)
        extra[name] = (compute, f"inside matches of {option.partition('=')[2]!r}", "regex")
    rnn = load_model(model, device=device)
    units = [parse_unit(u, rnn.config) for u in unit or []]
    columns = (TextColumn("recording"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeRemainingColumn())
    console = stderr()
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("record", total=len(text))
        analysis = analyse(rnn, text, extra, top=top, on_progress=lambda n: progress.update(task, completed=n),
                           on_unknown=unknown, features=inspect_features())
    cfg = rnn.config
    if output is not None:
        summary = (f"{cfg.cell} {cfg.num_layers}x{cfg.hidden_size}, {rnn.tokenizer.kind} tokenizer, "
                   f"{len(analysis.recording.units):,} units recorded")
        page = render_report(analysis, Path(str(model)).name, summary,
                             report_units(analysis, units), show_chars)
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(output)  # never a half-written report in place of a good one
    if as_json:
        typer.echo(json.dumps(analysis_to_dict(analysis, rnn, units), ensure_ascii=False))
        return
    console = Console(highlight=False)
    for name, u, r in analysis.best(5):
        console.print(f"  {name:<16} {u.name:<12} r = {r:+.3f}")
    console.print(f"mean surprise {analysis.recording.surprise_bits.mean():.3f} bits/token; wrote {output}")
