"""Build a typer command from a config dataclass: its fields are the flags, its field docstrings the help.

One typed config per stage (prune, train, eval, bench, demo, generate, chat) drives both the
Python API and the CLI, so the two cannot drift apart (after litgpt). A `Literal` field becomes a
choice that `--help` lists and typer checks. A tuple field becomes a repeatable flag; parsing its
text is this module's job, not the config's: numbers are converted here, and "8,16,32" is split
here for numbers and for name lists marked `config.comma_list` (never for prompts or stop strings).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from typing import Any, Callable

import typer
from rich.markup import escape

from overfill.config import COMMA_LIST
from overfill.config import flag as flag_of
from overfill.errors import OverfillError


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
        # Numbers are taken as text, so that "8,16,32" works as well as repeating the flag: `_listed`
        # splits and converts them before the config sees them (one error line for a bad one).
        return list[str] if args[0] in (int, float) else list[args[0]]
    return annotation


def _panel(config_cls, name: str) -> str | None:
    """The --help panel of a field: that of the shared group that introduced it (config.Settings.panel), so a
    command's own flags come first and each group's follow together, whatever the order of inheritance."""
    for klass in reversed(config_cls.__mro__):
        if name in vars(klass).get("__annotations__", {}):
            return vars(klass).get("panel")
    return None


def _item_type(annotation):
    """The item type of a tuple field (through Optional), or None for a field that is not a tuple."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _item_type(inner[0]) if len(inner) == 1 else None
    return args[0] if origin in (tuple, list) and args else None


def _listed(values: list[str], item_type, split: bool, name: str) -> tuple:
    """A repeated flag's values as the config's tuple: 'a,b' split where the field allows it, numbers converted."""
    if split:
        values = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if item_type not in (int, float):
        return tuple(values)
    try:
        return tuple(item_type(value) for value in values)
    except ValueError:
        kind = "whole numbers" if item_type is int else "numbers"
        raise OverfillError(f"{flag_of(name)} takes {kind}, e.g. 8,16,32; got {','.join(values)}") from None


def add_config_command(app: typer.Typer, name: str, config_cls, run: Callable[[Any], None], *, help: str,
                       skip: tuple[str, ...] = (), arguments: tuple[str, ...] = (),
                       aliases: dict[str, str] | None = None, passthrough: str | None = None,
                       renamed: dict[str, str] | None = None) -> None:
    """Register `name` running `run(config_cls(**flags))`; `arguments` are positional, `aliases` short flags,
    the `passthrough` field collects whatever follows `--`, for another program (vLLM's server), and
    `renamed` maps a field's former name to it: the old flag still works, hidden from --help."""
    hints = typing.get_type_hints(config_cls)
    docs = field_docs(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    # tuple fields -> (item type, whether "a,b" is split): numbers always, names where the field says so
    lists = {n: (item, item in (int, float) or bool(f.metadata.get(COMMA_LIST)))
             for n, f in fields.items() if (item := _item_type(hints[n])) is not None and n != passthrough}
    parameters = []
    for old, new in (renamed or {}).items():
        annotation = _cli_type(hints[new])
        parameters.append(inspect.Parameter(f"renamed__{old}", inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                            default=typer.Option(None, flag_of(old), hidden=True)))
    for f in dataclasses.fields(config_cls):
        if f.name in skip or f.name == passthrough or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else ...)
        annotation = _cli_type(hints[f.name])
        if isinstance(default, tuple):
            default = list(default)
        flag = f"--{f.name.replace('_', '-')}"
        if annotation in (bool, typing.Optional[bool]):  # on/off switches: --force / --no-force (neither: None)
            flag = f"{flag}/--no-{flag[2:]}"
        if f.name in arguments:
            option = typer.Argument(default, help=escape(docs.get(f.name, "")), show_default=False)
        else:
            names = [flag, *([aliases[f.name]] if aliases and f.name in aliases else [])]
            option = typer.Option(default, *names, help=escape(docs.get(f.name, "")), rich_help_panel=_panel(config_cls, f.name))
        parameters.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))

    def command(ctx: typer.Context, **kwargs):
        if passthrough:
            # click fills an empty positional argument from what follows `--` before it leaves the
            # rest in ctx.args; what follows `--` belongs to the other program, whole.
            argv = sys.argv[1:]
            tail = tuple(argv[argv.index("--") + 1 :]) if "--" in argv else ()
            if len(ctx.args) > len(tail):  # words before `--` that no argument took
                raise typer.BadParameter(f"unexpected extra arguments: {' '.join(ctx.args[: len(ctx.args) - len(tail)])} "
                                         "(flags for vLLM go after `--`)")
            if len(tail) > len(ctx.args):
                for argument in arguments:
                    if kwargs.get(argument) == tail[0]:
                        kwargs[argument] = None
            kwargs[passthrough] = tail
        for old, new in (renamed or {}).items():
            value = kwargs.pop(f"renamed__{old}")
            if value is not None:
                default = fields[new].default  # a tuple field's flag gives a list
                if kwargs[new] != (list(default) if isinstance(default, tuple) else default):
                    raise OverfillError(f"{flag_of(old)} is the old name of {flag_of(new)}: pass one of the two")
                kwargs[new] = value
        for key, (item_type, split) in lists.items():
            if isinstance(kwargs.get(key), list):
                kwargs[key] = _listed(kwargs[key], item_type, split, key)
        try:
            run(config_cls(**kwargs))
        except KeyboardInterrupt as interrupt:
            raise Interrupted(str(interrupt)) from None

    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    command.__signature__ = inspect.Signature([context, *parameters])
    command.__doc__ = help
    command.__name__ = name
    # Only a passthrough command takes extra arguments, and only after `--`: a mistyped flag stays an error.
    settings = {"allow_extra_args": True} if passthrough else {}
    app.command(name=name, help=help, context_settings=settings)(command)
