"""One decoding loop for every mode (docs/design.md, "Modes"; paper §3, Figure 1).

The handoff is one line in `generate_ids`: the *prefill model* reads the prompt and picks the
first token (`modeling.prefill`), the *decode model* produces every later token while reading
and extending the prefill model's KV cache (`modeling.decode`). `OverFillModel.stages(mode)`
picks the pair, so the three modes run the very same loop and benchmarks compare like with like.
Each half is a top-level function that can be timed or compiled alone (after gpt-fast).
Shapes: B rows (prompts x candidates), T cached tokens, V vocabulary.
"""

from __future__ import annotations

import time
import typing
import warnings
from dataclasses import dataclass, field
from typing import Final, Iterator, Literal

import torch
from transformers import DynamicCache

from overfill.config import as_tuple, at_least
from overfill.decode_step import seconds_compiling, step_function
from overfill.devices import model_device
from overfill.errors import OverfillError, OverfillWarning, check_utf8
from overfill.modeling import MODES, Mode, prefill
from overfill.refresh import refresh
from overfill.sampling import RowState, Sampling, Step, TokenChooser
from overfill.speculative import Drafter, Speculation, speculative_ids
from overfill.stops import cut_at_stop, stop_checker, stream_steps
from overfill.tensors import left_pad, pad_id_of

# ---------------------------------------------------------------- choosing tokens


GenerationMode = Literal[Mode, "speculative"]
GENERATION_MODES: Final[tuple[str, ...]] = (*MODES, "speculative")
DRAFTERS: Final[tuple[str, ...]] = typing.get_args(Drafter)


@dataclass
class GenerationConfig(Sampling):

    mode: GenerationMode = "overfill"
    """overfill (the full model prefills, the decoder decodes), full (the full model alone), pruned (the decoder alone), or speculative (the decoder drafts, the full model verifies: the full model's own reply)."""
    max_new_tokens: int = 256
    """Upper bound on reply tokens (the first, full-model token included)."""
    num_return_sequences: int = 1
    """Candidates per prompt; the prompt is prefilled once and its cache repeated."""
    stop: tuple[str, ...] = ()
    """Stop strings; the reply is cut before the first one."""
    truncate: bool = False
    """Cut a prompt too long for the model's context from the left (its end is kept), with a warning; default: refuse it."""
    refresh_every: int = 0
    """Prefill refresh (overfill mode): every K reply tokens the full model re-reads them, replacing the decoder's KV for them and picking the next token (0 = off)."""
    draft_tokens: int = 4
    """Speculative mode: tokens the decoder drafts per pass of the full model."""
    drafter: Drafter = "overfill"
    """Speculative mode: the decoder drafts on the full model's cache (overfill) or on a cache of its own, from its own prefill (pruned)."""
    compile: bool | None = None
    """Decode with a compiled step on a static KV cache (CUDA graphs on a GPU, inductor on a CPU; speculative mode: the drafts): --compile, --no-compile, or neither to let the command decide by device and workload (it says what it chose)."""

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in GENERATION_MODES:
            raise OverfillError(f"--mode got unknown mode '{self.mode}': pick one of {', '.join(GENERATION_MODES)}")
        at_least(self, 1, "draft_tokens", "max_new_tokens", "num_return_sequences")
        if self.drafter not in DRAFTERS:
            raise OverfillError(f"--drafter got '{self.drafter}': pick {' or '.join(DRAFTERS)}")
        if self.mode == "speculative" and self.refresh_every:
            raise OverfillError("--refresh-every and speculative mode both hand tokens to the full model: pick one")
        if self.refresh_every < 0:
            raise OverfillError(f"--refresh-every must be 0 (off) or a number of tokens, got {self.refresh_every}")
        self.stop = as_tuple(self.stop)  # one string is one stop string, not a tuple of its characters
        if any(not s for s in self.stop):
            raise OverfillError("an empty stop string would end every reply at once: drop it")
        for stop in self.stop:
            check_utf8(stop, f"stop string {stop!r}")


# ---------------------------------------------------------------- the loop


