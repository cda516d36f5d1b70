"""Tiny randomly initialised models and a tiny tokenizer for the tests (no downloads).

`CONFIGS` holds one config per family of overfill.arch.ARCHS (test_arch checks it): a new family adds its tiny
config here. The tokenizer is the bench's byte tokenizer (overfill.bench.synthetic).
"""

from __future__ import annotations

import functools
import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from overfill.bench.synthetic import VOCAB  # noqa: F401 - the tests import it from here
from overfill.bench.synthetic import byte_tokenizer as tiny_tokenizer

_IDS = dict(pad_token_id=0, eos_token_id=2, bos_token_id=1)
CONFIGS = {
    # Any field can be overridden, e.g. head_dim=32 (and a hidden size to match) for vLLM's CPU attention.
    "llama": lambda **kw: LlamaConfig(**{
        **dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=12, tie_word_embeddings=True, **_IDS),
        **kw,
    }),
    "qwen2": lambda **kw: Qwen2Config(**{
        **dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=False, **_IDS),
        **kw,
    }),
    "qwen3": lambda **kw: Qwen3Config(**{
        **dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, **_IDS),
        **kw,
    }),
    # head_dim left to be derived (hidden_size / heads = 10), as in real Mistral configs: pruning must pin it.
    # No sliding window by default, so every position sees the whole prompt and results are exact.
    "mistral": lambda **kw: MistralConfig(**{
        **dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None, **_IDS),
        **kw,
    }),
}
KINDS = tuple(CONFIGS)


def tiny_model(kind: str = "llama", seed: int = 0, **config_kwargs):
    """A tiny float32 model of `kind` on the CPU, in eval mode; the same weights for the same seed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](**config_kwargs), dtype=torch.float32)
    # Random init gives near-identical tiny weights; widen them so outputs differ clearly per channel.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)
    return model.eval()



@functools.cache
def tiny_pruned(kind: str = "llama"):
    """(full model, decoder pruned from it at ratio 0.5), built once per session: callers must not edit them."""
    from overfill.prune import PruneConfig, prune_model

    full = tiny_model(kind)
    return full, prune_model(full, tiny_tokenizer(), PruneConfig(ratio=0.5), progress=False).model


def save_tiny(folder, kind: str = "llama", seed: int = 0):
    model, tok = tiny_model(kind, seed), tiny_tokenizer()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
