"""Which tokens of a vLLM step are prompt tokens (full model) and which are generated (decoder).

Rule: token t of request r is a prompt token iff positions[t] < prompt_len[r]  (its absolute
position in the sequence, not whether r "is prefilling", nor how many tokens r computes this
step: a 1-token final chunk, or the one token left after a prefix-cache hit, would pass for a
decode step). So:
  * the last prompt token (position P-1) is always the full model's, whether it arrives in a long
    chunk, a 1-token final chunk or alone after a prefix-cache hit: its logits give y1;
  * y1 (position P) and every later token are the decoder's, including when a preempted request
    recomputes prompt + generated tokens in one prefill-shaped chunk.

Model Runner V1 (vllm/v1/worker/gpu_model_runner.py, also CPUModelRunner) passes a model only
input_ids and positions; prompt lengths reach no model code. They do reach logits processors:
`InputBatch._register_add_request` queues (index, params, prompt_token_ids, output_token_ids)
and `InputBatch.refresh_metadata` hands the BatchUpdate (removed, added, moved) to every
processor at the end of `GPUModelRunner._update_states`, i.e. before `_prepare_inputs` and the
forward pass of the same step. `PromptLengthTracker` is an argmax-invariant, no-op logits
processor that mirrors index -> prompt length; the model reads the mirror in the same process.
The per-token request index comes from `query_start_loc` in the forward context's attention
metadata (present in every backend's metadata; CPU: CPUAttentionMetadata.query_start_loc),
whose request order is the persistent batch's (the same indices the BatchUpdate uses).

Model Runner V2 (vllm/v1/worker/gpu/model_runner.py, GPU default when Triton is present) lets
the model supply its own ModelState (`get_model_state_cls`), whose `prepare_inputs` sees
req_states.prompt_len and input_batch.idx_mapping directly: see model_state.py.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

TRACKER_FQCN = "overfill.vllm.tracker:PromptLengthTracker"


class _Mirror:
    """Per-process mirror of the persistent batch: slot -> prompt length (-1 = empty)."""

    def __init__(self) -> None:
        self.prompt_lens = np.full(0, -1, dtype=np.int64)
        self.num_reqs = 0
        self.installed = False

    def reset(self, max_num_reqs: int) -> None:
        self.prompt_lens = np.full(max_num_reqs, -1, dtype=np.int64)
        self.num_reqs = 0
        self.installed = True


MIRROR = _Mirror()


class PromptLengthTracker(LogitsProcessor):
    """Never changes logits; records each request's prompt length by persistent-batch index."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        MIRROR.reset(vllm_config.scheduler_config.max_num_seqs)

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        lens = MIRROR.prompt_lens
        for index in batch_update.removed:
            lens[index] = -1
        for index, _params, prompt_ids, _output_ids in batch_update.added:
            if prompt_ids is None:
                raise ValueError("OverFill needs prompt token ids (prompt embeddings are not supported)")
            lens[index] = len(prompt_ids)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                lens[a], lens[b] = lens[b], lens[a]
            else:
                lens[b] = lens[a]
                lens[a] = -1
        MIRROR.num_reqs = batch_update.batch_size


def prompt_mask_from_context(positions: torch.Tensor) -> torch.Tensor:
    """[N] bool, True where the token is a prompt token (MRV1: mirror + forward context)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    n = positions.shape[0]
    device = positions.device
    metadata = get_forward_context().attn_metadata if is_forward_context_available() else None
    if not metadata:
        # Profile / dummy runs carry no attention metadata: nothing is cached, any stage will do.
        return torch.ones(n, dtype=torch.bool, device=device)
    if isinstance(metadata, list):
        raise NotImplementedError("OverFill: micro-batching (DBO) is not supported")
    if not MIRROR.installed:
        raise RuntimeError(f"OverFill needs its batch tracker: pass logits_processors=['{TRACKER_FQCN}'] "
                           f"(CLI: --logits-processors {TRACKER_FQCN})")
    layer_meta = next(iter(metadata.values()))
    qsl = layer_meta.query_start_loc
    num_reqs = qsl.shape[0] - 1
    if MIRROR.num_reqs == 0:
        return torch.ones(n, dtype=torch.bool, device=device)  # a dummy batch with metadata (graph capture)
    if num_reqs != MIRROR.num_reqs:
        raise RuntimeError(f"OverFill: step has {num_reqs} requests, the tracker {MIRROR.num_reqs}")
    lens = torch.from_numpy(MIRROR.prompt_lens[:num_reqs]).to(device)
    if bool((lens < 0).any()):
        raise RuntimeError("OverFill: a scheduled request has no recorded prompt length")
    counts = (qsl[1:] - qsl[:-1]).to(device)
    total = int(qsl[-1])
    req_of_token = torch.repeat_interleave(torch.arange(num_reqs, device=device), counts, output_size=total)
    mask = torch.ones(n, dtype=torch.bool, device=device)  # padding rows (n > total) stay "full"
    mask[:total] = positions[:total] < lens[req_of_token]
    return mask
