"""Benchmark prompts: real text (the bundled calibration chats) cut to an exact token count inside the chat template."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from overfill.errors import OverfillError

SENTINEL = "<<<overfill-bench-prompt>>>"


@dataclass
class PromptSource:
    """Chat-template frame around a long real text; `batch` cuts it to an exact token count."""

    head: list[int]  # template tokens before the user's text
    body: list[int]  # the bundled calibration chats, tokenized once
    tail: list[int]  # end of the user turn + generation prompt

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "PromptSource":
        from overfill.data.calibration import bundled_calibration_records
        from overfill.data.records import record_to_messages

        texts = [m["content"] for r in bundled_calibration_records() for m in (record_to_messages(r) or [])]
        body = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
        head, tail = [], []
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}],
                                                     add_generation_prompt=True, tokenize=False)
            head_text, tail_text = rendered.split(SENTINEL)
            head = tokenizer(head_text, add_special_tokens=False)["input_ids"]
            tail = tokenizer(tail_text, add_special_tokens=False)["input_ids"]
        return cls(head, body, tail)

    def batch(self, length: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[rows, length] ids and mask; rows start at different places in the text (no padding)."""
        n = length - len(self.head) - len(self.tail)
        if n < 1:
            raise OverfillError(f"prompt length {length} is too short: this chat template alone takes "
                                f"{len(self.head) + len(self.tail)} tokens, ask for more")
        stride = max(len(self.body) // max(rows, 1), 1)
        ids = []
        for row in range(rows):
            start = row * stride
            text = [self.body[(start + i) % len(self.body)] for i in range(n)]
            ids.append(self.head + text + self.tail)
        ids = torch.tensor(ids, dtype=torch.long)
        return ids, torch.ones_like(ids)