@torch.inference_mode()
def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig,
                 *, eos_ids: set[int], pad_id: int, is_stopped=None,
                 cache: DynamicCache | None = None, past_lengths: torch.Tensor | None = None,
                 chooser: TokenChooser | None = None, speculation: Speculation | None = None) -> Iterator[Step]:
    """Yield one Step per generated token. Rows are prompts repeated num_return_sequences times.

    Runs where the models are: ids and masks move to the prefill model's device. `cache`/`past_lengths`
    continue an existing conversation (the cache must hold prefill-model KV; it keeps the context's KV).
    `is_stopped(row, new_token_ids) -> bool` lets the caller end a row on a stop string.
    `chooser` replaces the one `config` makes (e.g. a TokenChooser seeded row by row).
    With `config.refresh_every` K (overfill mode), step K, 2K, ... is a `refresh` instead of a decoder step.
    With `config.compile` the decoder's steps run compiled on a StaticCache (decode_step.py).
    Speculative mode is speculative.speculative_ids (the decoder drafts, the full model verifies), which
    counts what it drafted and kept in `speculation`.
    """
    if config.mode == "speculative":
        device = model_device(model.full)
        yield from speculative_ids(model, input_ids.to(device), attention_mask.to(device), config, eos_ids=eos_ids,
                                   pad_id=pad_id, is_stopped=is_stopped, chooser=chooser, cache=cache,
                                   past_lengths=None if past_lengths is None else past_lengths.to(device),
                                   stats=speculation)
        return
    prefill_model, decode_model = model.stages(config.mode)
    device = model_device(prefill_model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    past_lengths = None if past_lengths is None else past_lengths.to(device)
    every = config.refresh_every if config.mode == "overfill" else 0  # full: nothing to refresh; pruned: no full model
    chooser = TokenChooser(config) if chooser is None else chooser
    n = config.num_return_sequences
    columns = attention_mask.shape[1] + config.max_new_tokens  # cache columns the longest row can reach
    step = step_function(decode_model, device, config.compile, columns)
    started = time.perf_counter()
    # Decoding appends to the cache every step: in place, into spare room, never re-concatenated.
    cache = step.new_cache(prefill_model, input_ids.shape[0], columns) if cache is None else cache
    logits, cache = prefill(prefill_model, input_ids, attention_mask, cache, past_lengths)
    cache = step.adopt(cache, columns)  # a caller's cache keeps the context; the reply goes on here
    # Several candidates share one prefill: repeat the cache, never re-run the prompt.
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, 0)
        attention_mask = attention_mask.repeat_interleave(n, 0)
    state = RowState(logits.shape[0], device, eos_ids, pad_id, is_stopped)
    lengths = attention_mask.sum(-1)  # [B] real tokens in the cache
    block_start = attention_mask.shape[1]  # cache columns that hold full-model KV

    for index in range(config.max_new_tokens):
        if every and index > 0 and index % every == 0:
            # state.tokens [B, index]: the block is its last K tokens; lengths - 1 is the newest one's position.
            logits = refresh(prefill_model, state.tokens[:, -every:], attention_mask, cache, block_start, lengths - every)
            block_start = attention_mask.shape[1]
        elif index > 0:
            # The handoff: from here on `decode_model` reads and extends `prefill_model`'s cache.
            logits = step(tokens, lengths - 1, cache, attention_mask)  # noqa: F821 - tokens: chosen at the previous step
        tokens = state.record(chooser(logits, state.tokens))
        yield state.step(tokens, time.perf_counter() - started)
        started = time.perf_counter()  # the caller's time between steps is not the model's
        if state.done:
            return
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        lengths = lengths + 1


@dataclass
class RowReply:
    """One row's reply as the loop made it: its token ids (the stop token included), why it ended, and the
    steps it took (prefill + first token is step 1)."""

    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length" | "interrupted"
    steps: int


class Rows:
    """Collects each row's tokens from the loop's Steps, up to and including the step that finished it.

    The one place where a batch's steps become per-row replies: `generate`, evaluation's batched
    replies and distillation's torch engine all read the loop through it (`decode_batch`).
    """

    def __init__(self, rows: int, eos_ids: set[int]):
        self.eos_ids = eos_ids
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.reasons: list[str | None] = [None] * rows
        self.seconds: list[float] = []  # per step, the device's work included
        self.compiling: list[float] = []  # per step, the part of its seconds spent compiling a new shape
        self._compiled_until = seconds_compiling()

    def add(self, step: Step) -> None:
        tokens, finished = step.tokens.tolist(), step.finished.tolist()  # one copy per step, not one per row
        self.seconds.append(step.seconds)
        compiled_until = seconds_compiling()
        self.compiling.append(compiled_until - self._compiled_until)
        self._compiled_until = compiled_until
        for row, (token, done) in enumerate(zip(tokens, finished)):
            if self.reasons[row] is None:
                self.ids[row].append(token)
                if done:
                    self.reasons[row] = "eos" if token in self.eos_ids else "stop"

    def replies(self, unfinished: str = "length") -> list[RowReply]:
        """One RowReply per row; `unfinished` is the finish reason of rows still going at the last step."""
        return [RowReply(ids, reason or unfinished, len(ids)) for ids, reason in zip(self.ids, self.reasons)]


