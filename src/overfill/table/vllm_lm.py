"""`overfill table --engine vllm`: lm-eval's generate_until requests answered by the vLLM plugin's engine.

The harness model is `evaluation.lm_eval.OverFillLM` (its tokenizer, prompt ids and stop handling), with only
the generation swapped: each group of requests that share stop strings and a length limit goes to
an engine like the one `overfill eval --engine vllm` uses (`evaluation.vllm_replies`: the same prompt token
ids, greedy, the same end-of-turn ids, the engine in a child process of its own). One engine serves every
task of a column: it starts on the first request, sized for the harness model's whole context, and stops at
`close()`. vLLM stops on those ids
only; lm-eval's stop strings are cut afterwards, as our loop cuts them, so the text scored is the same and a
reply may only run on past a stop string up to the task's length limit (wasted decoding, never a different
answer). The torch model the harness model loads stays on the CPU, for the tokenizer and the generation
config; vLLM's engine holds the GPU.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
        self.worker, self.log = None, None

    def engine(self):
        """The column's engine, started on first use: room for any prompt and reply the harness model allows."""
        if self.worker is None:
            from overfill.vllm.export import engine_model
            from overfill.vllm.worker import EngineWorker

            fd, log = tempfile.mkstemp(prefix="overfill-vllm-", suffix=".log")
            os.close(fd)
            self.log = Path(log)
            self.worker = EngineWorker(engine_model(self.model_source, self.mode), self.log,
                                       engine={"max_model_len": self.max_length}, what=f"vLLM on {self.mode}").start()
        return self.worker

    def close(self) -> None:
        """Stop the engine; its log goes with it (a failed engine's log is kept and named in its error)."""
        if self.worker is not None:
            self.worker.close()
            self.log.unlink(missing_ok=True)
            self.worker = None

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from overfill.evaluation.vllm_replies import greedy_params

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
            replies, _ = self.engine().generate(contexts, **greedy_params(max_new, stop_ids))
            for i, ids in zip(indices, replies):
                outputs[i], _ = cut_at_stop(self.tok_decode([t for t in ids if t not in stop_ids]), stop)
                self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs
