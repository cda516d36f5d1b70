"""Per-architecture config hook: vLLM calls MODELS_CONFIG_MAP[arch].verify_and_update_config(vllm_config)
from VllmConfig.__post_init__ (vllm/config/vllm.py:try_verify_and_update_config), in the process that
builds the config, before its compilation defaults are filled in; the config is then shipped to the
engine core and workers. register() adds OverFill's entry, so users pass no extra arguments.

What OverFill changes, and only where it must (everything else is the user's and vLLM's defaults):
  * its batch tracker, a no-op logits processor (tracker.py), on the V1 model runner;
  * its scheduler (scheduler.py): prompt steps and decode steps in turn rather than mixed, and with
    prefix caching on, a cache block holding the decoder's KV never served to a later prompt as if
    the full model had computed it (prefix_cache.py);
  * on CUDA, piecewise graph capture instead of whole-model capture (model.py says why).
"""

from vllm.config import CUDAGraphMode
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.platforms import current_platform

from overfill.vllm.plugin.scheduler import SCHEDULER_FQCN, prompt_steps, step_policy
from overfill.vllm.plugin.tracker import TRACKER_FQCN

logger = init_logger(__name__)


class OverFillConfigHook(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        model_config = vllm_config.model_config
        if vllm_config.speculative_config is not None:
            raise ValueError("OverFill: vLLM's speculative decoding is not supported on an OverFill model "
                             "(serve the full model with the decoder as its draft instead)")
        step_policy(vllm_config), prompt_steps(vllm_config)  # a misspelt setting fails here, where it was parsed
        cache_config, scheduler_config = vllm_config.cache_config, vllm_config.scheduler_config
        if scheduler_config.scheduler_cls in (None, SCHEDULER_FQCN):
            scheduler_config.scheduler_cls = SCHEDULER_FQCN
        else:
            logger.warning("OverFill: --scheduler-cls %s is set, so steps mix prompts and decodes%s",
                           scheduler_config.scheduler_cls,
                           " and prefix caching is off (it needs OverFill's scheduler)" if cache_config.enable_prefix_caching else "")
            cache_config.enable_prefix_caching = False
        compilation = vllm_config.compilation_config
        if current_platform.is_cuda_alike() and not model_config.enforce_eager:
            mode = compilation.cudagraph_mode
            if mode is None or mode.has_full_cudagraphs():
                if mode is not None:
                    logger.warning("OverFill: cudagraph_mode %s -> PIECEWISE (a whole-model graph would "
                                   "freeze one stage routing into every replay)", mode.name)
                compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE
        if not vllm_config.use_v2_model_runner:
            procs = list(model_config.logits_processors or [])
            if TRACKER_FQCN not in procs:
                procs.append(TRACKER_FQCN)
                model_config.logits_processors = procs
