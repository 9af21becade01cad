"""The CLI's console: one error boundary around every command, and stderr output.

`ErrorBoundaryGroup` is the `rnngen` group itself, so every command runs
inside `user_errors` (plugin commands and the config-file callback included):
rnngen errors and OS errors (a missing file, a directory where a file belongs,
a port in use) print as one line on stderr with exit code 1; Ctrl-C exits 130,
as shells expect. Messages name the CLI's options, not Python's parameters.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterable, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from rnngen.errors import InvalidParameterError, RnngenError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT

# Parameters whose CLI option is not `--` + the name with dashes (one table for every command).
RENAMED_OPTIONS = {
    "n": "--samples", "num_beams": "--beams", "num_return_sequences": "--num-return", "on_unknown": "--unknown",
    "no_repeat_ngram_size": "--no-repeat-ngram", "processors": "--processor", "units": "--unit",
    "hidden_size": "--hidden", "num_layers": "--layers", "embedding_size": "--embedding", "tie_weights": "--no-tie",
    "warmup_steps": "--warmup", "out_dir": "--out", "data": "DATA",
}


def stderr() -> Console:
    return Console(stderr=True, highlight=False)


def cli_names(parameters: Iterable[str], options: set[str]) -> dict[str, str]:
    """Python parameter names -> the CLI options that set them (a name with no option stays as it is)."""
    names = {}
    for name in parameters:
        option = RENAMED_OPTIONS.get(name, "--" + name.replace("_", "-"))
        names[name] = option if option in options or option.isupper() else name
    return names


def long_options(group: TyperGroup) -> set[str]:
    return {opt for command in group.commands.values() for p in command.params for opt in p.opts if opt.startswith("--")}


class _TrackedStdout:
    """sys.stdout as a command writes to it, remembering whether the text written so far ends a line."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.mid_line = False

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        if text:
            self.mid_line = not text.endswith("\n")
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def user_errors(options: set[str] = frozenset()) -> Iterator[None]:
    """One clear line and a non-zero exit for errors the user can act on; `options`: the CLI's long options."""
    stdout = sys.stdout = _TrackedStdout(sys.stdout)
    try:
        yield
    except RnngenError as exc:
        if isinstance(exc, InvalidParameterError):
            message = exc.in_terms_of(cli_names(exc.parameters, options))
        else:
            message = str(exc)
        _fail(stdout, f"[bold red]error:[/] {escape(message)}", EXIT_ERROR)
    except OSError as exc:  # a path or port the user gave: the OS's own words, naming it
        where = ": ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        message = f"{where}: {exc.strerror}" if where and exc.strerror else str(exc.strerror or exc)
        _fail(stdout, f"[bold red]error:[/] {escape(message)}", EXIT_ERROR)
    except KeyboardInterrupt:
        _fail(stdout, "interrupted", EXIT_INTERRUPTED)
    finally:
        sys.stdout = stdout.stream


def _fail(stdout: _TrackedStdout, line: str, code: int) -> None:
    if stdout.mid_line:  # end the text already written, so the message starts on a line of its own
        with contextlib.suppress(OSError, ValueError):
            stdout.stream.write("\n")
            stdout.stream.flush()
    stderr().print(line, soft_wrap=True)
    raise typer.Exit(code) from None


class ErrorBoundaryGroup(TyperGroup):
    """The `rnngen` group: its callback and every subcommand run inside `user_errors`."""

    def invoke(self, ctx: typer.Context) -> Any:
        with user_errors(long_options(self)):
            return super().invoke(ctx)
