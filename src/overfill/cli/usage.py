"""A command line that tyro refuses, said as one `error:` line (every bad input is one line and exit code 2).

tyro draws a box of several lines for each refusal. Its parse-error hook hands the refusal over as an event
before that; `tyro._errors` is marked unstable, which the exact pin of tyro in pyproject.toml answers.
"""

from __future__ import annotations

import typing

from tyro import _errors as refusals


class UsageError(Exception):
    """The command line could not be read; `where` is the (sub)command whose --help explains it."""

    def __init__(self, message: str, where: str):
        super().__init__(message)
        self.where = where


def _choices(annotation) -> list[str]:
    """A Literal field's values in the order the field lists them (through Optional and Annotated)."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(value) for value in typing.get_args(annotation)]
    return [value for arg in typing.get_args(annotation) for value in _choices(arg)]


def _kind(annotation) -> str:
    """What a field takes, in words, for a value it could not read."""
    origin, args = typing.get_origin(annotation), [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (tuple, list) and args:
        return {int: "whole numbers, e.g. 8,16,32", float: "numbers, e.g. 0.5,1"}.get(args[0], "values")
    if args:
        return _kind(args[0])
    return {int: "a whole number", float: "a number"}.get(annotation, "a value")


def _message(event, extra_words_hint: str) -> str:
    if isinstance(event, refusals.InvalidChoice):
        choices = _choices(event.argument.field.type_stripped) or [c for c in event.choices if c != "None"]
        return f"{event.argument.display_name()} got '{event.value}': pick one of {', '.join(choices)}"
    if isinstance(event, refusals.BadValue):
        return f"{event.argument.display_name()} needs a value"
    if isinstance(event, refusals.MissingArgs):
        return "missing " + ", ".join(missing.arg.display_name() for missing in event.missing_arguments)
    if isinstance(event, refusals.UnrecognizedArgs):
        words = " ".join(event.tokens)
        return f"no such option: {words}" if words.startswith("-") else f"unexpected extra arguments: {words}{extra_words_hint}"
    if isinstance(event, refusals.InstantiationFailure) and event.argument is not None:
        reason = event.message.strip().splitlines()[0]
        return f"{event.argument.display_name()} takes {_kind(event.argument.field.type_stripped)} ({reason})"
    if isinstance(event, refusals.InstantiationFailure):
        return event.message.strip().splitlines()[0]
    return f"the command line was not understood ({type(event).__name__})"


def one_line_errors(where: str, extra_words_hint: str = ""):
    """While parsing: tyro's refusals become a UsageError that sends to `where --help`; `extra_words_hint` follows
    words that no argument took."""

    def refuse(event) -> None:
        raise UsageError(_message(event, extra_words_hint), where)

    return refusals.on_parse_error(refuse)
