"""Stop strings: ending a row on one, cutting the reply's text before it, and streaming text that may begin one
(what generate, stream, chat and the lm-eval adapter share)."""

from __future__ import annotations

from typing import Iterator

import torch

from overfill.sampling import Step


def stop_checker(tokenizer, stops: tuple[str, ...]):
    """`is_stopped(row, row_ids)` for `generate_ids`, or None without stop strings.

    A row is checked every step, so a hit must end in the newest token: decoding a tail that can
    hold the longest stop string is enough. Every token carries at least one byte, so that tail is
    the stop's UTF-8 length in tokens, plus a few for a split character or a skipped special token.
    """
    if not stops:
        return None
    window = max(len(s.encode("utf-8")) for s in stops) + 4

    def is_stopped(_row, row_ids: torch.Tensor) -> bool:
        tail = tokenizer.decode(row_ids[-window:].tolist(), skip_special_tokens=True)
        return any(s in tail for s in stops)

    return is_stopped


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    hits = [text.index(s) for s in stops if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def stream_steps(steps: Iterator[Step], tokenizer, eos: set[int], stop: tuple[str, ...] = ()) -> Iterator[str]:
    """Turn single-row steps into text deltas, holding back text that may be the start of a stop string."""
    row_ids: list[int] = []
    emitted = ""
    for s in steps:
        token = int(s.tokens[0])
        if token not in eos:
            row_ids.append(token)
        text = tokenizer.decode(row_ids, skip_special_tokens=True)
        text, hit = cut_at_stop(text, stop)
        done = hit or bool(s.finished[0])
        # Hold back an incomplete UTF-8 character and any suffix that could begin a stop string.
        safe = len(text) if done else _safe_prefix_length(text, stop)
        if safe > len(emitted):
            yield text[len(emitted) : safe]
            emitted = text[:safe]
        if done:
            return
    text = tokenizer.decode(row_ids, skip_special_tokens=True)
    text, _ = cut_at_stop(text, stop)
    if len(text) > len(emitted):
        yield text[len(emitted) :]


def _safe_prefix_length(text: str, stop: tuple[str, ...]) -> int:
    end = len(text)
    if text.endswith("\ufffd"):
        end -= 1
    for s in stop:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end = min(end, len(text[:end]) - k)
                break
    return max(end, 0)