@dataclass(frozen=True)
class Endings:
    """What ends and pads a row, for one model and set of stop strings: built once, passed to every batch."""

    eos_ids: frozenset[int]
    pad_id: int
    is_stopped: object = None  # stop_checker(...) or None

    @classmethod
    def of(cls, model, stop: tuple[str, ...] = ()) -> "Endings":
        tokenizer = model.tokenizer
        return cls(frozenset(eos_ids_of(tokenizer, model.full, model.decoder)), pad_id_of(tokenizer),
                   stop_checker(tokenizer, tuple(stop)))


def decode_batch(model, contexts: list[list[int]], config: GenerationConfig, endings: Endings, *,
                 chooser: TokenChooser | None = None, rows: Rows | None = None,
                 speculation: Speculation | None = None) -> list[RowReply]:
    """Replies to a batch of token-id contexts (left-padded here), one RowReply per context x candidate.

    `rows` collects the steps (pass one to keep what was made when the loop is interrupted);
    `speculation` counts what speculative mode drafted and kept.
    """
    ids, mask = left_pad(contexts, endings.pad_id)
    rows = rows if rows is not None else Rows(len(contexts) * config.num_return_sequences, set(endings.eos_ids))
    for step in generate_ids(model, ids, mask, config, eos_ids=set(endings.eos_ids), pad_id=endings.pad_id,
                             is_stopped=endings.is_stopped, chooser=chooser, speculation=speculation):
        rows.add(step)
    return rows.replies()


# ---------------------------------------------------------------- text in, text out


@dataclass
class Reply:
    mode: str
    text: str
    token_ids: list[int]
    new_tokens: int
    finish_reason: str  # "eos" | "stop" | "length" | "interrupted"
    prefill_s: float
    decode_s: float  # compiling left out: see compile_s
    prompt_index: int = 0
    sequence_index: int = 0
    extra: dict = field(default_factory=dict)
    compile_s: float = 0.0  # the decode steps that compiled a new shape of the compiled step, whole, and any compiling in the prefill's
    decode_tokens: int | None = None  # tokens the decode_s covers: all but the first, less those of steps that compiled

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by the decode model (all but the first) per second of decoding, compiling left out."""
        tokens = self.new_tokens - 1 if self.decode_tokens is None else self.decode_tokens
        return tokens / self.decode_s if self.decode_s > 0 and tokens > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "mode": self.mode, "text": self.text, "new_tokens": self.new_tokens, "finish_reason": self.finish_reason,
            "prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4), "compile_s": round(self.compile_s, 4),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "prompt_index": self.prompt_index, "sequence_index": self.sequence_index, **self.extra,
        }


def eos_ids_of(tokenizer, *models) -> set[int]:
    ids = set()
    for source in (tokenizer, *[getattr(m, "generation_config", None) for m in models]):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update([value] if isinstance(value, int) else list(value or []))
    return ids


def encode_prompt(tokenizer, prompt) -> list[int]:
    """A user string or a message list -> the exact context ids training used (chat template + generation prompt).

    Every prompt passes here (generate, stream, each chat turn), so text that is not UTF-8 is refused here.
    """
    from overfill.data import chat_ids

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    for message in messages:
        check_utf8(str(message.get("content") or ""), f"the {message.get('role') or 'user'} message")
    if getattr(tokenizer, "chat_template", None):
        return chat_ids(tokenizer, messages, add_generation_prompt=True)
    return tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]


def context_limit(model) -> int | None:
    """Positions a model can attend to: its `max_position_embeddings`, the smaller one of a pair's two (None: unknown)."""
    models = (model.full, model.decoder) if hasattr(model, "decoder") else (model,)
    limits = [getattr(m.config, "max_position_embeddings", None) for m in models]
    limits = [limit for limit in limits if limit]
    return min(limits) if limits else None


