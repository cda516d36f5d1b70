"""One description of each supported architecture, where each weight lives, and the cache-compatibility check
(docs/design.md, "The method").

OverFill's decoder reads the full model's KV cache directly, so the two must agree on everything
that shapes, positions or windows a cache entry: layer count, KV heads, head_dim, the rotary
embedding and any sliding window.
Width pruning changes only the residual width D and the MLP width I, which is why it is the only
pruning that keeps caches compatible.

Every supported family has Llama's module layout (HF's modeling files: model.embed_tokens, layers of
self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj between two RMSNorms, model.norm, lm_head) and
reads head_dim, the rotary settings and tie_word_embeddings from its config alike. An `ArchSpec` says
where a family departs from that, and every consumer reads it: pruning (prune.py), the compiled decode
step (decode_step.py), the vLLM model (vllm/plugin/stages.py, which imports this module inside vLLM's
processes: keep it free of torch and transformers) and the plain vLLM export (vllm/export.py).
A new family is one entry in ARCHS and one tiny config (tests/tiny.py's CONFIGS, which every per-family
test runs over). SmolLM and SmolLM2 are Llamas (model_type "llama").
"""

from __future__ import annotations

from dataclasses import dataclass

from overfill.errors import OverfillError

# A bias field is True or False for every model of the family, or the name of the config flag that turns it on.
BiasRule = bool | str


@dataclass(frozen=True)
class ArchSpec:
    """One family as HF's modeling file builds it: what pruning, the compiled step and the vLLM model need to know."""

    model_type: str
    qkv_bias: BiasRule = False  # q/k/v projections (Qwen2: always)
    o_bias: BiasRule = False  # o_proj
    mlp_bias: BiasRule = False  # gate/up/down projections
    # RMSNorm over each head's q and k before rotary (Qwen3); over head_dim, so width pruning keeps it.
    qk_norm: bool = False
    # Whether some layers may attend to a window of recent positions only (config.sliding_window, per layer
    # where layer_types says so): the compiled step cannot run a window shorter than its cache.
    sliding_window: bool = False
    # The config class refuses hidden_size % num_attention_heads != 0 even with an explicit head_dim
    # (LlamaConfig in transformers 5.19 to 5.23): pruning rounds the hidden width to a multiple of the heads.
    hidden_multiple_of_heads: bool = False
    # vLLM's own model class derives head_dim as hidden_size / heads (vLLM 0.32's Qwen2), wrong once pruning
    # shrinks hidden_size: a decoder served alone goes to vLLM as a Llama with this family's biases.
    vllm_derives_head_dim: bool = False

    def layer(self, config) -> LayerTraits:
        """What this config's layers hold (its bias flags resolved)."""
        return LayerTraits(qkv_bias=_resolve(self.qkv_bias, config), o_bias=_resolve(self.o_bias, config),
                           mlp_bias=_resolve(self.mlp_bias, config), qk_norm=self.qk_norm)


@dataclass(frozen=True)
class LayerTraits:
    """One model's decoder layer as its family's spec and its config make it: the vLLM model builds its layers from this."""

    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool


def _resolve(rule: BiasRule, config) -> bool:
    return bool(getattr(config, rule, False)) if isinstance(rule, str) else rule


def _by_type(*specs: ArchSpec) -> dict[str, ArchSpec]:
    return {spec.model_type: spec for spec in specs}


ARCHS: dict[str, ArchSpec] = _by_type(
    ArchSpec("llama", qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias", hidden_multiple_of_heads=True),
    ArchSpec("qwen2", qkv_bias=True, sliding_window=True, vllm_derives_head_dim=True),
    ArchSpec("qwen3", qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=True, sliding_window=True),
    ArchSpec("mistral", sliding_window=True),
)

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


def layer_traits(config) -> LayerTraits:
    """What this model's decoder layers hold, from its family's spec (an unsupported family: arch_of's error)."""
    return arch_of(config).layer(config)


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
    spec = ARCHS.get(getattr(config, "model_type", None))
    if spec is not None and not spec.sliding_window:
        return None  # a family without windows (Llama): its layers see every position whatever the config holds
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
