"""Each configuration's decode cost on real prompts: its own replies (EOS on), batch 1, the configurations
interleaved in rotating order within each round so that machine drift hits them alike.

Unlike `overfill bench` (synthetic prompts, EOS off, fixed lengths), the replies here are the ones
whose quality the frontier reports, so speculative decoding drafts on real text and a refresh row
refreshes where real replies reach. Decode ms/token is a round's decode seconds over its decode
tokens (every token after the first), summed over the timing prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

from overfill import speculative
from overfill.evaluation.config import ModelEntry
from overfill.generation import Endings, GenerationConfig, generate_ids
from overfill.interleaved import spread, time_rounds
from overfill.speculative import Speculation
from overfill.tensors import left_pad


@dataclass
class Reply:
    """One timed reply: prefill + first token, then the decode steps."""

    prefill_s: float
    decode_s: float
    decode_tokens: int
    speculation: dict | None = None
    tokens: tuple[int, ...] = ()


def entry_generation(entry: ModelEntry, max_new_tokens: int, compile: bool) -> GenerationConfig:
    """An entry's greedy generation settings (compiled: a speculative entry's drafts and its verification pass alike;
    an entry named +compiled is compiled whatever `compile` says)."""
    return entry.configuration.generation(max_new_tokens, compile)


def time_reply(model, config: GenerationConfig, context: list[int], endings: Endings, steps: int | None = None) -> Reply:
    """One greedy reply to one prompt, timed step by step (`steps` stops early: a warm-up)."""
    ids, mask = left_pad([context], endings.pad_id)
    speculation = Speculation() if config.mode == "speculative" else None
    seconds, tokens = [], []
    for step in generate_ids(model, ids, mask, config, eos_ids=set(endings.eos_ids), pad_id=endings.pad_id,
                             speculation=speculation):
        seconds.append(step.seconds)
        tokens.append(int(step.tokens[0]))
        if steps is not None and len(seconds) >= steps:
            break
    return Reply(seconds[0], sum(seconds[1:]), len(seconds) - 1, speculation.as_dict() if speculation else None,
                 tuple(tokens))


def time_entries(models: dict[str, object], entries: list[ModelEntry], contexts: list[list[int]], *, max_new_tokens: int,
                 compile: bool, repeats: int, warmup: int, advance=None) -> dict[str, dict]:
    """Per entry name: decode ms/token per round (a spread over rounds, and the samples), prefill ms per prompt,
    decode tokens, and, for speculative entries, the drafting counters over every timed reply.

    `models[name]` is the entry's OverFillModel; `advance(text)` is called once per timed reply (a progress bar).
    """
    generation = {e.name: entry_generation(e, max_new_tokens, compile) for e in entries}
    endings = {e.name: Endings.of(models[e.name]) for e in entries}
    def warm(name: str) -> None:  # a few steps per prompt: every shape a compiled step meets is compiled here
        for context in contexts:
            time_reply(models[name], generation[name], context, endings[name], steps=8)

    def run(name: str, repeat: int) -> list[Reply]:
        replies = []
        for context in contexts:
            replies.append(time_reply(models[name], generation[name], context, endings[name]))
            if advance:
                advance(f"{name}, round {repeat + 1}/{repeats}")
        return replies

    rounds = time_rounds([e.name for e in entries], run, repeats=repeats, warmup=warmup, warm=warm)
    rows = {name: summarize(runs, generation[name]) for name, runs in rounds.items()}
    # Greedy speculative decoding is lossless: its timed replies must be the full row's, token for token.
    full = next((e.name for e in entries if e.generation_mode == "full"), None)
    for e in entries:
        if e.draft_tokens and full is not None:
            pairs = [(a.tokens, b.tokens) for ours, theirs in zip(rounds[e.name], rounds[full], strict=True)
                     for a, b in zip(ours, theirs, strict=True)]
            rows[e.name]["replies_equal_full"] = sum(a == b for a, b in pairs) / len(pairs)
    return rows


def summarize(rounds: list[list[Reply]], config: GenerationConfig) -> dict:
    ms = [1e3 * sum(r.decode_s for r in replies) / max(sum(r.decode_tokens for r in replies), 1) for replies in rounds]
    prefill = [1e3 * r.prefill_s for replies in rounds for r in replies]
    result = {"decode_ms_per_token": spread(ms), "samples": {"decode_ms_per_token": ms}, "prefill_ms": spread(prefill),
              "decode_tokens": sum(r.decode_tokens for r in rounds[0]),
              "decode_step": "eager" if not config.compile else "compiled"}
    counters = [r.speculation for replies in rounds for r in replies if r.speculation]
    if counters:
        result["speculation"] = speculative.total(counters)
    return result
