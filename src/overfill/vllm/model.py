"""OverFillForCausalLM: a full model and a width-pruned decoder in one vLLM model, one paged KV cache.

Per layer there is ONE vLLM `Attention` (one KV-cache slot per layer), fed by the full model's
q/k/v projections for prompt tokens and by the decoder's for generated tokens; its output goes
back through the matching o_proj. Everything else (norms, MLPs, embeddings, final norm, LM head)
exists twice, at the two widths. Both stages share the rotary embedding (same head_dim / rope).

Which stage a token uses: tracker.py (positions < prompt length of its request).

The hidden states returned to the model runner have width max(D_full, D_dec) + 1: a full-model
row is [norm_full(h), 0..., 0], a decoder row [norm_dec(h), 0..., 1]. The runner gathers the rows
it samples from (logits_indices, prompt-logprob rows, ...) and calls compute_logits, which reads the
last column to pick the LM head of each row: the first reply token comes from the full model's
head (its row is the last prompt token), every later token from the decoder's.

Weights: full model's names as in its HF checkpoint ("model.layers.0.self_attn.q_proj.weight",
"lm_head.weight"); decoder's the same with a "decoder." prefix. See export.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from overfill.vllm import tracker

# checkpoint sub-name -> (parameter sub-name, shard id) for vLLM's fused projections
STACKED = (
    (".self_attn.q_proj.", ".qkv_proj.", "q"),
    (".self_attn.k_proj.", ".qkv_proj.", "k"),
    (".self_attn.v_proj.", ".qkv_proj.", "v"),
    (".mlp.gate_proj.", ".mlp.gate_up_proj.", 0),
    (".mlp.up_proj.", ".mlp.gate_up_proj.", 1),
)


class StageLayer(nn.Module):
    """One transformer layer's weights of one stage; the attention kernel itself is shared."""

    def __init__(self, config, hidden: int, intermediate: int, eps: float, quant_config, prefix: str):
        super().__init__()
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = getattr(config, "attention_bias", False)
        self.input_layernorm = RMSNorm(hidden, eps=eps)
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=bias, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(heads * head_dim, hidden, bias=bias, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        self.post_attention_layernorm = RMSNorm(hidden, eps=eps)
        self.mlp = LlamaMLP(hidden, intermediate, config.hidden_act, quant_config=quant_config,
                            bias=getattr(config, "mlp_bias", False), prefix=f"{prefix}.mlp")


class Stage(nn.Module):
    """Embedding, layers, final norm and LM head of one model (full or decoder)."""

    def __init__(self, config, hidden: int, intermediate: int, eps: float, tie: bool, quant_config, prefix: str):
        super().__init__()
        self.hidden = hidden
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden, quant_config=quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            StageLayer(config, hidden, intermediate, eps, quant_config, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(hidden, eps=eps)
        self.lm_head = ParallelLMHead(config.vocab_size, hidden, quant_config=quant_config,
                                      prefix=f"{prefix}.lm_head")
        if tie:
            self.lm_head = self.lm_head.tie_weights(self.embed_tokens)


def _qkv_sizes(config) -> tuple[int, int]:
    tp = get_tensor_model_parallel_world_size()
    q = config.num_attention_heads // tp * config.head_dim
    kv = max(1, config.num_key_value_heads // tp) * config.head_dim
    return q, kv


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
        quant_config = vllm_config.quant_config
        if get_pp_group().world_size > 1:
            raise NotImplementedError("OverFill: pipeline parallelism is not supported")
        meta = getattr(config, "overfill", None)
        if not isinstance(meta, dict) or "decoder" not in meta:
            raise ValueError("config.json has no 'overfill' section: build the folder with overfill.vllm.export")
        dec = meta["decoder"]
        if not getattr(config, "head_dim", None):
            config.head_dim = config.hidden_size // config.num_attention_heads
        self.config = config
        self.uses_model_state = bool(getattr(vllm_config, "use_v2_model_runner", False))
        if not self.uses_model_state and not tracker.MIRROR.installed:
            raise RuntimeError("OverFill on vLLM's V1 model runner needs its batch tracker: pass "
                               f"logits_processors=['{tracker.TRACKER_FQCN}'] (CLI: --logits-processors "
                               f"{tracker.TRACKER_FQCN})")
        eps = config.rms_norm_eps
        self.full = Stage(config, config.hidden_size, config.intermediate_size, eps, _full_model_ties(vllm_config),
                          quant_config, maybe_prefix(prefix, "full"))
        self.decoder = Stage(config, dec["hidden_size"], dec["intermediate_size"], dec.get("rms_norm_eps") or eps,
                             bool(dec.get("tie_word_embeddings", False)), quant_config,
                             maybe_prefix(prefix, "decoder"))
        self.q_size, self.kv_size = _qkv_sizes(config)
        tp = get_tensor_model_parallel_world_size()
        self.rotary_emb = get_rope(config.head_dim, max_position=getattr(config, "max_position_embeddings", 8192),
                                   rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True)
        self.attn = nn.ModuleList(
            Attention(config.num_attention_heads // tp, config.head_dim, config.head_dim ** -0.5,
                      num_kv_heads=max(1, config.num_key_value_heads // tp), cache_config=vllm_config.cache_config,
                      quant_config=quant_config, prefix=maybe_prefix(prefix, f"model.layers.{i}.self_attn.attn"))
            for i in range(config.num_hidden_layers)
        )
        self.out_width = max(self.full.hidden, self.decoder.hidden) + 1
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))
        # Counters for tests: tokens run through each stage so far (this process).
        self.stats = {"full_tokens": 0, "decoder_tokens": 0, "steps": 0, "mixed_steps": 0}

    # ------------------------------------------------------------------ vLLM model interface

    def get_model_state_cls(self):  # Model Runner V2 hook (vllm/v1/worker/gpu/model_states/__init__.py)
        from overfill.vllm.model_state import OverFillModelState
        return OverFillModelState

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.full.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None,
                overfill_is_prompt: torch.Tensor | None = None, **_unused) -> torch.Tensor:
        if input_ids is None:
            raise NotImplementedError("OverFill: inputs_embeds (multimodal / prompt embeds) are not supported")
        is_prompt = overfill_is_prompt if overfill_is_prompt is not None else tracker.prompt_mask_from_context(positions)
        n = input_ids.shape[0]
        idx_f = is_prompt.nonzero().squeeze(1)
        n_f = idx_f.numel()
        if n_f == n:
            idx_f, idx_d = None, idx_f[:0]  # all full
        elif n_f == 0:
            idx_f, idx_d = idx_f, None  # all decoder
        else:
            idx_d = (~is_prompt).nonzero().squeeze(1)
        self.stats["steps"] += 1
        self.stats["full_tokens"] += n_f
        self.stats["decoder_tokens"] += n - n_f
        self.stats["mixed_steps"] += int(0 < n_f < n)
        return self._run(input_ids, positions, idx_f, idx_d)

    @staticmethod
    def _take(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return x if idx is None else x.index_select(0, idx)

    def _run(self, input_ids, positions, idx_f, idx_d) -> torch.Tensor:
        """idx_f / idx_d: token indices of each stage; None means "all tokens", an empty tensor "none"."""
        n = input_ids.shape[0]
        stages = [(self.full, idx_f), (self.decoder, idx_d)]
        active = [(s, idx) for s, idx in stages if idx is None or idx.numel() > 0]
        streams = [[s.embed_tokens(self._take(input_ids, idx)), None] for s, idx in active]  # [hidden, residual]
        qkv_width = self.q_size + 2 * self.kv_size
        for i, attn in enumerate(self.attn):
            parts = []
            for (stage, idx), st in zip(active, streams):
                layer = stage.layers[i]
                if st[1] is None:
                    st[1] = st[0]
                    x = layer.input_layernorm(st[0])
                else:
                    x, st[1] = layer.input_layernorm(st[0], st[1])
                parts.append(layer.qkv_proj(x)[0])
            if len(active) == 1:
                qkv = parts[0]
            else:
                qkv = parts[0].new_empty(n, qkv_width)
                for (_, idx), part in zip(active, parts):
                    qkv.index_copy_(0, idx, part)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q, k = self.rotary_emb(positions, q, k)
            out = attn(q, k, v)
            for (stage, idx), st in zip(active, streams):
                layer = stage.layers[i]
                h = layer.o_proj(out if len(active) == 1 else out.index_select(0, idx))[0]
                h, st[1] = layer.post_attention_layernorm(h, st[1])
                st[0] = layer.mlp(h)
        hidden = streams[0][0].new_zeros(n, self.out_width)
        for (stage, idx), st in zip(active, streams):
            normed, _ = stage.norm(st[0], st[1])
            if idx is None:
                hidden[:, : stage.hidden] = normed
                if stage is self.decoder:
                    hidden[:, -1] = 1
            else:
                block = normed.new_zeros(idx.numel(), self.out_width)
                block[:, : stage.hidden] = normed
                if stage is self.decoder:
                    block[:, -1] = 1
                hidden.index_copy_(0, idx, block)
        return hidden

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        is_dec = hidden_states[:, -1] > 0.5
        n_dec = int(is_dec.sum())
        if n_dec == 0:
            return self.logits_processor(self.full.lm_head, hidden_states[:, : self.full.hidden])
        if n_dec == hidden_states.shape[0]:
            return self.logits_processor(self.decoder.lm_head, hidden_states[:, : self.decoder.hidden])
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
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            stage = "decoder" if name.startswith("decoder.") else "full"
            hf_name = name[len("decoder."):] if stage == "decoder" else name
            if "rotary_emb.inv_freq" in hf_name:
                continue
            if hf_name.startswith("model."):
                target = f"{stage}.{hf_name[len('model.'):]}"
            elif hf_name.startswith("lm_head."):
                if getattr(self, stage).lm_head.weight is getattr(self, stage).embed_tokens.weight:
                    continue  # tied: the embedding carries it
                target = f"{stage}.{hf_name}"
            else:
                raise ValueError(f"OverFill: unexpected weight {name}")
            target = target.replace(".self_attn.o_proj.", ".o_proj.")
            for old, new, shard in STACKED:
                if old in target:
                    target = target.replace(old, new)
                    param = params[target]
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                param = params[target]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        return loaded


def get_stats(model: nn.Module) -> dict:
    """For LLM.apply_model: the OverFill counters of the model in a worker (picklable by reference)."""
    return dict(model.stats)


def reset_stats(model: nn.Module) -> dict:
    before = dict(model.stats)
    for key in model.stats:
        model.stats[key] = 0
    return before
