"""Lossless OverFill: speculative decoding with the decoder as the drafter (paper §6.2).

The decoder drafts k tokens, the full model reads them in one pass and keeps the longest prefix it
agrees with, then adds one token of its own; the reply is the full model's own, token for token
when greedy and in distribution when sampling (Leviathan et al., 2023; Chen et al., 2023). The
decoder can be either drafter:

  * overfill: it drafts on the full model's cache, as OverFill decodes, and the full model's KV
    replaces the decoder's for every accepted token: the drafter always reads full-model KV;
  * pruned:   it drafts on a cache of its own (its own prefill of the prompt), as a standalone
    draft model does (vLLM's `draft_model` method).

One round, with t0 the newest token (chosen, its KV not yet cached; L cache columns before it):

    draft    d1..dk   the decoder, one token at a time from t0
    verify   the full model over [t0, d1..dk] in one pass on its own KV -> k + 1 predictions
    accept   greedy: the longest prefix with d_i == argmax p_i; sampling: d_i kept with
             probability min(1, p_i(d_i) / q_i(d_i)), the first refused one replaced by a draw from
             max(0, p_i - q_i) renormalised; all kept: one more token drawn from p_{k+1}
    crop     the full model's cache to L + n + 1 columns (t0 and the n kept drafts)

A batch moves together: every unfinished row keeps the batch's smallest n, and a row that would
have kept more emits its own kept draft at position n + 1, which is exactly what that row's
algorithm emits there (so nothing is lost, only some rows' luck beyond n). Shapes: B rows, k
drafts, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache

from overfill.decode_step import EagerStep, step_function
from overfill.kv_cache import crop_to
from overfill.modeling import prefill
from overfill.sampling import RowState, TokenChooser

Drafter = Literal["overfill", "pruned"]


@dataclass
class Speculation:
    """Counters over a reply batch: what the drafter proposed and what the full model kept."""

    rounds: int = 0  # passes of the full model over drafts
    drafted: int = 0  # draft tokens proposed, summed over unfinished rows
    accepted: int = 0  # of those, the ones each row's own test kept (before the batch's common length)
    emitted: int = 0  # tokens the rounds emitted per row (kept drafts + the full model's own), summed over rounds

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_pass(self) -> float | None:
        """Tokens each pass of the full model yields (kept drafts + its own token): speculation's speed-up bound."""
        return self.emitted / self.rounds if self.rounds else None

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "tokens_per_full_pass": self.tokens_per_pass}


def total(counters: list[dict]) -> dict:
    """Speculation.as_dict() counters of several replies or batches, summed: the acceptance rate and tokens per
    full-model pass of them all."""
    rounds, drafted, accepted = (sum(c[k] for c in counters) for k in ("rounds", "drafted", "accepted"))
    emitted = sum(c["tokens_per_full_pass"] * c["rounds"] for c in counters if c["rounds"])
    return {"runs": len(counters), "rounds": rounds, "drafted": drafted, "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else None,
            "tokens_per_full_pass": emitted / rounds if rounds else None}


@dataclass
class Verdict:
    kept: torch.Tensor  # [B] drafts each row's own test kept (0..k)
    n: int  # the batch's common length: min of `kept` over unfinished rows
    tokens: torch.Tensor  # [B, n + 1] what each row emits: n kept drafts, then one more token


def accept_greedy(drafts: torch.Tensor, target_logits: torch.Tensor, active: torch.Tensor) -> Verdict:
    """drafts [B, k], the full model's logits [B, k + 1, V] at t0, d1..dk -> what greedy decoding keeps."""
    choice = target_logits.argmax(-1)  # [B, k + 1]: the full model's own token after t0, d1, ..., dk
    return _verdict(drafts, drafts == choice[:, :-1], choice, active)


