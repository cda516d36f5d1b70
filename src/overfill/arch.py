"""Where each weight lives, per supported architecture, and the cache-compatibility check (docs/design.md, "The method").

OverFill's decoder reads the full model's KV cache directly, so the two must agree on everything
that shapes, positions or windows a cache entry: layer count, KV heads, head_dim, the rotary
embedding and any sliding window.
Width pruning changes only the residual width D and the MLP width I, which is why it is the only
pruning that keeps caches compatible.

All supported families share Llama's module layout; they differ in biases (Qwen2 q/k/v), per-head
q/k norms (Qwen3, over head_dim, so untouched by width pruning) and in whether the config class
insists that hidden_size be a multiple of the head count (Llama, in transformers 5.19 to 5.23).
"""

from __future__ import annotations

from dataclasses import dataclass

from overfill.errors import OverfillError


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    # LlamaConfig refuses hidden_size % num_attention_heads != 0 even with an explicit head_dim.
    hidden_multiple_of_heads: bool


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", hidden_multiple_of_heads=True),
    "qwen2": ArchSpec("qwen2", hidden_multiple_of_heads=False),
    "qwen3": ArchSpec("qwen3", hidden_multiple_of_heads=False),
    "mistral": ArchSpec("mistral", hidden_multiple_of_heads=False),
}

# State-dict key suffixes inside each decoder layer, grouped by how width pruning slices them.
# [out, in] is nn.Linear's weight layout.
HIDDEN_VECTORS = ("input_layernorm.weight", "post_attention_layernorm.weight")  # [D]
HIDDEN_INPUT_COLUMNS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")  # [*, D]
HIDDEN_OUTPUT_ROWS = ("self_attn.o_proj.weight", "self_attn.o_proj.bias")  # [D, *] / [D]
MLP_IN = ("mlp.gate_proj.weight", "mlp.up_proj.weight")  # [I, D]
MLP_IN_BIAS = ("mlp.gate_proj.bias", "mlp.up_proj.bias")  # [I]
MLP_OUT = "mlp.down_proj.weight"  # [D, I]
MLP_OUT_BIAS = "mlp.down_proj.bias"  # [D]
EMBEDDING = "model.embed_tokens.weight"  # [V, D]
FINAL_NORM = "model.norm.weight"  # [D]
LM_HEAD = "lm_head.weight"  # [V, D]


def arch_of(config) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise OverfillError(
            f"unsupported architecture '{model_type}': overfill supports {', '.join(sorted(ARCHS))} "
            "(decoder-only models with Llama's layout); pick a model of one of those families"
        )
    return ARCHS[model_type]


def head_dim_of(config) -> int:
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def kv_heads_of(config) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def rope_of(config) -> dict:
    """The rotary settings, wherever this config keeps them (5.x: `rope_parameters`)."""
    rope = getattr(config, "rope_parameters", None)
    if rope is None:
        rope = {"rope_theta": getattr(config, "rope_theta", None), **(getattr(config, "rope_scaling", None) or {})}
    return dict(rope)


def sliding_window_of(config) -> int | None:
    """The attention window some layers use (Mistral, Qwen2/3 with use_sliding_window), or None when every layer sees all."""
    window = getattr(config, "sliding_window", None)
    if window is None or not getattr(config, "use_sliding_window", True):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def cache_signature(config) -> dict:
    """Everything that must match for one model to read another's KV cache and tokens."""
    return {
        "model_type": getattr(config, "model_type", None),
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": kv_heads_of(config),
        "head_dim": head_dim_of(config),
        "rope_parameters": rope_of(config),
        # Which cached positions a layer attends to (Mistral, Qwen2): the two must agree on it too.
        "sliding_window": getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None,
        "vocab_size": config.vocab_size,
    }


def check_compatible(full_config, decoder_config) -> None:
    """Refuse a model pair whose caches or vocabularies differ, naming the first differing field."""
    arch_of(full_config)
    arch_of(decoder_config)
    full, dec = cache_signature(full_config), cache_signature(decoder_config)
    for field in full:
        if full[field] != dec[field]:
            raise OverfillError(
                f"the decoder is not cache-compatible with the full model: {field} is {dec[field]} in the decoder "
                f"but {full[field]} in the full model; prune the decoder from this full model with `overfill prune`"
            )
