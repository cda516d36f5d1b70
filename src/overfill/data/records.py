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
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from overfill.errors import OverfillError, first_undecodable

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
    not_utf8: list[int] = field(default_factory=list)  # bytes that are not UTF-8 text

    @property
    def looked_at(self) -> int:
        """Records and unusable lines alike: what a summary counts as records read."""
        return len(self.records) + len(self.broken_lines) + len(self.not_objects) + len(self.not_utf8)


# How much of a file is looked at to tell text from binary data (as git and grep do).
SNIFF_BYTES = 8192


def _read(path: Path, size: int = -1, what: str = "data file") -> bytes:
    # The check is the read itself: whatever stops it (no such file, a folder, a file on the way, permissions, a
    # place like /proc that refuses reads) is named from the error the read raised.
    try:
        # Non-blocking: opening a pipe to read would otherwise wait for a writer that may never come (POSIX only).
        with open(path, "rb", opener=lambda name, flags: os.open(name, flags | getattr(os, "O_NONBLOCK", 0))) as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise OverfillError(f"{what} {path} is not a regular file (a pipe or device can be read only once, and "
                                    "the data is read more than once): save it to a file and pass that")
            data = handle.read(size)
    except OSError as err:
        raise OverfillError(f"{what} {path} {_unreadable(err)}: pass a JSONL or JSON file you can read") from None
    # A NUL byte never occurs in JSON text (it must be escaped); it does in weights, archives and UTF-16.
    if b"\0" in data[:SNIFF_BYTES]:
        raise OverfillError(f"{what} {path} is not a text file (it holds binary data, e.g. model weights or UTF-16 "
                            "text): pass a JSONL or JSON file saved as UTF-8")
    return data


def _unreadable(err: OSError) -> str:
    if isinstance(err, FileNotFoundError):
        return "does not exist"
    if isinstance(err, IsADirectoryError):
        return "is a folder"
    return f"cannot be read ({err.strerror or type(err).__name__})"


def check_records(path: str | Path, what: str = "data file") -> RecordFile:
    """The file's records, or one error line when it cannot be read or parsed into any JSON record.

    What a config's check_files() calls: a file of text that is not JSON (a CSV, a truncated JSON
    array) is refused here, before any model loads, instead of after. Reading it again later is
    cheap next to loading a model.
    """
    found = read_records(path, what)
    if not found.records:
        raise OverfillError(f"{what} {path} holds no JSON records ({found.looked_at} {found.unit}s read, none a JSON "
                            "object): pass a JSONL file with one JSON object per line, or a JSON array of objects")
    return found


def read_bytes(path: Path, what: str = "data file") -> bytes:
    """The file's bytes without a UTF-8 byte order mark; an OverfillError for a binary or unreadable file."""
    return _read(path, what=what).removeprefix(b"\xef\xbb\xbf")


def _decode_whole(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise OverfillError(f"data file {path} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}): "
                            "save it as UTF-8, or as JSONL so that only the broken lines are skipped") from None


def read_records(path: str | Path, what: str = "data file") -> RecordFile:
    """Read a JSONL file (or one JSON array / object). Broken lines are counted, not fatal; an empty file is.

    JSONL is decoded line by line, so a line that is not UTF-8 is skipped and counted like a line
    that is not JSON; a JSON array or object is one text and must be UTF-8 throughout.
    """
    path = Path(path)
    data = read_bytes(path, what)
    if not data.strip():
        raise OverfillError(f"{what} {path} is empty: pass a JSONL file with one record per line")
    stripped = data.lstrip()
    if stripped.startswith(b"["):
        try:
            rows = json.loads(_decode_whole(path, stripped))
        except json.JSONDecodeError as err:
            raise OverfillError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno}): fix it or use JSONL") from None
        numbered = list(enumerate(rows, start=1))
        return RecordFile(str(path), [r for _, r in numbered if isinstance(r, dict)],
                          numbers=[n for n, r in numbered if isinstance(r, dict)],
                          not_objects=[n for n, r in numbered if not isinstance(r, dict)], unit="item")
    found = RecordFile(str(path), [])
    # Split bytes on newlines only: JSON strings may hold U+2028 and friends, which str.splitlines would cut at.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            found.not_utf8.append(number)
            continue
        except json.JSONDecodeError:
            found.broken_lines.append(number)
            continue
        if isinstance(row, dict):
            found.records.append(row)
            found.numbers.append(number)
        else:
            found.not_objects.append(number)
    if not found.records and stripped.startswith(b"{"):  # one pretty-printed JSON object
        try:
            row = json.loads(stripped.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None  # then it is JSONL after all, and its lines are reported as such
        if isinstance(row, dict):
            return RecordFile(str(path), [row], numbers=[1], unit="item")
    return found


def record_to_messages(record: dict, prompt_field: str | None = None, response_field: str | None = None) -> list[dict] | None:
    """Normalise one record to [{"role", "content"}, ...]; None when the record has no recognised shape.

    A `prompt_field` without a `response_field` reads prompts alone (what `overfill distill` answers).
    """
    if prompt_field:
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


def _pair_messages(record: dict, prompt_field: str, response_field: str | None) -> list[dict] | None:
    prompt, response = record.get(prompt_field), record.get(response_field) if response_field else None
    if not isinstance(prompt, str):
        return None
    if response is None:  # a prompt without a reply: recognised, but nothing to learn
        return [{"role": "user", "content": prompt}]
    if not isinstance(response, str):
        return None
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def all_utf8(texts) -> bool:
    """Whether every text can be encoded (and so tokenized): valid JSON may still escape a lone surrogate."""
    return all(first_undecodable(text) is None for text in texts)
