"""OverFill across machines on vLLM's NIXL connector (pull mode): one change on the decode side.

The decode instance is given prompt + token 1 (the full model's token, from the prefill instance)
and must take from the prefill instance the KV of the prompt's L positions, no more: the decoder
computes token 1's KV itself. Stock NIXL pulls the KV of every prompt token it is given, L + 1 here,
so it would ask for a position the prefill instance never computed, and when L fills whole blocks
for a block that instance never had (its transfer then fails). `PromptOnlyScheduler` counts one
token fewer; everything else is NIXL's own (handshake, block-shape checks, transfers). The prefill
instance runs NIXL unchanged. Model names differ between the two instances (full model, decoder),
so the handshake's model check is turned off (`enforce_handshake_compat: false`); NIXL still
validates block shapes, layout and dtype at run time.

Not run on this project's machines: `nixl` ships CUDA builds only.
"""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlPullConnector
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import NixlPullConnectorScheduler


class PromptOnlyScheduler(NixlPullConnectorScheduler):
    def _get_remote_prefill_token_count(self, num_prompt_tokens: int) -> int:
        # The last "prompt" token here is token 1: its KV is the decoder's to compute, not the prefill instance's.
        return super()._get_remote_prefill_token_count(num_prompt_tokens - 1)


class OverFillNixlConnector(NixlPullConnector):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        if role == KVConnectorRole.SCHEDULER and vllm_config.kv_transfer_config.kv_role == "kv_consumer":
            self.connector_scheduler = PromptOnlyScheduler(vllm_config, self.engine_id, kv_cache_config)