def accept_sampled(drafts: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor, active: torch.Tensor,
                   uniform, sample) -> Verdict:
    """Speculative sampling. drafts [B, k] drawn from draft_probs [B, k, V]; target_probs [B, k + 1, V].

    `uniform(shape)` draws U(0, 1) numbers, `sample(probs [B, V])` one token per row (the caller's seeded
    generators, so a seed gives the same reply). The token after the kept prefix is a draw from the
    residual max(0, p - q) where a draft was refused, from p_{k+1} where all were kept.
    """
    batch, k = drafts.shape
    p = target_probs[:, :k].gather(-1, drafts[..., None])[..., 0]  # [B, k] p_i(d_i)
    q = draft_probs.gather(-1, drafts[..., None])[..., 0]
    kept_each = uniform((batch, k)).to(p.device) * q < p  # r < p / q, without dividing by a zero q
    n_each = _leading(kept_each)  # [B]
    # the distribution each row draws its own token from, at its own first refusal (or after all k)
    at = n_each.clamp(max=k - 1) if k else n_each
    rows = torch.arange(batch, device=drafts.device)
    residual = (target_probs[rows, at] - (draft_probs[rows, at] if k else 0)).clamp(min=0)
    last = torch.where((n_each == k)[:, None], target_probs[:, k], residual)
    total = last.sum(-1, keepdim=True)
    # a refusal where p == q leaves no residual (probability zero, but floats): fall back to p itself
    last = torch.where(total > 0, last / total.clamp(min=torch.finfo(last.dtype).tiny), target_probs[rows, at])
    own = sample(last)  # [B]
    choice = torch.cat([drafts, own[:, None]], dim=1)  # a row's token at position n_each is its own draw
    choice[rows, n_each] = own
    return _verdict(drafts, kept_each, choice, active)


def _leading(kept: torch.Tensor) -> torch.Tensor:
    """[B, k] bool -> [B] length of each row's run of True from the start."""
    return kept.long().cumprod(-1).sum(-1)


def _verdict(drafts: torch.Tensor, kept_each: torch.Tensor, choice: torch.Tensor, active: torch.Tensor) -> Verdict:
    """choice [B, k + 1]: each row's token at every position, valid up to its own first refusal (inclusive)."""
    kept = _leading(kept_each)
    n = int(kept[active].min()) if bool(active.any()) else 0
    # rows that kept more than n emit their n-th kept draft + 1 as their last token: it equals choice there
    return Verdict(kept=kept, n=n, tokens=choice[:, : n + 1])


# ---------------------------------------------------------------- the loop


