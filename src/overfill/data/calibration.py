"""Calibration text for pruning (docs/design.md, "Pruning", step 1): the bundled chats, or records of a file as token ids.

Calibration reads whole chats, context and reply alike, since the decoder will compute both:
activations of the reply matter as much as those of the prompt. Plain {"text": ...} records
are taken as they are. The bundled set (resources/calibration.jsonl) makes `overfill prune`
run with no data of the user's; the bench builds its synthetic prompts from the same text.
"""

from __future__ import annotations

import json
from importlib import resources

from overfill.data.examples import chat_ids
from overfill.data.records import all_utf8, record_to_messages


def bundled_calibration_records() -> list[dict]:
    text = resources.files("overfill").joinpath("resources/calibration.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def calibration_ids(tokenizer, records: list[dict]) -> list[list[int]]:
    """Token ids of whole chats (context and reply alike) or plain texts, for activation statistics."""
    sequences = []
    for record in records:
        if isinstance(record.get("text"), str) and record["text"].strip():
            if not all_utf8([record["text"]]):
                continue  # skipped like a broken line: it cannot be tokenized
            sequences.append(tokenizer(record["text"], add_special_tokens=True)["input_ids"])
            continue
        messages = record_to_messages(record)
        if messages and any(m["content"].strip() for m in messages) and all_utf8(m["content"] for m in messages):
            if getattr(tokenizer, "chat_template", None):
                sequences.append(chat_ids(tokenizer, messages, add_generation_prompt=False))
            else:
                text = "\n\n".join(m["content"] for m in messages)
                sequences.append(tokenizer(text, add_special_tokens=True)["input_ids"])
    return sequences
