"""How every command's settings are composed: small shared groups, mixed into one flat dataclass per command.

A group (`model_source.ModelSource`, `generation.Sampling` and `GenerationConfig`, `data.RecordFields` and
`DataConfig`) is a dataclass of a few fields that several commands share; a command's config inherits
the groups it needs and adds its own fields. Each class's `__post_init__` checks its own fields and
calls `super().__post_init__()`, so a config that mixes in several groups runs every group's checks
once, in method-resolution order, with no check called by hand. Fields stay flat (not nested), so a
field is a flag of the same name (read by tyro, cli/app.py) and a keyword of the Python API alike.

Values arrive typed: a tuple field takes a tuple (or one lone value) from Python; the CLI (cli/lists.py) splits
comma-separated flags ("8,16,32") before the config sees them (`comma_list` marks the text lists it
may split). Checks that read the filesystem live in each config's `check_files()`, which the stage
calls first, before any model loads (see docs/design.md, "Configs").
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from overfill.errors import OverfillError

# Field metadata: on the command line this list of names may also be given comma-separated.
COMMA_LIST = "comma_list"


def comma_list(default: tuple[str, ...]):
    """A tuple-of-names field whose flag also takes 'a,b' (numbers always may; free text, such as prompts or stop
    strings, never is split)."""
    return field(default=default, metadata={COMMA_LIST: True})


@dataclass
class Settings:
    """The root of every config: ends the cooperative `__post_init__` chain and the `check_files` chain."""

    def __post_init__(self):
        pass

    def check_files(self) -> None:
        """Inputs that must exist and outputs that must be writable, checked before long work (one error line)."""

    def view(self, group: type, **overrides):
        """This config's settings as `group` (a group it mixes in, or one whose fields it shares by name), for the
        library functions that take the group: e.g. a command's GenerationConfig, or the ModelSource it loads."""
        names = {f.name for f in fields(group) if f.init} & {f.name for f in fields(self)}
        return group(**{**{name: getattr(self, name) for name in names}, **overrides})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def as_tuple(value) -> tuple:
    """A tuple field's value as a tuple: one lone value (a str is one name, not its characters) is a tuple of one."""
    if value is None:
        return ()
    if isinstance(value, (str, int, float)):
        return (value,)
    return tuple(value)


def whole_numbers(value, name: str, *, minimum: int = 1) -> tuple[int, ...]:
    """A tuple field of whole numbers of at least `minimum`, in the order given, once each."""
    numbers = as_tuple(value)
    for n in numbers:
        if isinstance(n, bool) or not isinstance(n, int):
            raise OverfillError(f"{flag(name)} takes whole numbers, got {n!r}")
        if n < minimum:
            raise OverfillError(f"{flag(name)} takes whole numbers of at least {minimum}, got {n}")
    return tuple(dict.fromkeys(numbers))


def at_least(config, minimum: int, *names: str) -> None:
    """Each named field is None (unset) or at least `minimum`: one error line naming the flag and the value."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            bound = "0 or more" if minimum == 0 else f"at least {minimum}"
            raise OverfillError(f"{flag(name)} must be {bound}, got {value}")
