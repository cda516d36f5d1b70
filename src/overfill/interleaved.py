"""Timing several configurations side by side: interleaved rounds, and the statistics of their repeats.

Machine drift (another process, a clock change, a warm cache) hits whatever runs at that moment, so
the configurations run in rounds, each round once each in an order rotated by the round, and a ratio
is taken round by round (`paired_ratio`): drift slower than a round cancels out of it. `overfill bench`
(its loop rows, and vLLM's lanes), and `overfill frontier` all time this way; what one run is stays theirs.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def rotated(items: Sequence[T], k: int) -> list[T]:
    """`items` started at position `k` (mod their number): each round runs them in another order."""
    items = list(items)
    k %= len(items)
    return items[k:] + items[:k]


def rounds(items: Sequence[T], repeats: int | Callable[[T], int]) -> Iterator[tuple[int, int, T]]:
    """(round, position in the round, item) for every timed run: round r runs, in an order rotated by r, every item
    that `repeats` (one number, or each item's own) still owes a run; an item that has its repeats drops out."""
    owed = repeats if callable(repeats) else (lambda _: repeats)
    items = list(items)
    for r in range(max(map(owed, items), default=0)):
        for j, item in enumerate(i for i in rotated(items, r) if owed(i) > r):
            yield r, j, item


def time_rounds(items: Sequence[T], run: Callable[[T, int], R], *, repeats: int, warmup: int = 0,
                warm: Callable[[T], object] | None = None) -> dict[T, list[R]]:
    """Warm every item up `warmup` times (`warm(item)`, untimed: a compiled step meets its shapes here), then
    `repeats` interleaved rounds of `run(item, round)`; each item's results in round order."""
    for _ in range(warmup):
        for item in items:
            (warm or (lambda i: run(i, -1)))(item)
    results: dict[T, list[R]] = {item: [] for item in items}
    for r, _, item in rounds(items, repeats):
        results[item].append(run(item, r))
    return results


# ---------------------------------------------------------------- statistics of repeats


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile, linear between the closest ranks (numpy's and torch's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values: Sequence[float]) -> dict:
    """Median, interquartile range and extremes of repeated measurements."""
    values = [float(v) for v in values]
    return {"median": quantile(values, 0.5), "q1": quantile(values, 0.25), "q3": quantile(values, 0.75),
            "min": min(values), "max": max(values), "n": len(values)}


def round_ratios(x: Sequence[float | None], y: Sequence[float | None]) -> list[float]:
    """x[r] / y[r] for each round r that both ran, leaving out a round where either value is missing or y is 0."""
    return [a / b for a, b in zip(x, y) if a is not None and b]


def paired_ratio(a: dict, b: dict, metric: str) -> dict | None:
    """a/b round by round (the two ran in the same rounds), as a spread; `a["samples"][metric]` per round.
    None when a round of b is 0 (no ratio to take)."""
    x, y = a["samples"][metric], b["samples"][metric]
    n = min(len(x), len(y))
    if n == 0 or any(v == 0 for v in y[:n]):
        return None
    return spread(round_ratios(x, y))
