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
Each request's tokens this step and where they sit come from `query_start_loc` and `seq_lens` in
the forward context's attention metadata (every backend has both; on CPU they are host tensors),
whose request order is the persistent batch's (the same indices the BatchUpdate uses). From these
and the mirror, `step_route` decides the step's route on the host (`StepRoute`), without reading
any device value: model.py runs the step by it.

Model Runner V2 (vllm/v1/worker/gpu/model_runner.py, GPU default when Triton is present) lets
the model supply its own ModelState (`get_model_state_cls`), whose `prepare_inputs` sees
req_states.prompt_len and input_batch.idx_mapping directly: see model_state.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

TRACKER_FQCN = "overfill.vllm.plugin.tracker:PromptLengthTracker"


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


PROMPT, REPLY, BOTH = 0, 1, 2  # what a request's tokens in one step are: all prompt, all reply, or both


@dataclass(frozen=True)
class StepRoute:
    """Which stage each request of a step needs, decided on the host from data the runner already has.

    A request's tokens this step sit at positions [seq_len - query_len, seq_len): all prompt tokens
    when seq_len <= P, all reply tokens when seq_len - query_len >= P, both otherwise (only a request
    recomputing prompt and reply after preemption). The step's route follows:
      full     every request PROMPT                 (a prefill step)
      decoder  every request REPLY                  (a decode step)
      split    PROMPT and REPLY requests            (a prompt chunk beside running decodes)
      eager    some request BOTH                    (both stages, row by row)
    """

    query_start: np.ndarray  # [R + 1] query_start_loc
    seq_lens: np.ndarray  # [R]
    prompt_lens: np.ndarray  # [R]
    kinds: np.ndarray  # [R] PROMPT / REPLY / BOTH

    @property
    def num_reqs(self) -> int:
        return len(self.kinds)

    @property
    def lengths(self) -> np.ndarray:
        """[R] tokens each request computes this step."""
        return self.query_start[1:] - self.query_start[:-1]

    @property
    def starts(self) -> np.ndarray:
        """[R] position of each request's first token this step."""
        return self.seq_lens - self.lengths

    @functools.cached_property
    def name(self) -> str:
        if (self.kinds == PROMPT).all():
            return "full"
        if (self.kinds == REPLY).all():
            return "decoder"
        return "eager" if (self.kinds == BOTH).any() else "split"

    def requests(self, kind: int) -> np.ndarray:
        return np.flatnonzero(self.kinds == kind)

    def token_counts(self) -> tuple[int, int]:
        """(prompt tokens, reply tokens) this step."""
        prompt = np.clip(np.minimum(self.seq_lens, self.prompt_lens) - self.starts, 0, None).sum()
        return int(prompt), int(self.query_start[-1] - prompt)

    def prompt_mask(self, num_tokens: int, device) -> torch.Tensor:
        """[num_tokens] bool, True where the token is a prompt token (padding rows past the last request: True)."""
        lengths = self.lengths
        positions = np.repeat(self.starts - self.query_start[:-1], lengths) + np.arange(self.query_start[-1])
        mask = np.ones(num_tokens, dtype=bool)
        mask[: self.query_start[-1]] = positions < np.repeat(self.prompt_lens, lengths)
        return torch.from_numpy(mask).to(device)

    def sampled_from_decoder(self) -> np.ndarray:
        """[R] bool: whether each request's last token this step (the row vLLM samples from) is the decoder's."""
        return self.seq_lens > self.prompt_lens


def host(tensor: torch.Tensor) -> np.ndarray:
    """A step tensor as a numpy array. The CPU runner keeps these on the host, so this copies nothing and
    waits for nothing; a CUDA runner on Model Runner V1 would pay a device sync here (its V2 route,
    model_state.py, decides on the device instead)."""
    return tensor.numpy() if tensor.device.type == "cpu" else tensor.cpu().numpy()


def step_route() -> StepRoute | None:
    """The route of the step in the current forward context (MRV1: mirror + attention metadata); None for a
    profile or dummy run, which has no requests (nothing is cached or sampled: any stage will do)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    metadata = get_forward_context().attn_metadata if is_forward_context_available() else None
    if not metadata:
        return None
    if isinstance(metadata, list):
        raise NotImplementedError("OverFill: micro-batching (DBO) is not supported")
    if not MIRROR.installed:
        raise RuntimeError(f"OverFill needs its batch tracker: pass logits_processors=['{TRACKER_FQCN}'] "
                           f"(CLI: --logits-processors {TRACKER_FQCN})")
    if MIRROR.num_reqs == 0:
        return None  # a dummy batch with metadata (graph capture)
    layer_meta = next(iter(metadata.values()))
    query_start = host(layer_meta.query_start_loc).astype(np.int64)
    num_reqs = len(query_start) - 1
    if num_reqs != MIRROR.num_reqs:
        raise RuntimeError(f"OverFill: step has {num_reqs} requests, the tracker {MIRROR.num_reqs}")
    prompt_lens = MIRROR.prompt_lens[:num_reqs].copy()
    if (prompt_lens < 0).any():
        raise RuntimeError("OverFill: a scheduled request has no recorded prompt length")
    seq_lens = host(layer_meta.seq_lens)[:num_reqs].astype(np.int64)
    starts = seq_lens - (query_start[1:] - query_start[:-1])
    kinds = np.where(seq_lens <= prompt_lens, PROMPT, np.where(starts >= prompt_lens, REPLY, BOTH))
    return StepRoute(query_start, seq_lens, prompt_lens, kinds)
