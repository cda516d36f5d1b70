"""Chat records from files turned into (context, target) training pairs (docs/design.md, "The method").

Records are read and their shapes (chat messages, ShareGPT, Alpaca, prompt/response fields)
brought to a chat by records.py; plain {"text": ...} records serve calibration only (there is no
reply to split off, calibration.py).

The split (paper §3.2, with the handoff fixed as docs/design.md, "The method", says): the context is exactly what
`apply_chat_template(turns before the final reply, add_generation_prompt=True)` renders, the
target is the reply's tokens up to and including the end-of-turn token, at training and at
inference alike. `load_examples` does it for a whole file and says which records it skipped and
why; `load_data` adds the train/validation split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from overfill.config import Settings, at_least
from overfill.data.records import all_utf8, check_records, read_records, record_to_messages
from overfill.errors import OverfillError
from overfill.tensors import left_pad, right_pad


class ChatTemplateError(OverfillError):
    """The tokenizer's chat template rejected a conversation."""


def chat_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
    """Token ids of a chat rendered with the tokenizer's own template (5.x returns a BatchEncoding)."""
    from jinja2 import TemplateError

    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    except Exception as err:
        # A template is a program of the model's: besides jinja2's own errors (a refused system turn, roles that do not
        # alternate) it raises whatever Python raises inside it (TypeError, ZeroDivisionError, ...); any of them means
        # this conversation cannot be rendered.
        if isinstance(err, TemplateError):
            reason, fix = str(err), "change the roles or order of the turns"
        else:
            reason, fix = f"{type(err).__name__}: {err}", "the template fails on it: fix the model's chat_template"
        raise ChatTemplateError(f"the model's chat template refuses this conversation ({' '.join(reason.split())}): "
                                f"{fix}") from None
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return list(encoded)


# ---------------------------------------------------------------- context / target split


@dataclass
class Example:
    """One training/eval pair: context x (ends with the generation prompt) and target y (reply + end of turn)."""

    context_ids: list[int]
    target_ids: list[int]


@dataclass
class Batch:
    context_ids: torch.Tensor  # [B, Tc] left-padded
    context_mask: torch.Tensor  # [B, Tc]
    target_ids: torch.Tensor  # [B, N] right-padded
    target_mask: torch.Tensor  # [B, N]

    def to(self, device) -> "Batch":
        return Batch(self.context_ids.to(device), self.context_mask.to(device), self.target_ids.to(device),
                     self.target_mask.to(device))


def split_messages(tokenizer, messages: list[dict]) -> Example | None:
    """Context = template(turns before the final reply, generation prompt); target = the reply's tokens
    up to and including the end-of-turn token, exactly as the template renders them in the whole chat.

    None when there is no final assistant reply, it is empty, or the template renders the context
    differently inside the whole chat (the handoff would fall inside a token).
    """
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        return None
    context = chat_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    whole = chat_ids(tokenizer, messages, add_generation_prompt=False)
    if whole[: len(context)] != context:
        return None  # the reply's first characters merge with the generation prompt into one token
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
    """Contexts left-padded (their last column is where y1 is predicted), replies right-padded."""
    context_ids, context_mask = left_pad([e.context_ids for e in examples], pad_id)
    target_ids, target_mask = right_pad([e.target_ids for e in examples], pad_id)
    return Batch(context_ids, context_mask, target_ids, target_mask)


def check_examples_fit(examples: list[Example], limit: int | None, *, path: str, new_tokens: int | None = None) -> None:
    """Refuse examples the model cannot hold: context + reply (or context + `new_tokens` generated)
    beyond its `limit` positions would run past what it was trained on, silently.

    The message names the longest example and the --max-context that makes everything fit.
    """
    if not limit or not examples:
        return
    reply = lambda e: max(len(e.target_ids), new_tokens or 0)  # noqa: E731 - the reply room an example needs
    over = [e for e in examples if len(e.context_ids) + reply(e) > limit]
    if not over:
        return
    worst = max(over, key=lambda e: len(e.context_ids) + reply(e))
    longest_reply = max(len(e.target_ids) for e in examples)
    room = max(longest_reply, new_tokens or 0)
    generating = bool(new_tokens) and new_tokens >= longest_reply  # then --max-new-tokens sets the room
    if room >= limit:
        fix = f"lower {'--max-new-tokens' if generating else '--max-target'} below {limit}, and --max-context with it"
    else:
        fix = (f"pass --max-context {limit - room} or less (each context keeps its end)"
               + (", or lower --max-new-tokens" if generating else ""))
    generated = f" and --max-new-tokens {new_tokens}" if new_tokens else ""
    raise OverfillError(
        f"{len(over)} of {len(examples)} examples of {path} need more positions than the model has ({limit}): the "
        f"longest is {len(worst.context_ids)} context tokens + {reply(worst)} for its reply{generated}: {fix}")


# ---------------------------------------------------------------- whole files -> examples

