"""`overfill table --engine vllm`: lm-eval's generate_until requests answered by the vLLM plugin's engine.

The harness model is `evaluation.lm_eval.OverFillLM` (its tokenizer, prompt ids and stop handling), with only
the generation swapped: each group of requests that share stop strings and a length limit goes to
`evaluation.vllm_replies.vllm_replies` (the engine `overfill eval --engine vllm` uses: the same prompt token
ids, greedy, the same end-of-turn ids, one engine in a child process of its own). vLLM stops on those ids
only; lm-eval's stop strings are cut afterwards, as our loop cuts them, so the text scored is the same and a
reply may only run on past a stop string up to the task's length limit (wasted decoding, never a different
answer). The torch model the harness model loads stays on the CPU, for the tokenizer and the generation
config; vLLM's engine holds the GPU.
"""

from __future__ import annotations

from overfill.evaluation.lm_eval import OverFillLM
from overfill.generation import eos_ids_of
from overfill.stops import cut_at_stop


class VLLMTableLM(OverFillLM):
    def __init__(self, *, device: str | None = None, **kwargs):
        super().__init__(device="cpu", **kwargs)
        from overfill.model_source import ModelSource

        # What vLLM serves: the same models, on the asked device, in the asked dtype or that device's default.
        loaded = self.model_source
        self.model_source = ModelSource(checkpoint=loaded.checkpoint, model=loaded.model, decoder=loaded.decoder,
                                        dtype=kwargs.get("dtype"), trust_remote_code=loaded.trust_remote_code,
                                        device=device or "auto")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from overfill.evaluation.vllm_replies import vllm_replies

        eos_text = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        stop_ids = eos_ids_of(self.tokenizer, self.model.full, self.model.decoder)
        groups: dict[tuple, list[int]] = {}
        for index, req in enumerate(requests):
            kwargs = dict(req.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            stop = tuple(s for s in until if s and s != eos_text)
            groups.setdefault((stop, int(kwargs.get("max_gen_toks", self.max_gen_toks))), []).append(index)
        outputs = [""] * len(requests)
        for (stop, max_new), indices in groups.items():
            room = max(self.max_length - max_new, 1)
            contexts = [self.tok_encode(requests[i].args[0])[-room:] for i in indices]
            replies, _ = vllm_replies(self.model_source, self.mode, contexts, max_new_tokens=max_new, stop_ids=stop_ids,
                                      what=self.mode)
            for i, ids in zip(indices, replies):
                outputs[i], _ = cut_at_stop(self.tok_decode([t for t in ids if t not in stop_ids]), stop)
                self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs
