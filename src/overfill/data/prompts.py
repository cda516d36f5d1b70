"""The prompt side of record files: what `overfill distill` asks the full model to answer.

Records are read and brought to a chat by records.py, as for training. A record's prompt is its
chat without the final reply: the turns before its last turn when that is an assistant turn (a
training file, whose reply is replaced), or all its turns (a file of prompts alone: chats that end
with a user turn, or `--prompt-field` without a reply field). The context is exactly the one
examples.py builds from the same turns, `apply_chat_template(turns, add_generation_prompt=True)`,
so a reply generated after it continues the very context training will see.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from overfill.data.examples import ChatTemplateError, LoadedData, chat_ids, read_skipping, usable_messages
from overfill.errors import OverfillError


@dataclass
class Prompt:
    """One record's prompt: its number in the file, its turns, and their context ids."""

    number: int  # 1-based JSONL line, or item of a JSON array
    turns: list[dict]  # [{"role", "content"}, ...] without the final reply
    context_ids: list[int]  # the chat template of `turns` with the generation prompt


@dataclass
class LoadedPrompts(LoadedData):
    """The usable prompts of one file (in file order) and what was skipped: reason -> record numbers."""

    examples: list[Prompt]
    noun: ClassVar[str] = "prompts"

    @property
    def prompts(self) -> list[Prompt]:
        return self.examples


def prompt_turns(messages: list[dict]) -> tuple[list[dict] | None, str | None]:
    """The chat without its final reply; (turns, None) or (None, skip reason)."""
    turns = messages[:-1] if messages and messages[-1]["role"] == "assistant" else list(messages)
    if not any(t["content"].strip() for t in turns):
        return None, "empty text"  # nothing to reply to
    return turns, None


def load_prompts(path: str | Path, tokenizer, *, prompt_field: str | None = None, response_field: str | None = None,
                 limit: int | None = None, max_context: int | None = None, too_long: str | None = None) -> LoadedPrompts:
    """The prompts of a JSONL/JSON file of any shape `overfill train` reads, in file order.

    Unusable records are skipped and counted by reason, as `load_examples` does; so are prompts of
    more than `max_context` tokens (reason `too_long`), which are never cut: a reply must continue
    the very context training will see. A file with no usable prompt is an OverfillError. `limit`
    stops after that many usable prompts.
    """
    if response_field and not prompt_field:
        raise OverfillError("--response-field needs --prompt-field (the field the prompt is in), e.g. --prompt-field question")
    if not getattr(tokenizer, "chat_template", None):
        raise OverfillError("the tokenizer has no chat template, so prompts cannot be rendered as training renders them: "
                            "use a chat (instruct) model")
    source, loaded, skip = read_skipping(path, LoadedPrompts)
    for number, messages in usable_messages(source, loaded, skip, prompt_field, response_field, limit=limit,
                                            used=lambda: len(loaded.prompts), last_used=lambda: loaded.prompts[-1].number):
        turns, reason = prompt_turns(messages)
        if reason:
            skip(reason, number)
            continue
        try:
            context = chat_ids(tokenizer, turns, add_generation_prompt=True)
        except ChatTemplateError:
            skip("rejected by the chat template", number)
            continue
        if max_context is not None and len(context) > max_context:
            skip(too_long or f"over {max_context} context tokens", number)
            continue
        loaded.prompts.append(Prompt(number, turns, context))
    for numbers in loaded.skipped.values():
        numbers.sort()
    if not loaded.prompts:
        shape = (f"the field '{prompt_field}'" if prompt_field else
                 "chat `messages`, ShareGPT `conversations`, Alpaca `instruction`/`output`, or pass --prompt-field")
        raise OverfillError(f"{path} has no usable prompts ({loaded.summary(show=3).split('; ', 1)[-1]}): each record "
                            f"needs {shape} with non-empty text")
    return loaded
