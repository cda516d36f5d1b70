"""Prefix caching for OverFill: reuse the full model's KV of earlier prompts, never the decoder's as if it were.

vLLM names a cache block by a hash of its tokens and of every block before it, and caches the
blocks of generated tokens too. In an OverFill engine those blocks hold the *decoder's* keys and
values (every position at or after the prompt's end is decoded by it), while a later prompt that
repeats them (the next turn of a chat, which carries the previous reply) must be prefilled by the
full model, as `overfill chat` does. So a block that reaches past its request's prompt gets one
more key in its hash: how many of its tokens were prompt tokens. Then
  * a block inside a prompt hashes as in plain vLLM: a shared system prompt, the earlier turns of a
    chat (up to the last whole block before the previous reply) are served from the cache;
  * a block holding reply tokens matches only a block that split prompt and reply at the same
    place: the same request recomputing after preemption, or the same prompt answered again; its
    KV is then what this request would compute itself.

vLLM hashes a request's blocks through `Request._block_hasher` (the engine core's, set at creation;
prompt-only blocks are hashed then, with no extra key, as here). The scheduler is the extension
point vLLM offers (`--scheduler-cls`, set by config_hook.py): OverFill's (scheduler.py) hands each
request OverFill's hasher as it arrives, before any reply block exists. Multimodal and prompt-embedding inputs, which
OverFill does not take, are not hashed here.
"""

from __future__ import annotations

from collections.abc import Callable

from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import BlockHash, generate_block_hash_extra_keys, hash_block_tokens
from vllm.v1.request import Request

PROMPT_TOKENS_KEY = "overfill_prompt_tokens"


def block_hasher(block_size: int, hash_fn: Callable) -> Callable[[Request], list[BlockHash]]:
    """Hashes of a request's whole blocks not hashed yet, a reply-holding block keyed by its prompt tokens."""

    def hashes(request: Request) -> list[BlockHash]:
        start = len(request.block_hashes) * block_size
        parent = request.block_hashes[-1] if request.block_hashes else None
        new: list[BlockHash] = []
        while start + block_size <= request.num_tokens:
            end = start + block_size
            extra, _ = generate_block_hash_extra_keys(request, start, end, 0)  # LoRA name, cache salt
            if end > request.num_prompt_tokens:
                extra = (*(extra or ()), (PROMPT_TOKENS_KEY, max(0, request.num_prompt_tokens - start)))
            parent = hash_block_tokens(hash_fn, parent, request.all_token_ids[start:end], extra)
            new.append(parent)
            start = end
        return new

    return hashes


class PromptAwareHashing:
    """Scheduler mixin: every request added gets OverFill's block hasher."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        size = kwargs.get("hash_block_size") or kwargs["block_size"]
        self.overfill_hasher = block_hasher(size, get_hash_fn_by_name(self.cache_config.prefix_caching_hash_algo))

    def add_request(self, request: Request) -> None:
        if request._block_hasher is not None:
            request._block_hasher = self.overfill_hasher
        super().add_request(request)

