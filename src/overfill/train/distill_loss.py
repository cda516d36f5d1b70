"""Token-level distillation (`overfill train --loss kd|ce+kd`): the trained model learns the frozen
full model's next-token distributions, not only the reply's tokens (Hinton, Vinyals and Dean 2015,
"Distilling the Knowledge in a Neural Network").

    KD   = T^2 * KL(p_full || p_trained),   p = softmax(logits / T)     (T = --kd-temperature)
    loss = (1 - w) * CE + w * KD                                          (--loss ce+kd, w = --kd-weight)
    loss = KD                                                             (--loss kd)

Both terms are means over the tokens CE scores (loss.py: reply tokens 2..N for the OverFill
decoder, 1..N for the pruned baseline; padding and IGNORE labels left out), so the loop's token
weighting across micro-batches and processes holds for the mix. Softening by T shrinks KD's
gradients by 1/T^2; the T^2 factor gives them back their size, so --kd-weight means the same at
every T.

The teacher is the frozen full model, run once per batch over context + reply without gradients
(modeling.prefill_with_reply). In overfill mode that one pass is also the prefill: the decoder
reads its KV cropped to the context (modeling.handoff_with_teacher), so distilling costs the
reply part of the full model's pass, not a second prefill. With --refresh-every K the schedule's
own full pass over context + reply is the teacher (refresh.refreshed_handoff), and the tokens the
full model picks after each block stay out of KD as they stay out of CE. In pruned mode the
decoder reads context + reply itself and the same full pass is the teacher alone. Mode full has
no teacher (config.py refuses --loss kd there: the full model would distil from itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from overfill.data import Batch
from overfill.modeling import prefill_with_reply
from overfill.refresh import teacher_forcing
from overfill.tensors import IGNORE, label_cross_entropy
from overfill.train.config import TrainConfig
from overfill.train.loss import first_scored, standalone_logits


def kd_per_token(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) of each row of [K, V] logits -> [K]."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def distillation_loss(config: TrainConfig, module: nn.Module, batch: Batch,
                      full: nn.Module | None = None) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """(loss to optimise, tokens it covers, its parts {"ce", "kd"}) of one micro-batch under --loss kd or ce+kd.

    `module` is what the mode trains through (OverFillModel in overfill mode, the decoder in
    pruned mode); `full` is the frozen full model, the teacher of pruned mode (in overfill mode
    it is inside `module`). --loss ce never comes here: it is loss.batch_loss alone.
    """
    if config.loss not in ("kd", "ce+kd"):
        raise ValueError(f"distillation_loss is for --loss kd and ce+kd, not {config.loss}")
    if config.mode == "overfill":
        out = module(batch.context_ids, batch.context_mask, batch.target_ids, batch.target_mask,
                     via=teacher_forcing(config.refresh_every, teacher=True))
        student, teacher, labels = out.logits, out.teacher, out.labels  # [B, N-1, V], [B, N-1, V], [B, N-1]
        ce = out.loss
    else:
        if full is None:
            raise ValueError(f"--mode {config.mode} distils from the full model: pass it as `full`")
        student, labels = standalone_logits(module, batch, first_scored(config.mode, training=True))  # [B, N, V], [B, N]
        # --loss kd optimises KD alone: its CE is only logged, so it needs no graph
        ce, _ = label_cross_entropy(student if config.loss == "ce+kd" else student.detach(), labels)
        teacher, _ = prefill_with_reply(full, batch.context_ids, batch.context_mask, batch.target_ids,
                                        batch.target_mask, labels.shape[1])  # [B, N, V]
    scored = labels != IGNORE  # exactly the tokens CE scores
    kd = kd_per_token(student[scored], teacher[scored], config.kd_temperature).mean()
    loss = kd if config.loss == "kd" else (1 - config.kd_weight) * ce + config.kd_weight * kd
    return loss, int(scored.sum()), {"ce": ce.detach(), "kd": kd.detach()}
