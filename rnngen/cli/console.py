"""The CLI's console: one error boundary for every command, and stderr output."""

from __future__ import annotations

import contextlib
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from rnngen.errors import RnngenError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def stderr() -> Console:
    return Console(stderr=True, highlight=False)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """One clear line and a non-zero exit for errors the user can act on."""
    try:
        yield
    except RnngenError as exc:
        stderr().print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, soft_wrap=True)
        raise typer.Exit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        stderr().print("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
