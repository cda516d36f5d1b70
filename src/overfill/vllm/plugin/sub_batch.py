"""A step's requests split in two sub-batches, each under a forward context of its own.

A mixed step (a prompt chunk beside running decodes) runs the decoder's compiled stage on the
decoding requests and the full model's compiled stage on the prompt requests. A compiled stage
calls each layer's attention as one opaque op, which reads the forward context at run time: its
per-layer attention metadata (which rows belong to which request, their cache blocks, and on the
CPU backend a work plan for the kernel built for exactly that batch) and the per-layer KV slot
mapping (where each row's K and V are written). So a sub-batch needs both rebuilt for its rows:
the metadata by the attention backend's own builder from a `CommonAttentionMetadata` of the chosen
requests, the slot mapping sliced to their tokens. A slice left out, or a plan reused from the
whole batch, would write K/V to other requests' slots or read the wrong blocks: silently wrong
tokens, which is why the tests compare the split route's hidden rows with the eager route's.

vLLM's own micro-batching does the same for two halves of a batch (vllm/v1/worker/ubatch_utils.py,
`_make_metadata_with_slice`); here the halves are request subsets chosen by stage, in any order
(vLLM's CPU backend does not reorder decodes to the front), so the requests are gathered.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from vllm.config import CUDAGraphMode
from vllm.forward_context import ForwardContext
from vllm.v1.attention.backend import CommonAttentionMetadata


def as_index(indices: np.ndarray) -> slice | torch.Tensor:
    """Row indices as a slice where they are a run (views, no copies), else an index tensor."""
    if len(indices) and indices[-1] - indices[0] + 1 == len(indices):
        return slice(int(indices[0]), int(indices[-1]) + 1)
    return torch.from_numpy(indices)


@dataclasses.dataclass(frozen=True)
class SubBatch:
    """Some of a step's requests: which ones, and which of the step's tokens are theirs."""

    requests: np.ndarray  # [r] request indices in the step's order
    tokens: np.ndarray  # [t] token indices, request by request
    query_start: np.ndarray  # [r + 1] the sub-batch's own query_start_loc
    max_seq_len: int

    @classmethod
    def of(cls, requests: np.ndarray, step_query_start: np.ndarray, seq_lens: np.ndarray) -> SubBatch:
        """`requests` of a step whose query_start_loc and sequence lengths (host arrays) are given."""
        starts, ends = step_query_start[requests], step_query_start[requests + 1]
        lengths = ends - starts
        query_start = np.zeros(len(requests) + 1, dtype=step_query_start.dtype)
        np.cumsum(lengths, out=query_start[1:])
        # token indices: each request's run [start, end), laid end to end
        tokens = np.repeat(starts - query_start[:-1], lengths) + np.arange(query_start[-1])
        return cls(requests, tokens, query_start, int(seq_lens[requests].max()))

    @property
    def token_index(self) -> slice | torch.Tensor:
        return as_index(self.tokens)


class SubBatchContexts:
    """Builds forward contexts for sub-batches, with the attention backend's own metadata builders.

    One builder per distinct metadata object of the step (vLLM shares one object among the layers of
    a KV-cache group), made on first use and kept: building one is cheap, but it registers the
    kernel's instruction set on its layers, which only needs doing once.
    """

    def __init__(self, vllm_config, attention_layers):
        self.vllm_config = vllm_config
        self.layers = {layer.layer_name: layer for layer in attention_layers}
        self.builders: dict[tuple[str, ...], object] = {}

    def _builder(self, layer_names: tuple[str, ...], device: torch.device):
        if layer_names not in self.builders:
            layer = self.layers[layer_names[0]]
            spec = layer.get_kv_cache_spec(self.vllm_config)
            builder_cls = layer.attn_backend.get_builder_cls()
            self.builders[layer_names] = builder_cls(spec, list(layer_names), self.vllm_config, device)
        return self.builders[layer_names]

    def context(self, step: ForwardContext, sub: SubBatch) -> ForwardContext:
        """The step's forward context narrowed to `sub`: metadata rebuilt, slot mapping sliced."""
        groups: dict[int, list[str]] = {}
        for name, metadata in step.attn_metadata.items():
            groups.setdefault(id(metadata), []).append(name)
        requests, tokens = as_index(sub.requests), sub.token_index
        # the same for every group: the sub-batch's own query starts (the kernel's dtype, int32) and longest query
        first = next(iter(step.attn_metadata.values()))
        query_start_cpu = torch.from_numpy(sub.query_start).to(first.query_start_loc.dtype)
        query_start = query_start_cpu.to(first.query_start_loc.device, non_blocking=True)
        max_query_len = int((sub.query_start[1:] - sub.query_start[:-1]).max())
        attn_metadata, slot_mapping = {}, {}
        for names in groups.values():
            whole = step.attn_metadata[names[0]]
            common = CommonAttentionMetadata(
                query_start_loc=query_start, query_start_loc_cpu=query_start_cpu,
                seq_lens=whole.seq_lens[requests], num_reqs=len(sub.requests), num_actual_tokens=int(sub.query_start[-1]),
                max_query_len=max_query_len, max_seq_len=sub.max_seq_len,
                block_table_tensor=whole.block_table[requests], slot_mapping=whole.slot_mapping[tokens],
                causal=whole.causal)
            built = self._builder(tuple(names), whole.seq_lens.device).build(0, common)
            for name in names:
                attn_metadata[name] = built
                slot_mapping[name] = step.slot_mapping[name][tokens]
        # no CUDA graph for a sub-batch: its size matches no captured one (on CPU there are none)
        return dataclasses.replace(step, attn_metadata=attn_metadata, slot_mapping=slot_mapping, is_padding=None,
                                   cudagraph_runtime_mode=CUDAGraphMode.NONE, batch_descriptor=None)
