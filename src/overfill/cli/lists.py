"""A list flag given several times, or as 'a,b', read as one list that replaces the field's default.

tyro reads a tuple field's values after one flag (`--refresh-every 8 16`); repeated, the last one wins, and
its append mode adds to the default rather than replacing it. `overfill` flags have always taken both
`--modes overfill,full` and `--modes overfill --modes full`, so before tyro parses, each list flag's
values are gathered into one flag at the end of the command line. Commas split numbers, and names of fields
marked `config.comma_list`, never free text (prompts, stop strings).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

from overfill.config import COMMA_LIST, flag
from overfill.errors import OverfillError


@dataclass(frozen=True)
class ListFlag:
    name: str
    split: bool

    def values(self, text: str) -> list[str]:
        return [part.strip() for part in text.split(",") if part.strip()] if self.split else [text]


def _item_type(annotation) -> type | None:
    """The item type of a tuple field (through Optional and Annotated), or None for any other field."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _item_type(args[0])
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _item_type(inner[0]) if len(inner) == 1 else None
    return args[0] if origin in (tuple, list) and args else None


def list_flags(config_cls) -> dict[str, ListFlag]:
    """Every spelling of each list flag of `config_cls` (its aliases from `tyro.conf.arg` too)."""
    hints = typing.get_type_hints(config_cls, include_extras=True)
    found = {}
    for field in config_cls.__dataclass_fields__.values():  # init-only fields too (a flag's old name)
        hint = hints[field.name].type if isinstance(hints[field.name], dataclasses.InitVar) else hints[field.name]
        item = _item_type(hint)
        annotated = typing.get_args(hint)[1:] if typing.get_origin(hint) is typing.Annotated else ()
        if item is None:
            continue
        spec = ListFlag(field.name, item in (int, float) or bool(field.metadata.get(COMMA_LIST)))
        for name in (flag(field.name), *(alias for m in annotated for alias in getattr(m, "aliases", None) or ())):
            found[name] = spec
    return found


def gathered(argv: list[str], config_cls) -> list[str]:
    """`argv` with each list flag's values, from every place it was given, moved into one flag at the end."""
    flags = list_flags(config_cls)
    rest: list[str] = []
    values: dict[str, list[str]] = {}
    tokens = iter(argv)
    for token in tokens:
        name, equals, text = token.partition("=") if token.startswith("--") else (token, "", "")
        spec = flags.get(name)
        if spec is None:
            rest.append(token)
            continue
        if not equals:
            text = next(tokens, None)
            if text is None:
                raise OverfillError(f"{name} needs a value")
        values.setdefault(spec.name, []).extend(spec.values(text))
    for name, given in values.items():
        rest += [flag(name), *given]
    return rest
