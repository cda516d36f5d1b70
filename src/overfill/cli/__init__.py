"""The `overfill` command line: a thin layer over the library, one subcommand per stage (app.py)."""

from overfill.cli.app import main

__all__ = ["main"]
