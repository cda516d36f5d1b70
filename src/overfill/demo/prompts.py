"""The demo's prompts: general instructions composed from families.py, seeded and deterministic.

Templates x topics, as the demo's arithmetic set once was, but for chat: every (template, topic,
extra) of a family is one prompt, about two thousand in all, written here and shipped with the
package (nothing is downloaded). The split is by construction, not by sampling:

- held-out topics are every HELDOUT_EVERY-th topic of each family; no training prompt mentions one;
- the last template of each family is held out too: only held-out prompts use its wording;
- so held-out agreement measures the decoder on requests it never saw, not recall of training prompts.

The seed orders each family's pool; prompts are then dealt family by family in turn, so any
prefix of the list (the first N training prompts, the first 12 held-out ones) spreads over every
kind of request, and a longer list begins with a shorter one (the demo's cached replies grow with
--prompts rather than being redone).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from overfill.atomic import atomic_write_text
from overfill.demo.families import FAMILIES

HELDOUT_EVERY = 5  # topic i is held out when i % HELDOUT_EVERY == HELDOUT_EVERY - 1: a fifth of each family
CHAT_FAMILIES = ("explain", "howto", "email", "summarise")  # the chat comparison: requests a newcomer can judge at a glance


@dataclass(frozen=True)
class DemoPrompt:
    text: str
    family: str
    template: int  # index into the family's templates (the last one is held out)
    topic: tuple[str, ...]

    def record(self) -> dict:
        """A chat record ending with the user's turn: a prompt alone, as `overfill distill` and `overfill eval` read it."""
        return {"messages": [{"role": "user", "content": self.text}], "family": self.family}


def _topics(family: str) -> list[tuple[str, ...]]:
    return [t if isinstance(t, tuple) else (t,) for t in FAMILIES[family]["topics"]]


def is_heldout_topic(index: int) -> bool:
    return index % HELDOUT_EVERY == HELDOUT_EVERY - 1


def family_pool(family: str, heldout: bool) -> list[DemoPrompt]:
    """Every prompt of one family on its side of the split, in definition order.

    Training: training templates x training topics. Held out: every template (its own included) x
    held-out topics.
    """
    spec = FAMILIES[family]
    templates = spec["templates"]
    pool = []
    for index, topic in enumerate(_topics(family)):
        if is_heldout_topic(index) != heldout:
            continue
        for k, template in enumerate(templates):
            if k == len(templates) - 1 and not heldout:
                continue
            for extra in spec.get("extras", ("",)) if "{x}" in template else ("",):
                text = template.format(*topic, x=extra)
                pool.append(DemoPrompt(text[0].upper() + text[1:], family, k, topic))
    return pool


def deal(pools: list[list[DemoPrompt]], rng: random.Random) -> list[DemoPrompt]:
    """Shuffle each pool, then take one prompt from each in turn until all are used up."""
    shuffled = [rng.sample(pool, len(pool)) for pool in pools]
    out = []
    for i in range(max(map(len, shuffled), default=0)):
        out += [pool[i] for pool in shuffled if i < len(pool)]
    return out


def demo_prompts(seed: int = 0) -> tuple[list[DemoPrompt], list[DemoPrompt]]:
    """(training prompts, held-out prompts), each in the seeded dealt order; no prompt, topic or held-out template shared."""
    rng = random.Random(seed)
    train = deal([family_pool(f, heldout=False) for f in FAMILIES], rng)
    heldout = deal([family_pool(f, heldout=True) for f in FAMILIES], rng)
    return train, heldout


def chat_prompts(heldout: list[DemoPrompt], families: tuple[str, ...] = CHAT_FAMILIES) -> list[DemoPrompt]:
    """The first held-out prompt of each of `families`, in that order."""
    first = {}
    for p in heldout:
        first.setdefault(p.family, p)
    return [first[f] for f in families if f in first]


def write_prompts(path: Path, prompts: list[DemoPrompt]) -> Path:
    """The prompts as chat JSONL, rewritten only when they changed (a rerun leaves the file, and its replies, alone)."""
    text = "".join(json.dumps(p.record(), ensure_ascii=False) + "\n" for p in prompts)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return path
