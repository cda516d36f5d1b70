"""The `overfill` command line: a thin layer over the library, one subcommand per stage (app.py)."""

from overfill.cli.app import app, main

__all__ = ["app", "main"]