def fit_prompt(ids: list[int], model, config: GenerationConfig, what: str = "the prompt") -> list[int]:
    """The prompt's ids if they fit the model's context with room for `config.max_new_tokens`.

    Past the context the model computes positions it never saw in training and answers garbage
    without any error, so a prompt that does not fit is refused, or with `config.truncate` cut
    to its last tokens with an OverfillWarning. generate, stream and every chat turn call this.
    """
    limit, new = context_limit(model), config.max_new_tokens
    if limit is None or len(ids) + new <= limit:
        return ids
    if new >= limit:
        raise OverfillError(f"--max-new-tokens {new} leaves no room for a prompt in the model's {limit} positions: "
                            f"lower it below {limit}")
    keep = limit - new
    if not config.truncate:
        lower = f", lower --max-new-tokens to {limit - len(ids)}" if len(ids) < limit else ""
        raise OverfillError(f"{what} is {len(ids)} tokens and --max-new-tokens {new} asks for up to {new} more, "
                            f"{len(ids) + new} positions in all, but the model has {limit}: shorten it{lower}, "
                            f"or pass --truncate to keep its last {keep} tokens")
    warnings.warn(f"{what} is {len(ids)} tokens, too long for the model's {limit} positions with --max-new-tokens "
                  f"{new}: kept its last {keep} tokens (--truncate)", OverfillWarning, stacklevel=2)
    return ids[-keep:]


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during `generate`: still a KeyboardInterrupt, carrying the replies as far as they got."""

    def __init__(self, replies: list[Reply]):
        super().__init__("generation interrupted")
        self.replies = replies


def generate(model, prompts, config: GenerationConfig | None = None) -> list[Reply]:
    """Answer a batch of prompts (strings or message lists); one Reply per prompt x sequence.

    Interrupted (KeyboardInterrupt), it raises GenerationInterrupted with the partial replies.
    """
    config = config or GenerationConfig()
    single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
    prompts = [prompts] if single else list(prompts)
    if not prompts:
        raise OverfillError("no prompts given: pass at least one prompt")
    tokenizer = model.tokenizer
    what = (lambda i: "the prompt") if len(prompts) == 1 else (lambda i: f"prompt {i + 1}")
    contexts = [fit_prompt(encode_prompt(tokenizer, p), model, config, what(i)) for i, p in enumerate(prompts)]
    endings = Endings.of(model, config.stop)
    rows = Rows(len(contexts) * config.num_return_sequences, set(endings.eos_ids))
    speculation = Speculation() if config.mode == "speculative" else None
    try:
        decode_batch(model, contexts, config, endings, rows=rows, speculation=speculation)
    except KeyboardInterrupt:
        raise GenerationInterrupted(_replies(rows, rows.replies("interrupted"), tokenizer, config, endings, speculation)
                                    if rows.seconds else []) from None
    return _replies(rows, rows.replies(), tokenizer, config, endings, speculation)


def _replies(rows: Rows, made: list[RowReply], tokenizer, config: GenerationConfig, endings: Endings,
             speculation: Speculation | None = None) -> list[Reply]:
    """Text replies with their timing: prefill (+ first token) is the first step; a row's decode time is its
    share of the steps (the batch runs until its slowest row). A step that compiled a new shape of the compiled
    step counts whole as compiling (`compile_s`), out of the prefill and decode times and their tokens.
    Speculative mode adds the batch's drafting counters to every reply's `extra`."""
    replies = []
    for row, r in enumerate(made):
        text = tokenizer.decode([t for t in r.token_ids if t not in endings.eos_ids], skip_special_tokens=True)
        if config.stop:
            text, _ = cut_at_stop(text, config.stop)
        decoding = list(zip(rows.seconds[1 : r.steps], rows.compiling[1 : r.steps], strict=True))
        replies.append(Reply(mode=config.mode, text=text, token_ids=r.token_ids, new_tokens=len(r.token_ids),
                             finish_reason=r.finish_reason,
                             prefill_s=rows.seconds[0] if not rows.compiling[0] else rows.seconds[0] - rows.compiling[0],
                             decode_s=sum(s for s, c in decoding if not c),
                             compile_s=sum(rows.compiling[: r.steps]) + sum(s - c for s, c in decoding if c),
                             decode_tokens=sum(1 for _, c in decoding if not c),
                             prompt_index=row // config.num_return_sequences,
                             sequence_index=row % config.num_return_sequences,
                             extra={"speculation": speculation.as_dict()} if speculation else {}))
    return replies


def stream(model, prompt, config: GenerationConfig | None = None) -> Iterator[str]:
    """Yield the reply to one prompt as text pieces; joined, they equal `generate(...)[0].text`."""
    config = config or GenerationConfig()
    if config.num_return_sequences != 1:
        raise OverfillError("streaming returns one reply: use num_return_sequences=1")
    tokenizer = model.tokenizer
    endings = Endings.of(model)
    ids, mask = left_pad([fit_prompt(encode_prompt(tokenizer, prompt), model, config)], endings.pad_id)
    eos = set(endings.eos_ids)
    yield from stream_steps(generate_ids(model, ids, mask, config, eos_ids=eos, pad_id=endings.pad_id), tokenizer, eos,
                            config.stop)
