"""Build a typer command from a config dataclass: its fields are the flags, its field docstrings the help.

One typed config per stage (prune, train, eval, bench, demo, generate, chat) drives both the
Python API and the CLI, so the two cannot drift apart (after litgpt). A `Literal` field becomes a
choice that `--help` lists and typer checks.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any, Callable

import typer


class Interrupted(Exception):
    """Ctrl-C in a command, carried past typer (which turns a KeyboardInterrupt into a silent exit 130)
    so that `main` can say what was interrupted."""


def field_docs(cls) -> dict[str, str]:
    """The string literal under each field of a dataclass, keyed by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, following in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None), ast.Constant):
                    docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def _cli_type(annotation):
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return typing.Optional[_cli_type(inner)]
    if origin in (tuple, list):
        return list[args[0]]
    return annotation


def add_config_command(app: typer.Typer, name: str, config_cls, run: Callable[[Any], None], *, help: str,
                       skip: tuple[str, ...] = (), arguments: tuple[str, ...] = (),
                       aliases: dict[str, str] | None = None) -> None:
    """Register `name` running `run(config_cls(**flags))`; `arguments` are positional, `aliases` short flags."""
    hints = typing.get_type_hints(config_cls)
    docs = field_docs(config_cls)
    parameters = []
    for f in dataclasses.fields(config_cls):
        if f.name in skip or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else ...)
        annotation = _cli_type(hints[f.name])
        if isinstance(default, tuple):
            default = list(default)
        flag = f"--{f.name.replace('_', '-')}"
        if annotation is bool:  # on/off switches: --force / --no-force
            flag = f"{flag}/--no-{flag[2:]}"
        if f.name in arguments:
            option = typer.Argument(default, help=docs.get(f.name, ""), show_default=False)
        else:
            names = [flag, *([aliases[f.name]] if aliases and f.name in aliases else [])]
            option = typer.Option(default, *names, help=docs.get(f.name, ""))
        parameters.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))

    def command(**kwargs):
        for key, value in list(kwargs.items()):
            if isinstance(value, list):
                kwargs[key] = tuple(value)
        try:
            run(config_cls(**kwargs))
        except KeyboardInterrupt as interrupt:
            raise Interrupted(str(interrupt)) from None

    command.__signature__ = inspect.Signature(parameters)
    command.__doc__ = help
    command.__name__ = name
    app.command(name=name, help=help)(command)
