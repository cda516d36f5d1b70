"""One stage of the OverFill model on vLLM (the full model or the decoder): its layers' weights, the two
halves of a layer around the attention call both stages share, and the compiled module each stage is.

The families differ only in what their spec in overfill.arch says of a layer (`arch.layer_traits`: biases,
per-head q/k norms); sliding windows come per layer from `layer_types`, else from vLLM's cache config
(Mistral). model.py holds the two stages, routes each step and loads the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import maybe_prefix

from overfill.arch import LayerTraits, layer_traits


@dataclass(frozen=True)
class StageShape:
    """One stage's widths: the full model's, or the decoder's from config.json's "overfill" section."""

    hidden: int
    intermediate: int
    eps: float
    tie: bool


class StageLayer(nn.Module):
    """One transformer layer's weights of one stage, in two halves around the shared attention kernel."""

    def __init__(self, config, shape: StageShape, traits: LayerTraits, quant_config, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        heads, kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        q_size, kv_size = heads // tp * self.head_dim, max(1, kv_heads // tp) * self.head_dim
        self.split = [q_size, kv_size, kv_size]
        self.input_layernorm = RMSNorm(shape.hidden, eps=shape.eps)
        self.qkv_proj = QKVParallelLinear(shape.hidden, self.head_dim, heads, kv_heads, bias=traits.qkv_bias,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.qk_norm = traits.qk_norm
        if traits.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=shape.eps)
            self.k_norm = RMSNorm(self.head_dim, eps=shape.eps)
        self.o_proj = RowParallelLinear(heads * self.head_dim, shape.hidden, bias=traits.o_bias, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        self.post_attention_layernorm = RMSNorm(shape.hidden, eps=shape.eps)
        self.mlp = LlamaMLP(shape.hidden, shape.intermediate, config.hidden_act, quant_config=quant_config,
                            bias=traits.mlp_bias, prefix=f"{prefix}.mlp")

    def attention_input(self, h, residual, positions, rotary_emb):
        """[n, D] stream -> q [n, H*hd], k, v [n, KV*hd] with rotary applied, and the residual."""
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        q, k, v = self.qkv_proj(x)[0].split(self.split, dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
            k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        q, k = rotary_emb(positions, q, k)
        return q, k, v, residual

    def attention_output(self, out, residual):
        """Attention output [n, H*hd] -> the layer's output stream [n, D] and the residual."""
        h, residual = self.post_attention_layernorm(self.o_proj(out)[0], residual)
        return self.mlp(h), residual


class SharedAttention(nn.Module):
    """What both stages use: one Attention (one KV-cache slot) per layer and the rotary embedding."""

    def __init__(self, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        config = vllm_config.model_config.hf_config
        tp = get_tensor_model_parallel_world_size()
        self.rotary_emb = get_rope(config.head_dim, max_position=getattr(config, "max_position_embeddings", 8192),
                                   rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True)
        layer_types = getattr(config, "layer_types", None)
        self.attn = nn.ModuleList(
            Attention(config.num_attention_heads // tp, config.head_dim, config.head_dim ** -0.5,
                      num_kv_heads=max(1, config.num_key_value_heads // tp), cache_config=vllm_config.cache_config,
                      quant_config=vllm_config.quant_config,
                      # None falls back to the cache config's window (one window for all layers, e.g. Mistral)
                      per_layer_sliding_window=(config.sliding_window if layer_types
                                                and layer_types[i] == "sliding_attention" else None),
                      prefix=maybe_prefix(prefix, f"model.layers.{i}.self_attn.attn"))
            for i in range(config.num_hidden_layers)
        )


# checkpoint projection -> (the stage's fused parameter, shard), as vLLM's own Llama loads them
STACKED_PARAMS = ((".qkv_proj.", ".q_proj.", "q"), (".qkv_proj.", ".k_proj.", "k"), (".qkv_proj.", ".v_proj.", "v"),
                  (".gate_up_proj.", ".gate_proj.", 0), (".gate_up_proj.", ".up_proj.", 1))


class Stage(nn.Module):
    """Embedding, layers, final norm and LM head of one model (full or decoder)."""

    is_decoder = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", shape: StageShape, shared: SharedAttention,
                 out_width: int):
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.hidden, self.out_width = shape.hidden, out_width
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, shape.hidden, quant_config=quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        traits = layer_traits(config)  # an unsupported model_type stops here, naming the supported ones
        self.layers = nn.ModuleList(
            StageLayer(config, shape, traits, quant_config, f"{prefix}.layers.{i}") for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(shape.hidden, eps=shape.eps)
        self.lm_head = ParallelLMHead(config.vocab_size, shape.hidden, quant_config=quant_config, prefix=f"{prefix}.lm_head")
        if shape.tie:
            self.lm_head = self.lm_head.tie_weights(self.embed_tokens)
        self.__dict__["shared"] = shared  # not a submodule: the OverFill model owns it (once)

    def load_weights(self, weights) -> set[str]:
        """This stage's checkpoint tensors, named as the model's mapper leaves them ("layers.0.q_proj.weight"); the
        projections vLLM fuses go in as shards of their fused parameter (vLLM's stacked-parameter mapping)."""
        params, loaded = dict(self.named_parameters()), set()
        for name, tensor in weights:
            for fused, part, shard in STACKED_PARAMS:
                if part in name:
                    name = name.replace(part, fused)
                    params[name].weight_loader(params[name], tensor, shard)
                    break
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """All tokens through this stage: [N] -> marked hidden states [N, out_width]."""
        h, residual = self.embed_tokens(input_ids), None
        for layer, attn in zip(self.layers, self.shared.attn):
            q, k, v, residual = layer.attention_input(h, residual, positions, self.shared.rotary_emb)
            h, residual = layer.attention_output(attn(q, k, v), residual)
        normed, _ = self.norm(h, residual)
        return self.mark(normed)

    def mark(self, normed: torch.Tensor) -> torch.Tensor:
        """[n, D] -> [n, out_width]: zero-padded, last column 1 for decoder rows (compute_logits reads it)."""
        marked = nn.functional.pad(normed, (0, self.out_width - self.hidden))
        marked[:, -1] = float(self.is_decoder)
        return marked


# Both inputs are [num_tokens]: the one dimension that varies between steps.
STEP_DIMS = {"input_ids": 0, "positions": 0}
WARMUP_TOKENS = 8  # any size above 1 traces a graph for every size


@support_torch_compile(dynamic_arg_dims=STEP_DIMS)
class FullStage(Stage):
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.run(input_ids, positions)


@support_torch_compile(dynamic_arg_dims=STEP_DIMS)
class DecoderStage(Stage):
    is_decoder = True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.run(input_ids, positions)
