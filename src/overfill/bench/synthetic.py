"""Models of a real model's shape built from a config with random weights, and a byte-level tokenizer: what the
bench's paper-scale and memory runs use without downloading anything (a step's time and memory depend on shapes
and bytes, not on weight values). The tests' tiny models are the tests' own (tests/tiny.py).

- `paper_pair(...)`: a Llama-3.2-3B-shaped full model and its 0.45 decoder (paper §4.1), for latency only:
  a decode step's time depends on the shapes and bytes it reads, not on the weight values;
- `byte_tokenizer()`: one token per byte plus three specials and a chat template (vocabulary 259).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
VOCAB = len(SPECIALS) + 256


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0-2 are specials (pad, start and end of turn), then one token per byte (vocab 259)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), pre_tokenizers.Split("", "isolated")]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Llama-3.2-3B-Instruct's shape (its config.json) and the paper's 0.45 decoder of it: hidden 3072 -> 1689 and MLP
# 8192 -> 4505 as the paper states; LlamaConfig wants the hidden width a multiple of the 24 heads, so 1680 here
# (what `overfill prune --ratio 0.45` makes of it, arch.py).
LLAMA_3B = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
                tie_word_embeddings=True, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192},
                bos_token_id=128000, eos_token_id=128009)
DECODER_045 = dict(hidden_size=1680, intermediate_size=4505)
# Llama-3.2-1B-Instruct's shape (its config.json): the quick pair of the memory check, with a 0.45 decoder.
LLAMA_1B = dict(LLAMA_3B, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, head_dim=64)


def config_model(fields: dict, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """A Llama of these config fields with random weights, built in `dtype` on `device`, in eval mode."""
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(LlamaConfig(**fields), dtype=dtype).eval()


def paper_pair(dtype: torch.dtype, device: torch.device, *, scale: dict | None = None):
    """(full, decoder): Llama-3.2-3B-shaped with random weights and its 0.45-pruned shape, built on `device`.

    `scale` overrides config fields of both (e.g. a few layers and narrow widths: the GPU check's small
    preset), the decoder keeping the same ratio of widths.
    """
    full_config = dict(LLAMA_3B, **(scale or {}))
    decoder_config = dict(full_config, **scaled_widths(DECODER_045, full_config))

    return config_model(full_config, dtype, device), config_model(decoder_config, dtype, device)


def scaled_widths(decoder: dict, full: dict) -> dict:
    """The decoder's widths for a full model of other widths: the paper pair's ratios, the hidden width a multiple of the heads."""
    heads = full["num_attention_heads"]
    hidden = max(heads, round(full["hidden_size"] * decoder["hidden_size"] / LLAMA_3B["hidden_size"] / heads) * heads)
    mlp = max(1, round(full["intermediate_size"] * decoder["intermediate_size"] / LLAMA_3B["intermediate_size"]))
    return {"hidden_size": hidden, "intermediate_size": mlp}
