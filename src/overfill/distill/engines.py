"""What generates the full model's replies for `overfill distill`: our own loop, or vLLM in a process of its own.

Both take the prompts as context token ids (nothing is re-tokenised) and give each prompt's
reply ids, its stop token included when it stopped, as `generation.generate_ids` does. A sampled
prompt draws from a generator seeded by `prompt_seed(seed, its context ids)` alone: our loop seeds
one generator per row (`TokenChooser(row_seeds=...)`), vLLM one per request
(`SamplingParams.seed`). So a reply depends on the seed and its prompt, not on which prompts share
its batch or where a resumed run restarted, on either engine; up to float rounding, which differs
between batch shapes and can flip a token that sits on a draw's boundary, as a near tie can flip a
greedy one. The two engines' random streams differ: their sampled replies are not the same.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from overfill.generation import Endings, GenerationConfig, TokenChooser, decode_batch
from overfill.model_source import ModelSource

VLLM_MAX_TEMPERATURE = 2.0  # vLLM refuses a higher one


def prompt_seed(seed: int, context_ids: list[int]) -> int:
    """The seed of one prompt's sampling: from the run's seed and the prompt's own tokens only."""
    digest = hashlib.sha256(f"{seed}:{','.join(map(str, context_ids))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: a valid seed for torch and vLLM alike


class TorchEngine:
    """Our own loop on the loaded full model, one left-padded batch per call."""

    name = "torch"

    def __init__(self, model, config: GenerationConfig):
        self.model, self.config, self.endings = model, config, Endings.of(model)

    def __call__(self, contexts: list[list[int]], seeds: list[int]) -> list[list[int]]:
        chooser = None if self.config.greedy else TokenChooser(self.config, row_seeds=seeds)
        return [r.token_ids for r in decode_batch(self.model, contexts, self.config, self.endings, chooser=chooser)]

    def close(self, ok: bool = True) -> None:
        pass


class VllmEngine:
    """vLLM's offline engine on the full model's folder (`vllm.export.engine_model(source, "full")`), kept
    alive in an `EngineWorker` child for every call; vLLM's output goes to a log kept only if it fails."""

    name = "vllm"

    def __init__(self, source: ModelSource, config: GenerationConfig, *, eos_ids: set[int], max_model_len: int,
                 report=None):
        from overfill.vllm.export import engine_model
        from overfill.vllm.worker import EngineWorker

        self.params = {"temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k,
                       "max_tokens": config.max_new_tokens, "stop_token_ids": sorted(eos_ids), "detokenize": False}
        self.sampled = not config.greedy
        fd, log = tempfile.mkstemp(prefix="overfill-vllm-", suffix=".log")
        os.close(fd)
        self.log = Path(log)
        # Room for the longest prompt and its whole reply, no more: vLLM sizes its KV cache by it.
        self.worker = EngineWorker(engine_model(source, "full"), self.log, engine={"max_model_len": max_model_len},
                                   what=f"vLLM on {source.describe()}")
        try:
            self.worker.start(report)
        except BaseException:  # a failed or interrupted start: stop the child, keep its log (the error names it)
            self.worker.close()
            raise

    def __call__(self, contexts: list[list[int]], seeds: list[int]) -> list[list[int]]:
        replies, _ = self.worker.generate([list(map(int, c)) for c in contexts], seeds=seeds if self.sampled else None,
                                          **self.params)
        return replies

    def close(self, ok: bool = True) -> None:
        self.worker.close()
        if ok:
            self.log.unlink(missing_ok=True)
