"""OverFillForCausalLM: a full model and a width-pruned decoder in one vLLM model, one paged KV cache.

Per layer there is ONE vLLM `Attention` (one KV-cache slot per layer), fed by the full model's
q/k/v projections for prompt tokens and by the decoder's for generated tokens; its output goes
back through the matching o_proj. Everything else (norms, MLPs, embeddings, final norm, LM head)
exists twice, at the two widths. Both stages share the rotary embedding (same head_dim / rope).
Which stage a token uses: tracker.py (positions < prompt length of its request).

A step takes one of four routes, chosen on the host before any layer runs (tracker.StepRoute):
  * full:    every token is a prompt token (a prefill step)         -> `FullStage`, compiled
  * decoder: every token is a generated one (a decode step)         -> `DecoderStage`, compiled
  * split:   prompt requests beside decoding ones (a busy server's  -> `DecoderStage` on the decoding
             usual step)                                               requests, then `FullStage` on the
                                                                       prompt requests, each compiled,
                                                                       under a forward context of its
                                                                       own (sub_batch.py)
  * eager:   a request's chunk holds prompt and reply tokens (a     -> both stages' layers, eager, each
             preempted request recomputing)                            on its own rows, sharing each
                                                                       layer's attention call
Each stage is its own `@support_torch_compile` class, as vLLM's drafters are separate compiled
modules: a compiled graph holds no branch on which tokens are whose, so the route cannot live
inside one. The two stages have different `forward` functions because vLLM keys its compile cache
on forward's qualified name. On CUDA, vLLM's whole-model graph capture would freeze the route of
its capture batch into every replay, so config_hook.py keeps capture piecewise (per stage), and a
split step's sub-batches run compiled without graphs.

The hidden states returned to the model runner have width max(D_full, D_dec) + 1: a full-model
row is [norm_full(h), 0..., 0], a decoder row [norm_dec(h), 0..., 1]. The runner gathers the rows
it samples from (logits_indices, prompt-logprob rows, ...) and calls compute_logits, which picks
each row's LM head from the step's route (or, where the route cannot place a row, its last column):
the first reply token comes from the full model's head (its row is the last prompt token), every
later token from the decoder's.

The stages themselves (layers, the shared attention, the compiled modules, the families' traits):
stages.py.

Weights: full model's names as in its HF checkpoint ("model.layers.0.self_attn.q_proj.weight",
"lm_head.weight"); decoder's the same with a "decoder." prefix. See export.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.forward_context import get_forward_context, is_forward_context_available, override_forward_context, set_forward_context
from vllm.logger import init_logger
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.sequence import IntermediateTensors

from overfill.vllm import COUNT_TOKENS_ENV, EAGER_STEP_LOG
from overfill.vllm.plugin import tracker
from overfill.vllm.plugin.stages import WARMUP_TOKENS, DecoderStage, FullStage, SharedAttention, StageShape
from overfill.vllm.plugin.sub_batch import SubBatch, SubBatchContexts

logger = init_logger(__name__)

# Checkpoint names (export.py) -> this model's: the full model's "model." is the full stage, the decoder's
# "decoder.model." the decoder stage, and a stage's layer holds its attention projections itself (no self_attn).
CHECKPOINT_NAMES = WeightsMapper(orig_to_new_prefix={"decoder.model.": "decoder.", "model.": "full.", "lm_head.": "full.lm_head."},
                                 orig_to_new_substr={".self_attn.": "."})


def _full_model_ties(vllm_config: VllmConfig) -> bool:
    """Whether the full model's LM head is its input embedding.

    vLLM unties a config that claims tied embeddings as soon as any checkpoint tensor name ends in
    "lm_head.weight" (ModelConfig.maybe_untie_word_embeddings), and an untied decoder's
    "decoder.lm_head.weight" counts there: the full model would then get an LM head that no
    tensor fills (uninitialised memory, and vLLM's loader does not notice), so every first token
    would be wrong. Only the full model's own "lm_head.weight" unties it.
    """
    model_config = vllm_config.model_config
    if not getattr(model_config, "word_embeddings_untied_by_checkpoint", False):
        return bool(getattr(model_config.hf_config, "tie_word_embeddings", False))
    from vllm.transformers_utils.config import get_safetensors_params_metadata

    return "lm_head.weight" not in get_safetensors_params_metadata(model_config.model, revision=model_config.revision)


class OverFillForCausalLM(nn.Module):
    # vLLM's LoRA / quantisation helpers read these (same fused layout as Llama).
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if get_pp_group().world_size > 1:
            raise NotImplementedError("OverFill: pipeline parallelism is not supported")
        meta = getattr(config, "overfill", None)
        if not isinstance(meta, dict) or "decoder" not in meta:
            raise ValueError("config.json has no 'overfill' section: build the folder with overfill.vllm.export")
        dec = meta["decoder"]
        if not getattr(config, "head_dim", None):
            config.head_dim = config.hidden_size // config.num_attention_heads
        self.config, self.vllm_config = config, vllm_config
        self.uses_model_state = bool(getattr(vllm_config, "use_v2_model_runner", False))
        if not self.uses_model_state and not tracker.MIRROR.installed:
            raise RuntimeError("OverFill on vLLM's V1 model runner needs its batch tracker: pass "
                               f"logits_processors=['{tracker.TRACKER_FQCN}'] (CLI: --logits-processors "
                               f"{tracker.TRACKER_FQCN})")
        eps = config.rms_norm_eps
        full_shape = StageShape(config.hidden_size, config.intermediate_size, eps, _full_model_ties(vllm_config))
        decoder_shape = StageShape(dec["hidden_size"], dec["intermediate_size"], dec.get("rms_norm_eps") or eps,
                                   bool(dec.get("tie_word_embeddings", False)))
        self.out_width = max(full_shape.hidden, decoder_shape.hidden) + 1
        self.shared = SharedAttention(vllm_config, prefix)
        self.full = FullStage(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "full"), shape=full_shape,
                              shared=self.shared, out_width=self.out_width)
        self.decoder = DecoderStage(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "decoder"), shape=decoder_shape,
                                    shared=self.shared, out_width=self.out_width)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))
        self.compiled_both = False  # both stages traced on a batch of more than one token (see _compile_both)
        self.sub_batches = SubBatchContexts(vllm_config, self.shared.attn)
        self.split_mixed_steps = True  # False: mixed steps take the eager route (the bench times both)
        self.route: tracker.StepRoute | None = None  # the last step's, for compute_logits
        # Steps by route (this process): what the bench reports, eager ones above all. The tokens each stage
        # ran are counted only when asked for (tests, the bench's routing check), off the serving path.
        self.stats = dict.fromkeys(("full", "decoder", "split", "eager", "full_tokens", "decoder_tokens"), 0)
        self.count_tokens = os.environ.get(COUNT_TOKENS_ENV) == "1"

    # ------------------------------------------------------------------ vLLM model interface

    def get_model_state_cls(self):  # Model Runner V2 hook (vllm/v1/worker/gpu/model_states/__init__.py)
        from overfill.vllm.plugin.model_state import OverFillModelState
        return OverFillModelState

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.full.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None,
                overfill_is_prompt: torch.Tensor | None = None, **_unused) -> torch.Tensor:
        if input_ids is None:
            raise NotImplementedError("OverFill: inputs_embeds (multimodal / prompt embeds) are not supported")
        if is_forward_context_available() and not get_forward_context().attn_metadata:
            # A profile / warm-up run: nothing is cached and nothing sampled. Run (and so compile)
            # both stages now, at engine start, rather than the decoder on the first request.
            self.decoder(input_ids, positions)
            self.compiled_both = input_ids.shape[0] > 1
            self.route = None
            return self.full(input_ids, positions)
        if not self.compiled_both:
            self._compile_both(input_ids, positions)
        if overfill_is_prompt is not None:  # Model Runner V2 (GPU): the mask comes from its ModelState
            return self._forward_by_mask(input_ids, positions, overfill_is_prompt)
        route = self.route = tracker.step_route()
        name = "full" if route is None else route.name
        self.stats[name] += 1
        if self.count_tokens and route is not None:
            prompt_tokens, reply_tokens = route.token_counts()
            self.stats["full_tokens"] += prompt_tokens
            self.stats["decoder_tokens"] += reply_tokens
        if name == "full":
            return self.full(input_ids, positions)
        if name == "decoder":
            return self.decoder(input_ids, positions)
        if name == "split" and self.split_mixed_steps:
            return self._split(input_ids, positions, route)
        if name == "eager":
            logger.warning(EAGER_STEP_LOG, self.stats["eager"])
        return self._mixed(input_ids, positions, route.prompt_mask(input_ids.shape[0], input_ids.device))

    def _split(self, input_ids: torch.Tensor, positions: torch.Tensor, route: tracker.StepRoute) -> torch.Tensor:
        """A mixed step as two compiled calls: the decoding requests through the decoder stage, then the
        prompt requests through the full stage, each under a forward context that describes its rows only.
        Decoder first: a prompt request can only share a cache block with a reply of the same split (the
        same request recomputing), and then it must read the reply's KV as written."""
        step = get_forward_context()
        hidden = input_ids.new_zeros(input_ids.shape[0], self.out_width, dtype=self.full.norm.weight.dtype)
        for stage, kind in ((self.decoder, tracker.REPLY), (self.full, tracker.PROMPT)):
            sub = SubBatch.of(route.requests(kind), route.query_start, route.seq_lens)
            rows = sub.token_index
            with override_forward_context(self.sub_batches.context(step, sub)):
                hidden[rows] = stage(input_ids[rows], positions[rows])
        return hidden

    def _forward_by_mask(self, input_ids, positions, is_prompt) -> torch.Tensor:
        """Model Runner V2 (GPU only, not run here): route by a per-token device mask (one host sync)."""
        n, n_full = input_ids.shape[0], int(is_prompt.sum())
        self.route = None
        if n_full == n:
            return self.full(input_ids, positions)
        if n_full == 0:
            return self.decoder(input_ids, positions)
        return self._mixed(input_ids, positions, is_prompt)

    def _compile_both(self, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
        """Trace both stages on a dummy batch of several tokens, where vLLM started serving without a
        warm-up run (VLLM_CPU_CI_ENV skips it). vLLM compiles a stage on its first call and keeps that
        graph, without guards, for every later call: Dynamo specialises a size of 1, so a decoder first
        called by a decode step at batch 1 would keep a graph for one row; and the dummy inputs must have
        the real ones' dtypes (vLLM's token ids are int32). With no attention metadata, no KV is written."""
        ids, pos = input_ids.new_zeros(WARMUP_TOKENS), positions.new_zeros(WARMUP_TOKENS)
        with set_forward_context(None, self.vllm_config):
            self.full(ids, pos)
            self.decoder(ids, pos)
        self.compiled_both = True

    def _mixed(self, input_ids, positions, is_prompt) -> torch.Tensor:
        """Each stage on its own rows; per layer, one attention call over all rows (eager: the row split is data)."""
        rows = [is_prompt.nonzero().squeeze(1), (~is_prompt).nonzero().squeeze(1)]  # [n_full], [n_dec]
        stages = [self.full, self.decoder]
        streams = [[stage.embed_tokens(input_ids[r]), None] for stage, r in zip(stages, rows)]  # [h, residual]
        pos = [positions[r] for r in rows]
        n = input_ids.shape[0]
        for i, attn in enumerate(self.shared.attn):
            qkv = [stage.layers[i].attention_input(st[0], st[1], p, self.shared.rotary_emb)
                   for stage, st, p in zip(stages, streams, pos)]
            q, k, v = (torch.empty(n, *x.shape[1:], dtype=x.dtype, device=x.device).index_copy_(0, rows[0], x)
                       .index_copy_(0, rows[1], y) for x, y in zip(qkv[0][:3], qkv[1][:3]))
            out = attn(q, k, v)
            for stage, st, r, part in zip(stages, streams, rows, qkv):
                st[0], st[1] = stage.layers[i].attention_output(out[r], part[3])
        hidden = streams[0][0].new_empty(n, self.out_width)
        for stage, st, r in zip(stages, streams, rows):
            hidden.index_copy_(0, r, stage.mark(stage.norm(st[0], st[1])[0]))
        return hidden

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Each row through the LM head of the stage that computed it, as the step's route says on the host:
        a step of one stage has only that stage's rows; in a mixed step the first call after the forward is
        the sampler's, one row per request (its last token). Any other call of a mixed step (prompt
        logprobs), and a step routed on the device (Model Runner V2), read the rows' marker column."""
        route, self.route = self.route, None
        if route is not None and route.name in ("full", "decoder"):
            self.route = route  # and so for every later call of this step
            stage = self.full if route.name == "full" else self.decoder
            return self.logits_processor(stage.lm_head, hidden_states[:, : stage.hidden])
        if route is not None and hidden_states.shape[0] == route.num_reqs:
            is_dec = torch.from_numpy(route.sampled_from_decoder()).to(hidden_states.device)
        else:
            is_dec = hidden_states[:, -1] > 0.5
            n_dec = int(is_dec.sum())
            if n_dec in (0, hidden_states.shape[0]):
                stage = self.decoder if n_dec else self.full
                return self.logits_processor(stage.lm_head, hidden_states[:, : stage.hidden])
        rows_d = is_dec.nonzero().squeeze(1)
        rows_f = (~is_dec).nonzero().squeeze(1)
        lf = self.logits_processor(self.full.lm_head, hidden_states[rows_f, : self.full.hidden])
        ld = self.logits_processor(self.decoder.lm_head, hidden_states[rows_d, : self.decoder.hidden])
        logits = lf.new_empty(hidden_states.shape[0], lf.shape[-1])
        logits[rows_f] = lf
        logits[rows_d] = ld
        return logits

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's AutoWeightsLoader over both stages (each loads its fused projections, `Stage.load_weights`); a tied
        LM head is its embedding, loaded once. A tensor that fits nowhere stops the load."""
        return AutoWeightsLoader(self).load_weights(weights, mapper=CHECKPOINT_NAMES)


def get_stats(model: nn.Module) -> dict:
    """For LLM.apply_model: the OverFill counters of the model in a worker (picklable by reference)."""
    return dict(model.stats)


def reset_stats(model: nn.Module) -> dict:
    before = dict(model.stats)
    for key in model.stats:
        model.stats[key] = 0
    return before
