"""Prefill refresh (paper §5, future work): every K reply tokens the full model re-reads them.

"We plan to further explore whether periodically refreshing the prefill can help maintain its
benefits uniformly throughout the entire sequence." After each block of K reply tokens the full
model encodes the block in one pass on top of its own KV (a small prefill, compute-bound like the
first); its KV replaces the decoder's for the block, so the decoder goes on reading full-model KV
for everything before its current block, and its last logits pick the next token, as after the
prompt. `refresh` is that step in generation (generation.generate_ids calls it at steps K, 2K, ...);
`refreshed_handoff` is the same schedule under teacher forcing, the whole reply in one pass, for
scoring and for training the decoder on it (`--refresh-every`); `teacher_forcing` picks it, or the
plain handoff, for a given K.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers import DynamicCache

from overfill.kv_cache import crop_to
from overfill.modeling import Handoff, HandoffLogits, handoff, handoff_with_teacher, prefill, prefill_with_reply
from overfill.tensors import context_and_reply


def refresh(full_model, block: torch.Tensor, attention_mask: torch.Tensor, cache: DynamicCache, block_start: int,
            past_lengths: torch.Tensor) -> torch.Tensor:
    """One refresh in generation: the full model re-reads the last reply block, in one pass on top of its own KV.

    block [B, K] are the reply tokens generated since the last refresh (the decoder's KV holds all
    but the newest); the cache is cut back to `block_start` columns (prompt and earlier blocks,
    all full-model KV) and the full model's KV for the block is appended: the decoder goes on
    reading full-model KV for everything before the next token. Like the handoff after the
    prompt, the full model's last logits pick that next token (they cost nothing more, and are
    the better model's); returns them [B, V].
    """
    crop_to(cache, block_start)
    logits, _ = prefill(full_model, block, attention_mask, cache, past_lengths)
    return logits


def refresh_schedule(reply_inputs: int, every: int) -> torch.Tensor:
    """[N-1] bool over reply inputs y1..y_{N-1}: True where the prefill model predicts the next token.

    After each block of K reply tokens the full model re-reads the block and picks the next token:
    y_{K+1}, y_{2K+1}, ... are its predictions (made at inputs y_K, y_2K, ...), the rest the decoder's.
    """
    return (torch.arange(reply_inputs) + 1) % every == 0


def refreshed_handoff(prefill_model: nn.Module, decode_model: nn.Module, context_ids: torch.Tensor,
                      context_mask: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor,
                      every: int, teacher: bool = False) -> HandoffLogits:
    """Teacher-forced prefill refresh, the whole reply at once: exactly what `refresh` does step by step.

    The prefill model runs once over context + reply (its KV for every position, its logits where
    it picks a token, or everywhere with `teacher`, for distillation); the decoder then runs over
    the reply on that cache with a mask that lets reply token i (in block b = i // K) see the
    context and blocks before b as the full model's KV, and tokens of block b up to i as its own
    KV, appended after the full model's:

        keys   = [context (Tc) | reply, full model's KV (N-1) | reply, decoder's KV (N-1)]

    A reply shorter than one block is never refreshed: it runs the plain handoff (with the teacher's
    predictions when `teacher`).
    """
    batch, tc = context_ids.shape
    m = target_ids.shape[1] - 1
    if m < every:
        plain = handoff_with_teacher if teacher else handoff
        return plain(prefill_model, decode_model, context_ids, context_mask, target_ids, target_mask)
    inputs, input_mask = target_ids[:, :-1], target_mask[:, :-1]
    by_prefill = refresh_schedule(m, every).to(context_ids.device)
    _, mask = context_and_reply(context_ids, context_mask, target_ids, target_mask)  # [B, Tc + N - 1]
    keep = torch.cat([torch.tensor([tc - 1], device=mask.device), tc + by_prefill.nonzero().flatten()])
    logits, cache = prefill_with_reply(prefill_model, context_ids, context_mask, target_ids, target_mask,
                                       m + 1 if teacher else keep)
    predicted = logits[:, 1:] if teacher else None  # [B, N-1, V] its predictions of y2..yN
    # y1; the tokens after each refreshed block
    first, picked = logits[:, 0], (predicted[:, by_prefill] if teacher else logits[:, 1:])
    i = torch.arange(m, device=mask.device)
    block_start = (i // every) * every  # [m] first reply input of query i's block
    sees_full = i[None, :] < block_start[:, None]  # [m queries, m keys]
    sees_own = (i[None, :] >= block_start[:, None]) & (i[None, :] <= i[:, None])
    real = input_mask.bool()[:, None, :]  # [B, 1, m]
    allowed = torch.cat([context_mask.bool()[:, None, :].expand(batch, m, tc), sees_full & real, sees_own & real], dim=-1)
    dtype = next(decode_model.parameters()).dtype
    additive = torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)
    start = context_mask.sum(-1)
    out = decode_model(input_ids=inputs, attention_mask=additive[:, None], position_ids=start[:, None] + i,
                       past_key_values=cache, use_cache=True)
    rest = out.logits.index_copy(1, by_prefill.nonzero().flatten(), picked.to(out.logits.dtype))
    return HandoffLogits(first.float(), rest, by_prefill, teacher=predicted)


def teacher_forcing(every: int = 0, teacher: bool = False) -> Handoff:
    """The teacher-forced handoff for refresh interval `every` (0: none): what scoring and training run.
    With `teacher`, the prefill model's own predictions of y2..yN come back too (distillation)."""
    if every:
        return partial(refreshed_handoff, every=every, teacher=teacher)
    return handoff_with_teacher if teacher else handoff