@dataclass
class LoadedData:
    """The usable examples of one file and what was skipped: reason -> record numbers (1-based)."""

    path: str
    examples: list[Example]
    records: int  # records looked at (broken lines included)
    skipped: dict[str, list[int]] = field(default_factory=dict)
    unit: str = "line"  # what the numbers count: JSONL lines, or items of a JSON array
    truncated_contexts: int = 0
    truncated_targets: int = 0
    noun: ClassVar[str] = "examples"  # what the file's usable records became, in the summary

    @property
    def skipped_count(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self, show: int = 8) -> str:
        """One line: '<path>: 12 records -> 9 examples; skipped 3 (broken JSON: line 4; empty text: lines 7, 9)'."""
        text = f"{self.path}: {self.records} records -> {len(self.examples)} {self.noun}"
        if self.skipped_count:
            parts = []
            for reason, numbers in self.skipped.items():
                listed = ", ".join(map(str, numbers[:show])) + (f", ... ({len(numbers) - show} more)" if len(numbers) > show else "")
                parts.append(f"{reason}: {self.unit}{'s' if len(numbers) > 1 else ''} {listed}")
            text += f"; skipped {self.skipped_count} ({'; '.join(parts)})"
        if self.truncated_contexts or self.truncated_targets:
            text += f"; truncated {self.truncated_contexts} contexts and {self.truncated_targets} replies"
        return text

    def as_dict(self) -> dict:
        return {"path": self.path, "records": self.records, "examples": len(self.examples), "unit": self.unit,
                "skipped": self.skipped, "truncated_contexts": self.truncated_contexts,
                "truncated_targets": self.truncated_targets}


