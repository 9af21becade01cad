"""`rnngen plugins`: what is loaded and what each plugin provides."""

from __future__ import annotations

import json

import typer
from rich.console import Console


def plugins(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the loaded plugins (rnngen's built-ins among them), what each provides, and any that failed."""
    from rich.table import Table

    from rnngen.plugins import registry

    reg = registry()
    reg.load_all()  # the commands were registered when this CLI was built
    found = list(reg.plugins.values())
    if as_json:
        tables = {"tokenizers": reg.tokenizers(), "logits_processors": reg.logits_processors(),
                  "model_sources": reg.model_sources(), "inspect_features": reg.inspect_features()}
        typer.echo(json.dumps({"plugins": [p.to_dict() for p in found], **{
            kind: {name: {"plugin": e.plugin, "help": e.help} for name, e in table.items()}
            for kind, table in tables.items()}}, indent=2))
        return
    table = Table(title="rnngen plugins")
    for column in ("plugin", "from", "status", "provides"):
        table.add_column(column)
    for p in found:
        provides = "\n".join(f"{kind}: {', '.join(names)}" for kind, names in sorted(p.provides.items()))
        status = p.status if not p.errors else f"{p.status}\n" + "\n".join(p.errors)
        table.add_row(p.name, p.source, status, provides or "-")
    Console().print(table)
    help_table = Table(title="processors, tokenizers, model sources and inspect features", show_header=True)
    for column in ("kind", "name", "plugin", "help"):
        help_table.add_column(column)
    for kind, entries in (("processor", reg.logits_processors()), ("tokenizer", reg.tokenizers()),
                          ("model source", reg.model_sources()), ("inspect feature", reg.inspect_features())):
        for name, e in sorted(entries.items()):
            help_table.add_row(kind, name, e.plugin, e.help)
    Console().print(help_table)