@torch.inference_mode()
def speculative_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config, *, eos_ids: set[int],
                    pad_id: int, is_stopped=None, chooser: TokenChooser | None = None,
                    cache: DynamicCache | None = None, past_lengths: torch.Tensor | None = None,
                    stats: Speculation | None = None):
    """Yield one sampling.Step per reply token, as `generation.generate_ids` does: the full model's reply.

    `config.draft_tokens` k and `config.drafter` pick the round's shape and the drafter's cache;
    `cache`/`past_lengths` continue a conversation (full-model KV of the earlier turns; the overfill
    drafter only, which reads that cache); `stats` (a Speculation) collects what was drafted and kept.
    """
    full, decoder = model.full, model.decoder
    chooser = TokenChooser(config) if chooser is None else chooser
    stats = Speculation() if stats is None else stats
    k_max, own = config.draft_tokens, config.drafter == "pruned"
    if own and cache is not None:
        raise ValueError("the pruned drafter keeps a cache of its own: it cannot continue another model's cache")
    # With --compile the drafts come from the decoder's compiled step on static caches, and the full model
    # verifies each block in one pass of its own compiled step (CompiledStep.block): an eager pass over a few
    # tokens costs a small model about three compiled steps, which no acceptance rate repays.
    columns = attention_mask.shape[1] + config.max_new_tokens + k_max  # drafts may run k past the last reply token
    draft = step_function(decoder, input_ids.device, config.compile, columns)
    verify = step_function(full, input_ids.device, config.compile, columns) if draft.compiled else EagerStep(full)
    rows = input_ids.shape[0]

    started = time.perf_counter()
    cache = draft.new_cache(full, rows, columns) if cache is None else cache
    logits, cache = prefill(full, input_ids, attention_mask, cache, past_lengths)
    cache = draft.adopt(cache, columns)  # a caller's cache keeps the context; the reply goes on here
    own_cache = prefill(decoder, input_ids, attention_mask, draft.new_cache(decoder, rows, columns))[1] if own else None
    if config.num_return_sequences > 1:  # several candidates share one prefill (each model's)
        for c in (cache, own_cache):
            if c is not None:
                c.batch_repeat_interleave(config.num_return_sequences)
        logits = logits.repeat_interleave(config.num_return_sequences, 0)
        attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, 0)
    rows, prompt_columns = logits.shape[0], attention_mask.shape[1]
    state = RowState(rows, logits.device, eos_ids, pad_id, is_stopped)
    own_length = prompt_columns  # columns of the drafter's own cache (pruned drafter)

    tokens = state.record(chooser(logits, state.tokens))
    yield state.step(tokens, time.perf_counter() - started)
    mask = torch.cat([attention_mask, attention_mask.new_ones(rows, 1)], dim=1)  # covers the cache and t0
    lengths = mask.sum(-1)  # [B] real tokens, t0 included: t0 sits at position lengths - 1
    while not state.done and state.tokens.shape[1] < config.max_new_tokens:
        started = time.perf_counter()
        generated = state.tokens
        cached = mask.shape[1] - 1  # full-model KV columns; t0, the newest token, is not cached yet
        k = min(k_max, config.max_new_tokens - generated.shape[1] - 1)
        active = ~state.finished
        # draft d1..dk: from t0, on the full model's cache (overfill) or on the drafter's own (pruned), which first
        # reads what it has not read yet (t0, or the last kept draft and t0 after a round that kept every draft)
        drafts, draft_probs = [], []
        if k:
            drafting_cache = own_cache if own else cache
            feed = generated[:, own_length - prompt_columns:] if own else generated[:, -1:]  # [B, m]
            positions = (lengths - feed.shape[1])[:, None] + torch.arange(feed.shape[1], device=feed.device)
            step_logits = draft.block(feed, positions, drafting_cache, mask)[:, -1]
            for i in range(k):
                if i:
                    feed_mask = torch.cat([mask, mask.new_ones(rows, i)], dim=1)
                    step_logits = draft(drafts[-1], lengths - 1 + i, drafting_cache, feed_mask)
                if config.greedy:
                    drafts.append(step_logits.argmax(-1))
                else:
                    q = chooser.probs(step_logits, torch.cat([generated, *[d[:, None] for d in drafts]], dim=1))
                    draft_probs.append(q)
                    drafts.append(chooser.draw(q))
            if not own:
                crop_to(cache, cached)  # the decoder's KV for t0, d1..d(k-1) goes: the full model's replaces it
        drafted = torch.stack(drafts, dim=1) if drafts else generated.new_empty(rows, 0)  # [B, k]
        # verify: the full model over [t0, d1..dk] in one pass on its own KV
        block = torch.cat([generated[:, -1:], drafted], dim=1)  # [B, k + 1]
        verify_mask = torch.cat([mask, mask.new_ones(rows, k)], dim=1)
        positions = (lengths - 1)[:, None] + torch.arange(k + 1, device=block.device)
        target = verify.block(block, positions, cache, verify_mask)  # [B, k + 1, V]
        # accept
        if config.greedy:
            verdict = accept_greedy(drafted, target, active)
        else:
            history = torch.cat([generated, drafted], dim=1)
            target_probs = torch.stack([chooser.probs(target[:, i], history[:, : generated.shape[1] + i])
                                        for i in range(k + 1)], dim=1)
            verdict = accept_sampled(drafted, torch.stack(draft_probs, dim=1) if k else target_probs[:, :0],
                                     target_probs, active, chooser.uniform, chooser.draw)
        # crop: t0 and the n kept drafts stay in the full model's cache, as it computed them
        n = verdict.n
        crop_to(cache, cached + n + 1)
        if own and k:
            own_length = min(cached + n + 1, cached + k)  # the drafter read t0, d1..d(k-1): keep what was kept
            crop_to(own_cache, own_length)
        stats.rounds += 1
        stats.drafted += k * int(active.sum())
        stats.accepted += int(verdict.kept[active].sum())
        stats.emitted += n + 1
        seconds = (time.perf_counter() - started) / (n + 1)
        for j in range(n + 1):
            yield state.step(state.record(verdict.tokens[:, j]), seconds)
            if state.done:
                return
        mask = torch.cat([mask, mask.new_ones(rows, n + 1)], dim=1)
        lengths = lengths + n + 1
