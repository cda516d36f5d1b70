"""Final answers in replies and references (GSM8K style) and exact-match accuracy on them (`overfill eval`).

A reference's answer is the number after its '####'; a reply's is the number after its last
'####', or else its last number. Numbers are normalised ('$1,234.50' -> '1234.5') before comparing.
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalise_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5'; '18.00' -> '18'; None when it is not a number."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def reference_answer(reference: str) -> str | None:
    """GSM8K: the number after '####' in the reference solution; None when there is none."""
    if "####" not in reference:
        return None
    found = _NUMBER.search(reference.rsplit("####", 1)[1])
    return normalise_number(found.group()) if found else None


def extract_answer(reply: str) -> str | None:
    """The number after the last '####' if the reply has one, else the last number in the reply."""
    tail = reply.rsplit("####", 1)[1] if "####" in reply else reply
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    return normalise_number(numbers[0] if "####" in reply else numbers[-1])


def answer_accuracy(texts: list[str], first_token_texts: list[str], references: list[str | None]) -> dict:
    """Exact-match accuracy on final answers, and how many correct answers the first token already held."""
    predicted = [extract_answer(t) for t in texts]
    graded = [(p, r, f) for p, r, f in zip(predicted, references, first_token_texts) if r is not None]
    correct = [p == r for p, r, _ in graded]
    from_first = sum(1 for (p, r, f), ok in zip(graded, correct) if ok and extract_answer(f) == r)
    return {
        "accuracy": sum(correct) / len(graded) if graded else float("nan"),
        "graded": len(graded),
        "correct": sum(correct),
        "correct_from_first_token": from_first,
    }
