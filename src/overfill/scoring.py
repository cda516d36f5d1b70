"""What `overfill eval` and the lm-eval adapter run on a model: teacher-forced scoring and batched generation.

Scoring follows the two-stage picture of the paper's Figure 1: the *prefill model* reads the
context and scores y1 from its last logits; the *decode model* reads y1..y_{N-1} on that cache
and scores y2..yN (`reply_logprobs`: the training loss of modeling.forward with per-token
log-probs kept). `generate_ids_batched` runs the one generation loop from token ids, so the
context is exactly the one scored (or the one lm-eval built).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from overfill.data import collate
from overfill.generation import GenerationConfig, eos_ids_of, generate_ids, models_for, pad_id_of, prefill, stop_checker


@dataclass
class TokenScores:
    """One reply under teacher forcing: log p(y_i | x, y_<i) and whether y_i was the argmax, i = 1..N."""

    logprobs: list[float]
    top1: list[bool]


@torch.inference_mode()
def reply_logprobs(model, mode: str, context_ids: torch.Tensor, context_mask: torch.Tensor, target_ids: torch.Tensor,
                   target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [B, N] and argmax hits [B, N] of right-padded targets after left-padded contexts.

    The prefill model reads the context and scores y1 from its last logits; the decode model reads
    y1..y_{N-1} on that cache and scores y2..yN (overfill: full then decoder; full / pruned: one model).
    Padded target positions hold 0 / False.
    """
    prefill_model, decode_model = models_for(mode, model)
    first_logits, cache = prefill(prefill_model, context_ids, context_mask)  # [B, V], cache of x
    step_logits = [first_logits[:, None]]  # y1
    n = target_ids.shape[1]
    if n > 1:
        # The handoff: the decode model continues the prefill model's cache; positions continue
        # from each row's own context length, whatever its padding.
        mask = torch.cat([context_mask, target_mask[:, :-1]], dim=1)  # [B, Tc + N - 1]
        positions = context_mask.sum(-1, keepdim=True) + torch.arange(n - 1, device=target_ids.device)  # [B, N-1]
        out = decode_model(input_ids=target_ids[:, :-1], attention_mask=mask, position_ids=positions,
                           past_key_values=cache, use_cache=True)
        step_logits.append(out.logits)  # [B, N-1, V] predictions of y2..yN
    logprobs = torch.zeros(target_ids.shape, dtype=torch.float32)
    hits = torch.zeros(target_ids.shape, dtype=torch.bool)
    for row in range(target_ids.shape[0]):  # one row at a time keeps float32 copies of [N, V] small
        logits = torch.cat([part[row].float() for part in step_logits], dim=0)  # [N, V]
        logprobs[row] = logits.log_softmax(-1).gather(-1, target_ids[row, :, None]).squeeze(-1)
        hits[row] = logits.argmax(-1) == target_ids[row]
    real = target_mask.bool()
    return logprobs.masked_fill(~real, 0.0), hits & real


def score_examples(model, mode: str, examples, *, batch_size: int = 8, pad_id: int | None = None) -> list[TokenScores]:
    """Teacher-forced TokenScores for each Example (context_ids, target_ids), in input order.

    Batches are formed from length-sorted examples so little compute goes to padding.
    """
    pad_id = pad_id_of(model.tokenizer) if pad_id is None else pad_id
    order = sorted(range(len(examples)), key=lambda i: -(len(examples[i].context_ids) + len(examples[i].target_ids)))
    scores: list[TokenScores | None] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([examples[i] for i in rows], pad_id)
        logprobs, hits = reply_logprobs(model, mode, batch.context_ids, batch.context_mask, batch.target_ids, batch.target_mask)
        for k, i in enumerate(rows):
            n = len(examples[i].target_ids)
            scores[i] = TokenScores(logprobs[k, :n].tolist(), hits[k, :n].tolist())
    return scores


# ---------------------------------------------------------------- generation


def generate_ids_batched(model, mode: str, contexts: list[list[int]], *, max_new_tokens: int, batch_size: int = 8,
                         stop: tuple[str, ...] = (), temperature: float = 0.0, seed: int | None = None) -> list[list[int]]:
    """Reply token ids (end-of-turn token included when produced) for pre-tokenised contexts, in input order.

    Same loop as `generation.generate`, but from token ids, so the context is exactly the one
    scored under teacher forcing (or the one lm-eval built).
    """
    from overfill.prune import left_pad

    tokenizer = model.tokenizer
    pad_id = pad_id_of(tokenizer)
    eos = eos_ids_of(tokenizer, model.full, model.decoder)
    config = GenerationConfig(mode=mode, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop=stop)
    is_stopped = stop_checker(tokenizer, config.stop)
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    replies: list[list[int]] = [[] for _ in contexts]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = left_pad([contexts[i] for i in rows], pad_id)
        done = [False] * len(rows)
        for step in generate_ids(model, ids, mask, config, eos_ids=eos, pad_id=pad_id, is_stopped=is_stopped):
            for k, i in enumerate(rows):
                if not done[k]:
                    replies[i].append(int(step.tokens[k]))
                    done[k] = bool(step.finished[k])
    return replies
