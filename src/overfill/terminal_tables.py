"""Rich tables that read at any width: at 80 columns, or in a log (which rich lays out at 80).

A cell too wide for its column folds onto more lines, never cut to `ov…`; the label (first) column keeps its
longest word whole where it can, so each row's name reads at a glance; and a table with more columns than the
width holds is shown as several, each repeating the label column, rather than cropped at the right edge.
"""

from __future__ import annotations

import copy

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table

LABEL_WIDTH = 24  # at most: beside a label this wide, a few numeric columns still fit 80 columns


def readable(table: Table) -> Readable:
    """What to print for `table`: `console.print(readable(table))`."""
    for column in table.columns:
        column.overflow = "fold"
    if table.columns:
        label = table.columns[0]
        words = [word for cell in [label.header, *label._cells] for word in str(cell).split()]
        label.min_width = min(max(map(len, words), default=0), LABEL_WIDTH) or None
    return Readable(table)


class Readable:
    """A table laid out for the width it is printed at (see the module docstring)."""

    def __init__(self, table: Table):
        self.table = table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.parts(console, options)

    def parts(self, console: Console, options: ConsoleOptions) -> list[Table]:
        """The table whole where it fits, else its columns in groups that fit, the label column first in each."""
        table = self.table
        if len(table.columns) < 3 or _fits(console, options, table):
            return [table]
        label, rest = table.columns[0], table.columns[1:]
        groups: list[list] = [[]]
        for column in rest:
            if groups[-1] and not _fits(console, options, _with(table, [label, *groups[-1], column])):
                groups.append([])
            groups[-1].append(column)
        parts = [_with(table, [label, *group]) for group in groups]
        for i, part in enumerate(parts[1:], start=2):
            part.title = f"{table.title} ({i}/{len(parts)})" if table.title else None
        if table.title and len(parts) > 1:
            parts[0].title = f"{table.title} (1/{len(parts)})"
        return parts


def _with(table: Table, columns: list) -> Table:
    part = copy.copy(table)
    part.columns = list(columns)
    return part


def _fits(console: Console, options: ConsoleOptions, table: Table) -> bool:
    """Whether rich lays `table` out within the width (past it, rich crops the right edge without a mark). Asks rich's
    own layout: its measurement leaves out a column's `min_width`, which the layout then adds back."""
    extra = table._extra_width  # borders and separators
    widths = table._calculate_column_widths(console, options.update(width=options.max_width - extra))
    return sum(widths) + extra <= options.max_width
