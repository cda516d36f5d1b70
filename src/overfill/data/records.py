"""Reading record files (JSONL, or one JSON array / object) and bringing each record's shape to a chat.

Shapes understood (data.py turns the chats into training pairs):
- chat:     {"messages": [{"role": ..., "content": ...}, ...]}
- ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
- Alpaca:   {"instruction": ..., "input": ..., "output": ...}
- named:    prompt/response fields given by the caller (e.g. GSM8K's question/answer), or one of
            the common pairs in PAIRS when no other shape matches
Broken lines and records of no known shape are counted, not fatal, so callers can report them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from overfill.errors import OverfillError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# Prompt/response field pairs recognised without flags, in this order.
PAIRS = (("prompt", "response"), ("prompt", "completion"), ("question", "answer"), ("query", "response"))


@dataclass
class RecordFile:
    """The records of one file, where each came from, and the lines that could not be used.

    Numbers are 1-based JSONL line numbers, or item numbers for a JSON array (`unit` says which).
    """

    path: str
    records: list[dict]
    broken_lines: list[int] = field(default_factory=list)  # not JSON
    numbers: list[int] = field(default_factory=list)  # one per record
    not_objects: list[int] = field(default_factory=list)  # JSON, but not an object
    unit: str = "line"


def read_records(path: str | Path) -> RecordFile:
    """Read a JSONL file (or one JSON array / object). Broken lines are counted, not fatal; an empty file is."""
    path = Path(path)
    if not path.is_file():
        raise OverfillError(f"data file {path} does not exist: pass a JSONL or JSON file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise OverfillError(f"data file {path} is empty: pass a JSONL file with one record per line")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise OverfillError(f"data file {path} is not valid JSON ({err.msg} at line {err.lineno}): fix it or use JSONL") from None
        numbered = list(enumerate(rows, start=1))
        return RecordFile(str(path), [r for _, r in numbered if isinstance(r, dict)],
                          numbers=[n for n, r in numbered if isinstance(r, dict)],
                          not_objects=[n for n, r in numbered if not isinstance(r, dict)], unit="item")
    records, numbers, broken, not_objects = [], [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            broken.append(number)
            continue
        if isinstance(row, dict):
            records.append(row)
            numbers.append(number)
        else:
            not_objects.append(number)
    if not records and stripped.startswith("{"):  # one pretty-printed JSON object
        try:
            row = json.loads(stripped)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            return RecordFile(str(path), [row], numbers=[1], unit="item")
    return RecordFile(str(path), records, broken, numbers, not_objects)


def record_to_messages(record: dict, prompt_field: str | None = None, response_field: str | None = None) -> list[dict] | None:
    """Normalise one record to [{"role", "content"}, ...]; None when the record has no recognised shape."""
    if prompt_field and response_field:
        return _pair_messages(record, prompt_field, response_field)
    if isinstance(record.get("messages"), list):
        turns = [t for t in record["messages"] if isinstance(t, dict)]
        return [{"role": str(t.get("role", "")), "content": str(t.get("content") or "")} for t in turns]
    if isinstance(record.get("conversations"), list):
        turns = []
        for t in record["conversations"]:
            if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES:
                return None
            turns.append({"role": SHAREGPT_ROLES[t["from"]], "content": str(t.get("value") or "")})
        return turns
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    for prompt_key, response_key in PAIRS:
        if isinstance(record.get(prompt_key), str) and isinstance(record.get(response_key), str):
            return _pair_messages(record, prompt_key, response_key)
    return None


def _pair_messages(record: dict, prompt_field: str, response_field: str) -> list[dict] | None:
    prompt, response = record.get(prompt_field), record.get(response_field)
    if not isinstance(prompt, str):
        return None
    if response is None:  # a prompt without a reply: recognised, but nothing to learn
        return [{"role": "user", "content": prompt}]
    if not isinstance(response, str):
        return None
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
