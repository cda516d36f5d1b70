import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from overfill import OverfillError
from overfill.fingerprint import fingerprint
from overfill.prune import PruneConfig, collect_scores, prune_model, save_pruned, target_widths
from overfill.tensors import left_pad, positions_from_mask
from tiny import KINDS, tiny_model, tiny_tokenizer, write_jsonl

SEQS = [[5, 9, 33, 70, 12, 8, 101], [44, 3, 17], [200, 201, 9, 9, 14, 60], [7, 7]]


def logits(model, ids, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits


@pytest.mark.parametrize("kind", KINDS)
def test_ratio_zero_reproduces_full_logits_exactly(kind):
    model, tok = tiny_model(kind), tiny_tokenizer()
    result = prune_model(model, tok, PruneConfig(ratio=0.0), progress=False)
    ids, mask = left_pad(SEQS, pad_id=0)
    assert result.record["actual"]["hidden_size"] == model.config.hidden_size
    torch.testing.assert_close(logits(result.model, ids, mask), logits(model, ids, mask), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_folder_reloads_and_writes_full_model_cache_shapes(kind, tmp_path):
    model, tok = tiny_model(kind), tiny_tokenizer()
    result = prune_model(model, tok, PruneConfig(ratio=0.5), progress=False)
    out = save_pruned(result, tok, tmp_path / "p")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    cfg, full = reloaded.config, model.config
    assert cfg.hidden_size < full.hidden_size and cfg.intermediate_size < full.intermediate_size
    assert cfg.num_hidden_layers == full.num_hidden_layers
    assert cfg.num_key_value_heads == full.num_key_value_heads
    # head_dim is the full model's: explicit in its config, or derived from the full (not the pruned) width
    full_head_dim = getattr(full, "head_dim", None) or full.hidden_size // full.num_attention_heads
    assert cfg.head_dim == full_head_dim
    assert reloaded.model.layers[0].self_attn.head_dim == full_head_dim
    if full.tie_word_embeddings:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    # the reloaded model computes what the in-memory pruned model computed
    ids = torch.tensor([SEQS[0]])
    torch.testing.assert_close(logits(reloaded, ids), logits(result.model, ids))
    # a cache written by the full model has exactly the shapes the pruned model writes
    with torch.no_grad():
        full_cache = model(input_ids=ids, use_cache=True).past_key_values
        pruned_cache = reloaded(input_ids=ids, use_cache=True).past_key_values
    assert len(full_cache.layers) == len(pruned_cache.layers) == full.num_hidden_layers
    for a, b in zip(full_cache.layers, pruned_cache.layers, strict=True):
        assert a.keys.shape == b.keys.shape == (1, full.num_key_value_heads, ids.shape[1], full_head_dim)
        assert a.values.shape == b.values.shape == a.keys.shape
    # and the pruned model can extend the full model's cache
    with torch.no_grad():
        out = reloaded(input_ids=torch.tensor([[4]]), past_key_values=full_cache, position_ids=torch.tensor([[ids.shape[1]]]))
    assert full_cache.get_seq_length() == ids.shape[1] + 1 and torch.isfinite(out.logits).all()
    record = json.loads((tmp_path / "p" / "pruning.json").read_text())
    assert record["kept"]["hidden"] == sorted(record["kept"]["hidden"])
    assert len(record["kept"]["mlp"]) == full.num_hidden_layers
    # the record names the model that was pruned, not the pruned result or any other model
    assert record["source_fingerprint"] == fingerprint(model) != fingerprint(result.model)


def test_importance_keeps_loud_channels_and_drops_dead_ones():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    loud, dead = [3, 17, 40], [5, 22]
    loud_mlp = [10, 50]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[loud] = 25.0
            layer.post_attention_layernorm.weight[loud] = 25.0
            layer.input_layernorm.weight[dead] = 0.0
            layer.post_attention_layernorm.weight[dead] = 0.0
            layer.mlp.up_proj.weight[loud_mlp] *= 30.0
            layer.mlp.up_proj.weight[7] = 0.0  # intermediate channel 7 is always zero
    result = prune_model(model, tok, PruneConfig(ratio=0.5), progress=False)
    kept_hidden = set(result.record["kept"]["hidden"])
    assert set(loud) <= kept_hidden and not set(dead) & kept_hidden
    for kept in result.record["kept"]["mlp"]:
        assert set(loud_mlp) <= set(kept) and 7 not in kept


def test_padding_does_not_change_scores():
    model = tiny_model("qwen2")
    batched = collect_scores(model, SEQS, pad_id=0, batch_size=4, progress=False)
    singles = collect_scores(model, SEQS, pad_id=0, batch_size=1, progress=False)
    torch.testing.assert_close(batched.hidden, singles.hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched.mlp, singles.mlp, rtol=1e-5, atol=1e-6)
    assert batched.tokens == singles.tokens == sum(map(len, SEQS))


def test_widths_follow_paper_and_llama_rounding():
    from transformers import LlamaConfig, Qwen2Config

    smol = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    w = target_widths(smol, PruneConfig(ratio=0.45))
    assert (w.hidden_requested, w.hidden, w.mlp) == (316, 315, 844)
    llama3b = LlamaConfig(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8, head_dim=128)
    w = target_widths(llama3b, PruneConfig(ratio=0.45))
    assert (w.hidden_requested, w.hidden, w.mlp_requested) == (1689, 1680, 4505)
    qwen = Qwen2Config(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8)
    w = target_widths(qwen, PruneConfig(ratio=0.45, multiple_of=64))
    assert (w.hidden, w.mlp) == (1664, 4480)
    w = target_widths(qwen, PruneConfig(hidden_size=1000, mlp_ratio=0.5))
    assert (w.hidden, w.mlp) == (1000, 4096)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratio=1.0), "must be in [0, 1)"),
        (dict(ratio=-0.1), "must be in [0, 1)"),
        (dict(hidden_ratio=1.5), "must be in [0, 1)"),
        (dict(mlp_size=0), "positive width"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(OverfillError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        PruneConfig(**kwargs)


def test_width_larger_than_model_is_refused():
    with pytest.raises(OverfillError, match="larger than the model's hidden size 48"):
        target_widths(tiny_model("llama").config, PruneConfig(hidden_size=64))


def test_calibration_file_formats_and_errors(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    rows = [
        {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"}]},
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"text": "plain text works too"},
    ]
    good = write_jsonl(tmp_path / "calib.jsonl", rows)
    result = prune_model(model, tok, PruneConfig(ratio=0.25, calib_data=str(good)), progress=False)
    assert result.record["calibration"]["sequences"] == 3
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(OverfillError, match="is empty"):
        prune_model(model, tok, PruneConfig(calib_data=str(empty)), progress=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n{\"unrelated\": 1}\n")
    with pytest.raises(OverfillError, match="no usable records"):
        prune_model(model, tok, PruneConfig(calib_data=str(broken)), progress=False)
