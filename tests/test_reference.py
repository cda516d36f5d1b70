"""OverFill generation with a genuinely pruned decoder, checked against a reference built from plain
Hugging Face calls only (no overfill prefill/decode/generation code in the reference).

The reference: the prefill model reads the prompt in one forward with use_cache=True (a DynamicCache)
and the argmax of its last logits is y1; then the decode model is called on that same cache one token
at a time, `model(input_ids, attention_mask, position_ids, past_key_values=cache, use_cache=True)`,
greedy. overfill's `generate_ids` must produce the same tokens, row for row, in a left-padded batch.
"""

import copy

import pytest
import torch
from transformers import DynamicCache

from overfill.generation import GenerationConfig, generate_ids
from overfill.modeling import OverFillModel
from overfill.prune import PruneConfig, prune_model
from tiny import KINDS, tiny_model, tiny_pruned, tiny_tokenizer

EOS, PAD = 2, 0
NEW_TOKENS = 12
# Byte-token prompts of different lengths (ids 3..258 are bytes in the tiny tokenizer).
_g = torch.Generator().manual_seed(1234)
PROMPTS = [torch.randint(3, 259, (n,), generator=_g).tolist() for n in (1, 4, 9, 17)]


def _pair(kind: str):
    return tiny_pruned(kind)  # (full model, decoder pruned from it at ratio 0.5), shared and never edited


def until_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


@torch.no_grad()
def reference_alone(prefill_model, decode_model, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    """One prompt, no padding: positions 0..T-1, then T, T+1, ... for the reply tokens."""
    ids = torch.tensor([prompt])
    out = prefill_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == len(prompt)
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < n and tokens[-1] != EOS:
        seen = len(prompt) + len(tokens)  # tokens in the cache after this step
        out = decode_model(input_ids=torch.tensor([[tokens[-1]]]), attention_mask=torch.ones(1, seen, dtype=torch.long),
                           position_ids=torch.tensor([[seen - 1]]), past_key_values=cache, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    assert cache.get_seq_length() == len(prompt) + len(tokens) - 1
    return tokens


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.no_grad()
def reference_batch(prefill_model, decode_model, prompts: list[list[int]], n: int = NEW_TOKENS) -> list[list[int]]:
    """The same prompts left-padded in one batch: positions count real tokens only, pads are masked out."""
    ids, mask = left_padded(prompts)
    lengths = mask.sum(-1)  # [B]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = prefill_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, DynamicCache)
    token = out.logits[:, -1].argmax(-1)
    tokens = [token]
    for step in range(1, n):
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
        out = decode_model(input_ids=token[:, None], attention_mask=mask, position_ids=(lengths + step - 1)[:, None],
                           past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1)
        tokens.append(token)
    return [until_eos(row) for row in torch.stack(tokens, 1).tolist()]


def overfill_tokens(kind: str, mode: str, prompts: list[list[int]]) -> list[list[int]]:
    """What overfill's generation loop writes, greedy, for the prompts as one left-padded batch."""
    full, decoder = _pair(kind)
    model = OverFillModel(full, decoder, tiny_tokenizer())
    ids, mask = left_padded(prompts)
    steps = list(generate_ids(model, ids, mask, GenerationConfig(mode=mode, max_new_tokens=NEW_TOKENS),
                              eos_ids={EOS}, pad_id=PAD))
    rows = torch.stack([s.tokens for s in steps], 1).tolist()
    for row in rows:  # a finished row only holds pad after its end token
        if EOS in row:
            assert set(row[row.index(EOS) + 1 :]) <= {PAD}
    return [until_eos(row) for row in rows]


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_decoder_generation_matches_plain_hf_reference(kind):
    full, decoder = _pair(kind)
    # a genuinely pruned decoder: narrower, yet the same cache geometry
    assert decoder.config.hidden_size < full.config.hidden_size
    assert decoder.config.intermediate_size < full.config.intermediate_size
    assert decoder.config.num_hidden_layers == full.config.num_hidden_layers

    alone = [reference_alone(full, decoder, p) for p in PROMPTS]
    batch = overfill_tokens(kind, "overfill", PROMPTS)
    for row, (ours, expected) in enumerate(zip(batch, alone, strict=True)):
        assert ours == expected, f"{kind} row {row} (prompt length {len(PROMPTS[row])})"
    assert reference_batch(full, decoder, PROMPTS) == alone  # the reference agrees with itself under padding
    for prompt, expected in zip(PROMPTS, alone, strict=True):  # and each prompt on its own
        assert overfill_tokens(kind, "overfill", [prompt]) == [expected]

    # The check can tell the models apart: the first token is the full model's, the rest the decoder's,
    # and neither model alone writes these replies.
    full_only = [reference_alone(full, full, p) for p in PROMPTS]
    pruned_only = [reference_alone(decoder, decoder, p) for p in PROMPTS]
    assert [r[0] for r in alone] == [r[0] for r in full_only]
    assert alone != full_only and alone != pruned_only
    assert sum(map(len, alone)) > 2 * len(PROMPTS)  # not a trivial run of end tokens


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_mode_matches_plain_hf_reference(kind):
    """The baseline: the decoder prefills and decodes on its own (mode full is checked against HF generate
    in test_generation)."""
    _, decoder = _pair(kind)
    expected = [reference_alone(decoder, decoder, p) for p in PROMPTS]
    assert overfill_tokens(kind, "pruned", PROMPTS) == expected


def test_mistral_sliding_window_shorter_than_the_sequence_matches_plain_hf_reference():
    """Real Mistral configs attend through a sliding window; prompts plus replies here run past it."""
    full = tiny_model("mistral", sliding_window=4)
    decoder = prune_model(full, tiny_tokenizer(), PruneConfig(ratio=0.5), progress=False).model
    assert decoder.config.sliding_window == 4 and decoder.config.hidden_size < full.config.hidden_size
    model = OverFillModel(full, decoder, tiny_tokenizer())
    ids, mask = left_padded(PROMPTS)
    steps = list(generate_ids(model, ids, mask, GenerationConfig(mode="overfill", max_new_tokens=NEW_TOKENS),
                              eos_ids={EOS}, pad_id=PAD))
    ours = [until_eos(row) for row in torch.stack([s.tokens for s in steps], 1).tolist()]
    expected = [reference_alone(full, decoder, p) for p in PROMPTS]
    assert ours == expected
    # the window is in force: the same weights attending to everything write other replies
    unwindowed = [copy.deepcopy(m) for m in (full, decoder)]
    for m in unwindowed:
        m.config.sliding_window = None
    assert [reference_alone(*unwindowed, p) for p in PROMPTS] != expected
