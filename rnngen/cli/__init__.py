"""The `rnngen` command line: the app (rnngen.cli.app) and one module per command group."""

from rnngen.cli.app import create_app, main

__all__ = ["create_app", "main"]
