"""What vLLM loads into its own processes (front end, engine core, workers): the OverFill model and what it
needs of the engine. The rest of overfill.vllm drives vLLM from our side (export, runtime, serve, router).

- model.py: OverFillForCausalLM, one vLLM model holding both stages over one paged KV cache; stages.py its
  layers, sub_batch.py the forward contexts of a split mixed step;
- tracker.py: which tokens of a step are prompt tokens (a logits processor that mirrors the batch);
- scheduler.py: prompt steps and decode steps in turn; prefix_cache.py: block hashes that keep the two
  stages' KV apart;
- config_hook.py: the engine settings the model needs, applied as vLLM reads the model's config;
- model_state.py: the same for vLLM's Model Runner V2;
- kv_connector.py, nixl_connector.py: a prompt's KV from a prefill instance to a decode instance.

Nothing here imports from the other side; both sides share only the constants in overfill/vllm/__init__.py.
"""
