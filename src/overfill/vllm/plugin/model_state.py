"""Model Runner V2 route (GPU default in vLLM 0.32 when Triton is present): NOT exercised on this CPU box.

vllm/v1/worker/gpu/model_states/__init__.py:resolve_model_state_cls uses
`model.get_model_state_cls()` when the model defines it; ModelState.prepare_inputs(input_batch,
req_states) returns extra keyword arguments for model.forward (vllm/v1/worker/gpu/model_runner.py:
execute_model builds `model_inputs = {..., **self.model_state.prepare_inputs(...)}`).
req_states.prompt_len is "tokens in the user-provided prompt" per slot (states.py), stable across
preemption (prefill_len grows instead), and input_batch.idx_mapping maps batch row -> slot, so the
per-token rule positions < prompt_len needs no logits processor here and stays on the device.
"""

from __future__ import annotations

import torch
from vllm.v1.worker.gpu.model_states.default import DefaultModelState


class OverFillModelState(DefaultModelState):
    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        # Persistent buffer: the same storage every step (CUDA-graph friendly).
        self.is_prompt = torch.ones(self.max_num_tokens, dtype=torch.bool, device=device)
        self.token_index = torch.arange(self.max_num_tokens, device=device)

    def prepare_inputs(self, input_batch, req_states):
        inputs = super().prepare_inputs(input_batch, req_states)
        n, total, reqs = input_batch.num_tokens_after_padding, input_batch.num_tokens, input_batch.num_reqs
        prompt_len = req_states.prompt_len.gpu[input_batch.idx_mapping[:reqs]]  # [R]
        ends = input_batch.query_start_loc[1 : reqs + 1]  # [R] exclusive ends
        req_of_token = torch.searchsorted(ends, self.token_index[:total], right=True)  # [T]
        self.is_prompt[:n].fill_(True)
        torch.lt(input_batch.positions[:total], prompt_len[req_of_token], out=self.is_prompt[:total])
        inputs["overfill_is_prompt"] = self.is_prompt[:n]
        return inputs

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int):
        inputs = super().prepare_dummy_inputs(num_reqs, num_tokens)
        self.is_prompt[:num_tokens].fill_(True)
        inputs["overfill_is_prompt"] = self.is_prompt[:num_tokens]
        return inputs
