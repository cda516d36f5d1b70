"""The training and validation losses (paper §3.2): cross-entropy on the reply, token-weighted.

Each mode trains on what it will produce at generation time:

    overfill: reply tokens 2..N. Token 1 comes from the frozen full model's prefill, so it is not
              the decoder's job (OverFillModel.forward: decoder on the full model's cache);
    pruned, full: reply tokens 1..N. A standalone model (`standalone_loss`) does its own prefill
              and picks its own first token, as the paper's baselines are fine-tuned.

Validation always scores tokens 2..N in every mode, so the three runs' validation curves compare
like with like (evaluate.py reports token 1 apart for the same reason). The two loss paths agree
exactly when the decoder *is* the full model.

With --refresh-every K (overfill) the decoder trains, and is validated, on the prefill-refresh
schedule (refresh.refreshed_handoff): it reads the full model's KV for the blocks before its own,
and the tokens the full model picks after each block leave the loss.

`--loss kd|ce+kd` trains on the same tokens against the full model's distributions instead of, or
as well as, the labels (distill_loss.py; loop.micro_batch_loss picks one by --loss); validation stays
this cross-entropy whatever the loss.
"""

from __future__ import annotations

import torch
from torch import nn

from overfill.data import Batch, Example, collate
from overfill.errors import OverfillError
from overfill.refresh import refresh_schedule, teacher_forcing
from overfill.tensors import context_and_reply, label_cross_entropy, last_columns, positions_from_mask, reply_labels
from overfill.train.trainee import Trainee


def first_scored(mode: str, *, training: bool) -> int:
    """Index of the first reply token in the loss: 0 (token 1) when a standalone model trains, else 1 (token 2)."""
    return 0 if training and mode != "overfill" else 1


def scored_tokens(batch: Batch, first: int, refresh_every: int = 0) -> int:
    """How many reply tokens the loss scores in `batch`: tokens first+1..N, less the full model's refresh picks."""
    scored = batch.target_mask[:, first:].bool()  # [B, N-first]
    if refresh_every:
        scored = scored & ~refresh_schedule(scored.shape[1], refresh_every).to(scored.device)
    return int(scored.sum())


def standalone_logits(model: nn.Module, batch: Batch, first: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One model reads context + reply itself (modes pruned and full) -> (its predictions of reply
    tokens first+1..N [B, N-first, V], their labels [B, N-first]).

    The prediction of token 1 (first=0) comes from the last context column, which is the last real
    context token of every row because contexts are left-padded.
    """
    inputs, mask = context_and_reply(batch.context_ids, batch.context_mask, batch.target_ids,
                                     batch.target_mask)  # [B, Tc + N - 1]
    positions = positions_from_mask(mask)  # [B, Tc + N - 1]
    labels = reply_labels(batch.target_ids, batch.target_mask, first)  # [B, N-first]
    if labels.shape[1] < 1:  # logits_to_keep=0 would mean "all positions"
        raise OverfillError("targets need at least 2 tokens: the loss covers reply tokens 2..N")
    out = model(input_ids=inputs, attention_mask=mask, position_ids=positions, use_cache=False,
                logits_to_keep=last_columns(labels.shape[1], inputs.shape[1], inputs.device))
    return out.logits, labels


def standalone_loss(model: nn.Module, batch: Batch, first: int = 1) -> tuple[torch.Tensor, int]:
    """`standalone_logits`' cross-entropy on reply tokens first+1..N, and how many tokens it covers.

    With first=1 this equals OverFillModel.forward's loss when the decoder *is* the full model:
    same positions (each row continues from its own context length), same predictions, same tokens.
    """
    return label_cross_entropy(*standalone_logits(model, batch, first))


def batch_loss(mode: str, module: nn.Module, batch: Batch, *, training: bool = True,
               refresh_every: int = 0) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy, scored tokens) for the module a mode trains; see the module docstring for which tokens."""
    if mode == "overfill":
        out = module(batch.context_ids, batch.context_mask, batch.target_ids, batch.target_mask,
                     via=teacher_forcing(refresh_every))
        return out.loss, out.tokens
    return standalone_loss(module, batch, first_scored(mode, training=training))


@torch.no_grad()
def validation_loss(trainee: Trainee, module: nn.Module, examples: list[Example], batch_size: int, pad_id: int,
                    accelerator, refresh_every: int = 0) -> tuple[float, int]:
    """Token-weighted mean loss over `examples` (reply tokens 2..N), split across processes."""
    trainee.set_training(False)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].context_ids) + len(examples[i].target_ids))
    mine = order[accelerator.process_index::accelerator.num_processes]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [loss sum, tokens]
    for start in range(0, len(mine), batch_size):
        batch = collate([examples[i] for i in mine[start:start + batch_size]], pad_id).to(accelerator.device)
        loss, tokens = batch_loss(trainee.mode, module, batch, training=False, refresh_every=refresh_every)
        total += torch.tensor([float(loss) * tokens, tokens], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(total, "sum")
    trainee.set_training(True)
    return float(total[0] / total[1].clamp(min=1)), int(total[1])
