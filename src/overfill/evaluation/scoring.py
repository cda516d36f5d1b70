"""What `overfill eval` and the lm-eval adapter run on a model: teacher-forced scoring and batched generation.

Scoring runs `modeling.handoff`, the very computation the decoder was trained on: the *prefill
model* reads the context and scores y1 from its last logits; the *decode model* reads y1..y_{N-1}
on that cache and scores y2..yN. `generate_ids_batched` runs the one generation loop from token
ids, so the context is exactly the one scored (or the one lm-eval built).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from overfill.data import collate
from overfill.devices import model_device
from overfill.generation import Endings, GenerationConfig, decode_batch
from overfill.refresh import teacher_forcing
from overfill.tensors import pad_id_of


@dataclass
class TokenScores:
    """One reply under teacher forcing: log p(y_i | x, y_<i) and whether y_i was the argmax, i = 1..N.

    `margin` is max_v log p(v | x, y_<i) - log p(y_i | x, y_<i): 0 when y_i is the argmax, small when
    it nearly is (the agreement measures count near-ties within float noise, agreement.py).
    """

    logprobs: list[float]
    top1: list[bool]
    margin: list[float] = field(default_factory=list)


@torch.inference_mode()
def reply_logprobs(model, mode: str, context_ids: torch.Tensor, context_mask: torch.Tensor, target_ids: torch.Tensor,
                   target_mask: torch.Tensor, refresh_every: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs [B, N], argmax hits [B, N] and margins below the argmax [B, N] (TokenScores) of
    right-padded targets after left-padded contexts.

    Padded target positions hold 0 / False / 0. `refresh_every` (overfill mode) scores the prefill-refresh
    schedule: each token by the model that would pick it in generation.
    """
    every = refresh_every if mode == "overfill" else 0
    prefill_model, decode_model = model.stages(mode)
    device = model_device(prefill_model)
    context_ids, context_mask, target_ids, target_mask = (t.to(device) for t in (context_ids, context_mask, target_ids,
                                                                                   target_mask))
    stages = teacher_forcing(every)(prefill_model, decode_model, context_ids, context_mask, target_ids, target_mask)
    step_logits = [stages.first[:, None], stages.rest]  # [B, 1, V] predicts y1, [B, N-1, V] y2..yN
    logprobs = torch.zeros(target_ids.shape, dtype=torch.float32, device=device)
    hits = torch.zeros(target_ids.shape, dtype=torch.bool, device=device)
    margins = torch.zeros(target_ids.shape, dtype=torch.float32, device=device)
    for row in range(target_ids.shape[0]):  # one row at a time keeps float32 copies of [N, V] small
        logits = torch.cat([part[row].float() for part in step_logits], dim=0)  # [N, V]
        row_logprobs = logits.log_softmax(-1)  # [N, V]
        logprobs[row] = row_logprobs.gather(-1, target_ids[row, :, None]).squeeze(-1)
        hits[row] = logits.argmax(-1) == target_ids[row]
        margins[row] = row_logprobs.max(-1).values - logprobs[row]
    real = target_mask.bool()
    return (logprobs.masked_fill(~real, 0.0).cpu(), (hits & real).cpu(), margins.masked_fill(~real, 0.0).cpu())


def score_examples(model, mode: str, examples, *, batch_size: int = 8, pad_id: int | None = None,
                   refresh_every: int = 0) -> list[TokenScores]:
    """Teacher-forced TokenScores for each Example (context_ids, target_ids), in input order.

    Batches are formed from length-sorted examples so little compute goes to padding.
    """
    pad_id = pad_id_of(model.tokenizer) if pad_id is None else pad_id
    order = sorted(range(len(examples)), key=lambda i: -(len(examples[i].context_ids) + len(examples[i].target_ids)))
    scores: list[TokenScores | None] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([examples[i] for i in rows], pad_id)
        logprobs, hits, margins = reply_logprobs(model, mode, batch.context_ids, batch.context_mask, batch.target_ids,
                                                 batch.target_mask, refresh_every)
        for k, i in enumerate(rows):
            n = len(examples[i].target_ids)
            scores[i] = TokenScores(logprobs[k, :n].tolist(), hits[k, :n].tolist(), margins[k, :n].tolist())
    return scores


# ---------------------------------------------------------------- generation


def generate_ids_batched(model, mode: str, contexts: list[list[int]], *, max_new_tokens: int, batch_size: int = 8,
                         stop: tuple[str, ...] = (), temperature: float = 0.0, seed: int | None = None,
                         refresh_every: int = 0, draft_tokens: int = 4, drafter: str = "overfill",
                         speculation=None, compile: bool | None = None) -> list[list[int]]:
    """Reply token ids (end-of-turn token included when produced) for pre-tokenised contexts, in input order.

    The loop of `generation.generate` (`decode_batch`), from token ids, so the context is exactly the
    one scored under teacher forcing (or the one lm-eval built); longest contexts first, so a batch pads little.
    Speculative mode drafts `draft_tokens` with `drafter` and counts into `speculation` (a Speculation).
    """
    config = GenerationConfig(mode=mode, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop=stop,
                              refresh_every=refresh_every, draft_tokens=draft_tokens, drafter=drafter, compile=compile)
    endings = Endings.of(model, config.stop)
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    replies: list[list[int]] = [[] for _ in contexts]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        for i, reply in zip(rows, decode_batch(model, [contexts[i] for i in rows], config, endings, speculation=speculation)):
            replies[i] = reply.token_ids
    return replies