def _final_reply(messages: list[dict]) -> tuple[list[dict] | None, str | None]:
    """Cut the chat after its last assistant turn; (messages, None) or (None, skip reason)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return None, "no assistant reply"
    messages = messages[: last + 1]
    if not messages[-1]["content"].strip() or not any(m["content"].strip() for m in messages[:-1]):
        return None, "empty text"  # no reply text, or nothing before it to reply to
    return messages, None


def read_skipping(path, loaded_class):
    """A file's records, an empty `loaded_class` result for it, and `skip(reason, number)`, with the
    lines that are no records at all (not UTF-8, broken JSON, no object) already counted."""
    source = read_records(path)
    loaded = loaded_class(str(path), [], source.looked_at, unit=source.unit)

    def skip(reason: str, number: int):
        loaded.skipped.setdefault(reason, []).append(number)

    for number in source.not_utf8:
        skip("not UTF-8", number)
    for number in source.broken_lines:
        skip("broken JSON", number)
    for number in source.not_objects:
        skip("unrecognised shape", number)
    return source, loaded, skip


def usable_messages(source, loaded, skip, prompt_field: str | None, response_field: str | None, *,
                    limit: int | None, used, last_used):
    """(record number, chat messages) of each record with a known shape and UTF-8 text, the others skipped.

    Stops once `used()` results reach `limit`, forgetting the skips past `last_used()` (the number of
    the last record used): a quick run on a big file reports the records it looked at, not the rest.
    """
    for number, record in zip(source.numbers, source.records):
        if limit is not None and used() >= limit:
            cutoff = last_used()
            loaded.skipped = {r: kept for r, ns in loaded.skipped.items() if (kept := [n for n in ns if n < cutoff])}
            loaded.records = used() + loaded.skipped_count
            return
        messages = record_to_messages(record, prompt_field, response_field)
        if messages is None:
            skip("unrecognised shape", number)
        elif not all_utf8(m["content"] for m in messages):  # e.g. a JSON "\ud800" escape: no tokenizer takes it
            skip("not UTF-8", number)
        else:
            yield number, messages


def load_examples(path: str | Path, tokenizer, *, prompt_field: str | None = None, response_field: str | None = None,
                  max_context: int | None = None, max_target: int | None = None, limit: int | None = None) -> LoadedData:
    """Read a JSONL/JSON file of chat records and split each into (context ids, target ids).

    Long contexts keep their end (the question), long replies their start. Unusable records are
    skipped and counted by reason; a file with none usable is an OverfillError. `limit` stops
    after that many usable examples (quick runs on big files).
    """
    if bool(prompt_field) != bool(response_field):
        raise OverfillError("--prompt-field and --response-field go together: pass both (e.g. question and answer) or neither")
    if max_target is not None and max_target < 2:
        raise OverfillError(f"max_target must be at least 2 (the decoder learns reply tokens 2..N), got {max_target}")
    if not getattr(tokenizer, "chat_template", None):
        raise OverfillError("the tokenizer has no chat template, so contexts cannot be rendered as generation sees them: "
                            "use a chat (instruct) model")
    source, loaded, skip = read_skipping(path, LoadedData)
    last_used = 0
    for number, messages in usable_messages(source, loaded, skip, prompt_field, response_field, limit=limit,
                                            used=lambda: len(loaded.examples), last_used=lambda: last_used):
        messages, reason = _final_reply(messages)
        if reason:
            skip(reason, number)
            continue
        try:
            example = split_messages(tokenizer, messages)
        except ChatTemplateError:  # e.g. "roles must alternate user/assistant"
            skip("rejected by the chat template", number)
            continue
        if example is None:  # _final_reply already ruled out a missing or empty reply
            skip("context and reply share a token at the handoff", number)
            continue
        if len(example.target_ids) < 2:  # only token 1 (the full model's); nothing for the decoder
            skip("reply under 2 tokens", number)
            continue
        cut = truncate(example, max_context, max_target)
        loaded.truncated_contexts += len(cut.context_ids) < len(example.context_ids)
        loaded.truncated_targets += len(cut.target_ids) < len(example.target_ids)
        loaded.examples.append(cut)
        last_used = number
    for numbers in loaded.skipped.values():
        numbers.sort()
    if not loaded.examples:
        shape = (f"fields '{prompt_field}'/'{response_field}'" if prompt_field else
                 "chat `messages`, ShareGPT `conversations`, Alpaca `instruction`/`output`, or pass --prompt-field/--response-field")
        raise OverfillError(f"{path} has no usable records ({loaded.summary(show=3).split('; ', 1)[-1]}): each record needs {shape} "
                            "with a non-empty assistant reply")
    return loaded


# ---------------------------------------------------------------- train / validation split


@dataclass
class RecordFields(Settings):
    """Which file to read and how its records become (context, reply) pairs: what training and evaluation share."""


    # Whether a prompt field may come without a response field (evaluation's agreement measures need no replies).
    prompts_alone_allowed: ClassVar[bool] = False

    data: str = ""
    """A JSONL/JSON file of chat messages, ShareGPT, Alpaca, or prompt/response records."""
    prompt_field: str | None = None
    """Record field holding the prompt (e.g. GSM8K's 'question'); use with --response-field."""
    response_field: str | None = None
    """Record field holding the reply (e.g. GSM8K's 'answer')."""
    max_context: int | None = 1024
    """Keep at most this many context tokens (the end of the context is kept)."""
    max_target: int | None = 1024
    """Keep at most this many reply tokens (the start of the reply is kept)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.data:
            raise OverfillError("no data file given: pass --data FILE.jsonl")
        alone = bool(self.prompt_field) and not self.response_field and not self.prompts_alone_allowed
        if alone or (self.response_field and not self.prompt_field):
            raise OverfillError("--prompt-field and --response-field go together: pass both (e.g. question and answer) or neither")
        at_least(self, 1, "max_context")
        if self.max_target is not None and self.max_target < 2:
            raise OverfillError(f"--max-target must be at least 2 (the decoder learns reply tokens 2..N), got {self.max_target}")

    def check_files(self) -> None:
        super().check_files()
        check_records(self.data, "--data")  # read and parsed here, before any model loads

    def read(self, tokenizer, *, path: str | None = None, limit: int | None = None) -> LoadedData:
        """The (context, reply) pairs of `path` (default: --data), read with these fields and limits."""
        return load_examples(path or self.data, tokenizer, prompt_field=self.prompt_field,
                             response_field=self.response_field, max_context=self.max_context,
                             max_target=self.max_target, limit=limit)


@dataclass
class DataConfig(RecordFields):
    """Training data: RecordFields plus the validation split."""

    val_data: str | None = None
    """Separate validation file; without it, --val-size examples of --data are held out (chosen by --seed)."""
    val_size: int = 100
    """Validation examples (held out of --data, or the first ones of --val-data); 0 = no validation."""
    limit: int | None = None
    """Read only the first N usable examples of --data, validation hold-out included (quick runs); the name every command uses for it (formerly --max-examples)."""
    seed: int = 0
    """Seed for the validation hold-out (and, in training, for data order and initialisation)."""

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 0, "val_size")
        at_least(self, 1, "limit")

    def check_files(self) -> None:
        super().check_files()
        if self.val_data:
            check_records(self.val_data, "--val-data")


@dataclass
class DataSplits:
    train: list[Example]
    val: list[Example]
    sources: list[LoadedData]

    def summary(self) -> str:
        return f"{len(self.train)} training and {len(self.val)} validation examples"


def split_train_val(examples: list[Example], val_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `val_size` examples chosen by `seed`; both parts keep the file order."""
    if val_size == 0:
        return list(examples), []
    if val_size >= len(examples):
        raise OverfillError(f"only {len(examples)} usable examples, so {val_size} cannot be held out for validation: "
                            "lower --val-size or pass --val-data")
    held = set(random.Random(seed).sample(range(len(examples)), val_size))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def load_data(config: DataConfig, tokenizer) -> DataSplits:
    """Training and validation examples as `config` says (separate file, or a seeded hold-out)."""
    train = config.read(tokenizer, limit=config.limit)
    if config.val_data:
        val = config.read(tokenizer, path=config.val_data, limit=config.val_size) if config.val_size else None
        return DataSplits(train.examples, val.examples if val else [], [train] + ([val] if val else []))
    train_part, val_part = split_train_val(train.examples, config.val_size, config.seed)
    return DataSplits(train_part, val_part, [train])
