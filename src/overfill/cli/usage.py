"""A command line that tyro refuses, said as one `error:` line (every bad input is one line and exit code 2).

tyro draws a box of several lines for each refusal. Its parse-error hook hands the refusal over as an event
before that; `tyro._errors` is marked unstable, which the exact pin of tyro in pyproject.toml answers.
"""

from __future__ import annotations

from tyro import _errors as refusals


class UsageError(Exception):
    """The command line could not be read; `where` is the (sub)command whose --help explains it."""

    def __init__(self, message: str, where: str):
        super().__init__(message)
        self.where = where


def _name(argument) -> str:
    return argument.display_name()


def _message(event) -> str:
    if isinstance(event, refusals.InvalidChoice):
        return f"{_name(event.argument)} got '{event.value}': pick one of {', '.join(event.choices)}"
    if isinstance(event, refusals.BadValue):
        return f"{_name(event.argument)} needs a value"
    if isinstance(event, refusals.MissingArgs):
        return "missing " + ", ".join(_name(missing.arg) for missing in event.missing_arguments)
    if isinstance(event, refusals.MissingSubcommand):
        return "name a command"
    if isinstance(event, refusals.UnrecognizedArgs):
        return f"no such option: {' '.join(event.tokens)}"
    if isinstance(event, refusals.InstantiationFailure):
        reason = event.message.strip().splitlines()[0]
        return f"{_name(event.argument)}: {reason}" if event.argument is not None else reason
    return f"the command line was not understood ({type(event).__name__})"


def refuse(event) -> None:
    """The hook: raise the refusal as a UsageError, for `app.main` to say in one line."""
    raise UsageError(_message(event), event.prog)


def one_line_errors():
    """While parsing: tyro's refusals become UsageError."""
    return refusals.on_parse_error(refuse)
