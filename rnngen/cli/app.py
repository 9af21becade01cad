"""The `rnngen` command line, built by `create_app()`: rnngen's own commands, then the plugins'.

Commands load heavy modules inside themselves: `generate`, `serve`, `info` and
`score` never import torch; `train` and `export` do. Every command runs inside
one error boundary: errors the user can cause print as one line on stderr with
exit code 1, Ctrl-C exits 130 (rnngen.cli.console).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rnngen import __version__
from rnngen.cli.console import ErrorBoundaryGroup
from rnngen.cli.generate import generate
from rnngen.cli.inspect import inspect
from rnngen.cli.models import info, score
from rnngen.cli.plugins import plugins
from rnngen.cli.serve import health, serve
from rnngen.cli.train import export, train

# name: (command, help), in the order `rnngen --help` lists them
COMMANDS = {
    "train": (train, "Train a model on a UTF-8 text file (needs the train extra)."),
    "export": (export, "Export a checkpoint to one self-contained ONNX file (needs the train extra)."),
    "generate": (generate, "Stream generated text from an exported model."),
    "info": (info, "Show a model's metadata and the execution providers."),
    "score": (score, "Loss (nats and bits per token and char) and perplexity of a text file."),
    "inspect": (inspect, "Write an HTML report of what the model's units track in a text (or --json)."),
    "serve": (serve, "Serve models over gRPC to many concurrent streaming clients."),
    "health": (health, "Ask a server's gRPC health service; exit 0 when SERVING (for container health checks)."),
    "plugins": (plugins, "List loaded plugins and what each provides."),
}


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"rnngen {__version__}")
        raise typer.Exit()


class RnngenGroup(ErrorBoundaryGroup):
    """The `rnngen` group: every command option reads RNNGEN_<COMMAND>_<OPTION>, spelled as the option is.

    (click's automatic names come from Python parameter names: `--json` would read ..._AS_JSON.)
    An option that names a shorter variable of its own, such as serve's RNNGEN_PORT, reads that one
    first, then the long one.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for command_name, command in self.commands.items():
            for param in command.params:
                longs = [o for o in param.opts if o.startswith("--")]
                if param.param_type_name != "option" or not longs:
                    continue
                variable = f"RNNGEN_{command_name}_{longs[0][2:]}".upper().replace("-", "_")
                own = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
                param.envvar = [*own, variable] if own and variable not in own else own or variable


def create_app() -> typer.Typer:
    """The CLI: rnngen's own commands, then those plugins add (a plugin cannot take a name in use)."""
    app = typer.Typer(
        name="rnngen",
        cls=RnngenGroup,
        help="Train, export and run recurrent language models (RNN, LSTM, GRU) with ONNX.",
        no_args_is_help=True,
        add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
        pretty_exceptions_enable=False,
    )

    @app.callback()
    def root(
        ctx: typer.Context,
        config: Optional[Path] = typer.Option(None, "--config", envvar="RNNGEN_CONFIG", help="TOML file of option defaults, one table per command (default: $XDG_CONFIG_HOME/rnngen/config.toml where it exists)."),
        version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ) -> None:
        from rnngen.cli.settings import config_defaults

        # Every command option can come from RNNGEN_<COMMAND>_<OPTION> (RnngenGroup; the prefix covers the
        # options of a plugin's command groups) and from the config file.
        # Precedence: command line > environment > config file > built-in default (docs/configuration.md).
        ctx.auto_envvar_prefix = "RNNGEN"
        ctx.default_map = config_defaults(config, ctx.command)

    for name, (command, help_text) in COMMANDS.items():
        app.command(name=name, help=help_text)(command)

    from rnngen.plugins import registry

    registry().add_commands(app)
    return app


def main() -> None:
    create_app()()
