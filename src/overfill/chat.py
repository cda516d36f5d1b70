"""Multi-turn chat that keeps the prompt cache between turns.

The cache of earlier turns is always *prefill-model* KV (the full model's, in overfill mode).
After each reply the cache is cut back to the end of the context: the decoder's KV for its own
reply is dropped, and on the next turn the full model prefills the previous reply plus the new
user turn on top of the kept cache. Older turns are never re-encoded (unless the conversation
outgrows the model's context and `truncate` cuts its start: then the whole of it is prefilled anew).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import torch

from overfill.errors import OverfillError
from overfill.generation import GenerationConfig, encode_prompt, eos_ids_of, fit_prompt, generate_ids
from overfill.kv_cache import GrowingCache, crop_to
from overfill.stops import stream_steps
from overfill.tensors import pad_id_of


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_chat_config(config: GenerationConfig) -> None:
    if config.mode == "speculative" and config.drafter == "pruned":
        raise OverfillError("chat keeps the full model's cache between turns and the pruned drafter would need one of "
                            "its own: use --drafter overfill in chat (it drafts on the full model's cache)")


class ChatSession:
    def __init__(self, model, config: GenerationConfig | None = None, system: str | None = None):
        self.model = model
        self.config = replace(config or GenerationConfig(), num_return_sequences=1)  # one reply per turn
        self.system = system
        check_chat_config(self.config)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = None
        self.cached_ids: list[int] = []  # tokens whose prefill-model KV is in self.cache

    def set_mode(self, mode: str) -> None:
        # Another mode may prefill with another model: its cache is not ours to reuse.
        self.config = replace(self.config, mode=mode)
        self.cache, self.cached_ids = None, []
        check_chat_config(self.config)

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to a new user turn; the reply joins the history when the stream ends.

        The turn is checked at once, not at the first piece: text that is not UTF-8, or a
        conversation that no longer fits the model's context, is an OverfillError before any output.
        """
        ids = encode_prompt(self.model.tokenizer, [*self.messages, {"role": "user", "content": text}])
        ids = fit_prompt(ids, self.model, self.config, "the conversation")
        return self._reply(text, ids)

    def _reply(self, text: str, ids: list[int]) -> Iterator[str]:
        tokenizer = self.model.tokenizer
        keep = common_prefix_length(ids, self.cached_ids)
        if keep == len(ids):  # the template must leave something to prefill
            keep -= 1
        if self.cache is not None:
            crop_to(self.cache, keep)
        if self.cache is None or keep == 0:
            self.cache = GrowingCache()  # generate_ids fills and extends this object in place
        new_ids = torch.tensor([ids[keep:]])
        mask = torch.ones(1, len(ids), dtype=torch.long)
        eos = eos_ids_of(tokenizer, self.model.full, self.model.decoder)
        steps = generate_ids(self.model, new_ids, mask, self.config, eos_ids=eos, pad_id=pad_id_of(tokenizer),
                             cache=self.cache, past_lengths=torch.tensor([keep]))
        pieces = []
        for piece in stream_steps(steps, tokenizer, eos, self.config.stop):
            pieces.append(piece)
            yield piece
        steps.close()
        # Only the context's KV came from the prefill model; drop the reply's (decoder) entries.
        crop_to(self.cache, len(ids))
        self.cached_ids = ids
        # The turn joins the history only once answered: an abandoned turn leaves no user turn
        # without a reply behind (templates that insist on alternating roles would refuse it).
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]

    def say(self, text: str) -> str:
        return "".join(self.send(text))
