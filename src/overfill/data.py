"""Chat records from files: the common shapes, turned into chat messages (DESIGN §1 data split).

Shapes understood, one record per JSONL line or per element of a JSON array:
- chat:     {"messages": [{"role": ..., "content": ...}, ...]}
- ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
- Alpaca:   {"instruction": ..., "input": ..., "output": ...}
- named:    prompt/response fields given by the caller (e.g. GSM8K's question/answer)
- plain:    {"text": ...} (calibration only: there is no reply to split off)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from overfill.errors import OverfillError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class RecordFile:
    """The records of one file, plus the lines that could not be parsed (1-based line numbers)."""

    path: str
    records: list[dict]
    broken_lines: list[int] = field(default_factory=list)


def read_records(path: str | Path) -> RecordFile:
    """Read a JSONL file (or one JSON array). Broken lines are counted, not fatal; an empty file is."""
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
        return RecordFile(str(path), [r for r in rows if isinstance(r, dict)])
    records, broken = [], []
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
        else:
            broken.append(number)
    return RecordFile(str(path), records, broken)


def record_to_messages(record: dict, prompt_field: str | None = None, response_field: str | None = None) -> list[dict] | None:
    """Normalise one record to [{"role", "content"}, ...]; None when the record has no recognised shape."""
    if prompt_field and response_field:
        prompt, response = record.get(prompt_field), record.get(response_field)
        if not isinstance(prompt, str) or not isinstance(response, str):
            return None
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
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
    return None


def chat_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
    """Token ids of a chat rendered with the tokenizer's own template (5.x returns a BatchEncoding)."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return list(encoded)


def calibration_ids(tokenizer, records: list[dict]) -> list[list[int]]:
    """Token ids of whole chats (context and reply alike) or plain texts, for activation statistics."""
    sequences = []
    for record in records:
        if isinstance(record.get("text"), str) and record["text"].strip():
            sequences.append(tokenizer(record["text"], add_special_tokens=True)["input_ids"])
            continue
        messages = record_to_messages(record)
        if messages and any(m["content"].strip() for m in messages):
            if getattr(tokenizer, "chat_template", None):
                sequences.append(chat_ids(tokenizer, messages, add_generation_prompt=False))
            else:
                text = "\n\n".join(m["content"] for m in messages)
                sequences.append(tokenizer(text, add_special_tokens=True)["input_ids"])
    return sequences


# ---------------------------------------------------------------- context / target split


@dataclass
class Example:
    """One training/eval pair: context x (ends with the generation prompt) and target y (reply + end of turn)."""

    context_ids: list[int]
    target_ids: list[int]


@dataclass
class Batch:
    context_ids: "torch.Tensor"  # [B, Tc] left-padded
    context_mask: "torch.Tensor"  # [B, Tc]
    target_ids: "torch.Tensor"  # [B, N] right-padded
    target_mask: "torch.Tensor"  # [B, N]


def split_messages(tokenizer, messages: list[dict]) -> Example | None:
    """Context = template(turns before the final reply, generation prompt); target = the reply's tokens
    up to and including the end-of-turn token, exactly as the template renders them in the whole chat.

    None when there is no final assistant reply or it is empty.
    """
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        return None
    context = chat_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    whole = chat_ids(tokenizer, messages, add_generation_prompt=False)
    if whole[: len(context)] != context:
        raise OverfillError("this chat template renders the context differently with and without the reply; overfill cannot split it")
    target = whole[len(context) :]
    end_of_turn = tokenizer.eos_token_id
    if end_of_turn in target:
        target = target[: target.index(end_of_turn) + 1]  # drop what the template adds after the turn
    return Example(context, target)


def truncate(example: Example, max_context: int | None, max_target: int | None) -> Example:
    """Keep the end of a long context (it holds the question) and the start of a long reply."""
    context = example.context_ids[-max_context:] if max_context else example.context_ids
    target = example.target_ids[:max_target] if max_target else example.target_ids
    return Example(list(context), list(target))


def collate(examples: list[Example], pad_id: int) -> Batch:
    import torch

    tc = max(len(e.context_ids) for e in examples)
    n = max(len(e.target_ids) for e in examples)
    batch = Batch(
        context_ids=torch.full((len(examples), tc), pad_id, dtype=torch.long),
        context_mask=torch.zeros((len(examples), tc), dtype=torch.long),
        target_ids=torch.full((len(examples), n), pad_id, dtype=torch.long),
        target_mask=torch.zeros((len(examples), n), dtype=torch.long),
    )
    for row, e in enumerate(examples):
        c, t = len(e.context_ids), len(e.target_ids)
        batch.context_ids[row, tc - c :] = torch.tensor(e.context_ids)
        batch.context_mask[row, tc - c :] = 1
        batch.target_ids[row, :t] = torch.tensor(e.target_ids)
        batch.target_mask[row, :t] = 1
    return batch
