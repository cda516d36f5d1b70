"""A bundled instruction set with checkable answers, for the demo (fetched data sets cannot ship).

Arithmetic word problems in GSM8K's shape: a question, a short worked solution and a final line
`#### <number>`, so exact-match accuracy is checkable. Generated from templates with a seed, so
train and held-out sets are reproducible and disjoint (different seeds, and duplicates removed).
"""

from __future__ import annotations

import random

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam", "Mia", "Noor"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells", "cards", "coins"]


def _buy_and_give(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, bought, given = rng.randint(5, 40), rng.randint(2, 30), rng.randint(1, 20)
    total = start + bought
    given = min(given, total)
    answer = total - given
    question = f"{name} has {start} {item}. {name} buys {bought} more and then gives {given} to a friend. How many {item} does {name} have now?"
    solution = f"{name} starts with {start} {item} and buys {bought}, so {start} + {bought} = {total}. After giving away {given}, {total} - {given} = {answer}."
    return question, solution, answer


def _groups(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    boxes, per_box, extra = rng.randint(2, 12), rng.randint(2, 15), rng.randint(0, 9)
    packed = boxes * per_box
    answer = packed + extra
    question = f"{name} packs {boxes} boxes with {per_box} {item} in each box, and has {extra} {item} left over. How many {item} are there in all?"
    solution = f"The boxes hold {boxes} x {per_box} = {packed} {item}. Adding the {extra} left over gives {packed} + {extra} = {answer}."
    return question, solution, answer


def _price(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count, price, paid_extra = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
    cost = count * price
    paid = cost + paid_extra
    question = f"{name} buys {count} {item} at {price} dollars each and pays with {paid} dollars. How much change does {name} get?"
    solution = f"The {item} cost {count} x {price} = {cost} dollars. The change is {paid} - {cost} = {paid_extra} dollars."
    return question, solution, paid_extra


def _share(rng: random.Random) -> tuple[str, str, int]:
    item = rng.choice(ITEMS)
    friends, each = rng.randint(2, 8), rng.randint(2, 12)
    total = friends * each
    names = rng.sample(NAMES, 1)[0]
    question = f"{names} shares {total} {item} equally among {friends} friends. How many {item} does each friend get?"
    solution = f"Each friend gets {total} / {friends} = {each} {item}."
    return question, solution, each


def _two_step(rng: random.Random) -> tuple[str, str, int]:
    name = rng.choice(NAMES)
    days, per_day, bonus = rng.randint(2, 7), rng.randint(3, 25), rng.randint(5, 50)
    read = days * per_day
    answer = read + bonus
    question = f"{name} reads {per_day} pages a day for {days} days, then reads {bonus} pages on the weekend. How many pages did {name} read in total?"
    solution = f"On weekdays {name} reads {days} x {per_day} = {read} pages. With the weekend, {read} + {bonus} = {answer} pages."
    return question, solution, answer


TEMPLATES = [_buy_and_give, _groups, _price, _share, _two_step]


def arithmetic_problems(n: int, seed: int = 0, exclude: set[str] | None = None) -> list[dict]:
    """n records {"question", "answer"} with answers ending in '#### <number>' (GSM8K's format)."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows = []
    while len(rows) < n:
        question, solution, answer = rng.choice(TEMPLATES)(rng)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"question": question, "answer": f"{solution}\n#### {answer}"})
    return rows


def train_and_heldout(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    heldout = arithmetic_problems(n_heldout, seed=seed + 1)
    train = arithmetic_problems(n_train, seed=seed, exclude={r["question"] for r in heldout})
    return train, heldout
