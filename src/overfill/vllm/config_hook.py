"""Per-architecture config hook: vLLM calls MODELS_CONFIG_MAP[arch].verify_and_update_config(vllm_config)
from VllmConfig.__post_init__ (vllm/config/vllm.py:try_verify_and_update_config), in the process that
builds the config, before the enforce_eager / compilation decisions; the config is then shipped to
the engine core and workers. register() adds OverFill's entry, so users pass no extra arguments.
"""

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from overfill.vllm.tracker import TRACKER_FQCN

logger = init_logger(__name__)


class OverFillConfigHook(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        model_config = vllm_config.model_config
        if vllm_config.speculative_config is not None:
            raise ValueError("OverFill: speculative decoding is not supported")
        if not model_config.enforce_eager:
            # The forward pass branches on which tokens are prompt tokens: a captured graph would
            # freeze the branch of its dummy batch (all prompt -> full model) for every replay.
            logger.warning("OverFill: forcing enforce_eager (no torch.compile / CUDA graphs yet)")
            model_config.enforce_eager = True
        cache_config = vllm_config.cache_config
        if cache_config.enable_prefix_caching:
            # vLLM hashes cache blocks by their tokens alone, and caches the blocks of generated tokens
            # too. Those hold the decoder's keys and values: a later prompt that repeats a reply (the
            # next chat turn) would reuse them where OverFill prefills with the full model, so the
            # answer would depend on what happened to be cached.
            logger.info("OverFill: prefix caching is off (cached reply blocks hold the decoder's KV, not the full model's)")
            cache_config.enable_prefix_caching = False
        if not vllm_config.use_v2_model_runner:
            procs = list(model_config.logits_processors or [])
            if TRACKER_FQCN not in procs:
                procs.append(TRACKER_FQCN)
                model_config.logits_processors = procs
