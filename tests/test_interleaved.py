"""The one interleaved timer: rounds in rotating order, warm-up first, ratios paired round by round."""

import pytest

from overfill.interleaved import paired_ratio, round_ratios, rounds, spread, time_rounds


def test_time_rounds_warms_up_then_runs_every_item_once_a_round_in_rotating_order():
    calls = []
    results = time_rounds(["a", "b", "c"], lambda item, r: calls.append((item, r)) or f"{item}{r}", repeats=3, warmup=1,
                          warm=lambda item: calls.append((item, "warm")))
    assert calls == [("a", "warm"), ("b", "warm"), ("c", "warm"),
                     ("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("a", 1), ("c", 2), ("a", 2), ("b", 2)]
    assert results == {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"], "c": ["c0", "c1", "c2"]}


def test_rounds_with_uneven_repeats_give_positions_within_each_round():
    plan = list(rounds(["a", "b", "c"], {"a": 3, "b": 1, "c": 2}.get))
    assert plan == [(0, 0, "a"), (0, 1, "b"), (0, 2, "c"), (1, 0, "c"), (1, 1, "a"), (2, 0, "a")]


def test_a_paired_ratio_follows_the_rounds_through_drift():
    # the machine slows down round by round; b is always twice as fast as a in the same round
    a = {"samples": {"s": [2.0, 4.0, 8.0]}}
    b = {"samples": {"s": [1.0, 2.0, 4.0]}}
    ratio = paired_ratio(a, b, "s")
    assert ratio["min"] == ratio["max"] == pytest.approx(2.0) and ratio["n"] == 3
    assert paired_ratio(a, {"samples": {"s": [1.0, 0.0, 4.0]}}, "s") is None
    assert round_ratios([2.0, None, 9.0, 8.0], [1.0, 2.0, 0.0, 4.0]) == [2.0, 2.0]  # rounds without a ratio left out


def test_spread_matches_linear_quantiles():
    s = spread([4.0, 1.0, 3.0, 2.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"], s["n"]) == (2.5, 1.75, 3.25, 1.0, 4.0, 4)
    assert spread([5.0])["median"] == 5.0
