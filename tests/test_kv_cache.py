import weakref

import pytest
import torch
from transformers import DynamicCache

from overfill import kv_cache
from overfill.kv_cache import CAPACITY_STEP, MIN_CAPACITY, GrowingCache, StaticCache, capacity_for
from tiny import tiny_model


def greedy_tokens(model, cache, ids, steps):
    tokens = []
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
    return torch.cat(tokens, 1), out.logits


def test_growing_cache_decodes_exactly_like_dynamic_cache_past_its_first_capacity():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 250, (2, 7))
    steps = MIN_CAPACITY + 20  # forces a regrowth
    ref_tokens, ref_logits = greedy_tokens(model, DynamicCache(), ids, steps)
    cache = GrowingCache()
    tokens, logits = greedy_tokens(model, cache, ids, steps)
    assert torch.equal(tokens, ref_tokens)
    # strided views may take another SDPA kernel path: equal tokens, logits equal to float rounding
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 7 + steps


def test_growing_cache_survives_crop_and_batch_repeat():
    model = tiny_model("llama")
    ids = torch.randint(3, 250, (1, 9))
    with torch.inference_mode():
        grown, plain = GrowingCache(), DynamicCache()
        for cache in (grown, plain):
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            cache.crop(-4)
            cache.batch_repeat_interleave(3)
        nxt = torch.randint(3, 250, (3, 2))
        a = model(input_ids=nxt, past_key_values=grown, use_cache=True).logits
        b = model(input_ids=nxt, past_key_values=plain, use_cache=True).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert grown.get_seq_length() == plain.get_seq_length() == 7


# ---------------------------------------------------------------- StaticCache and its buffer pool


@pytest.fixture
def pool(monkeypatch):
    """A pool of this test's own (the budget of the default one), so no other test's idle buffers are found."""
    fresh = kv_cache._BufferPool(kv_cache.IDLE_BUDGET_MB << 20)
    monkeypatch.setattr(kv_cache, "_POOL", fresh)
    return fresh


def test_static_cache_holds_what_an_eager_forward_writes_like_a_dynamic_cache(pool):
    model = tiny_model("qwen3")
    ids = torch.randint(3, 250, (2, 9))
    with torch.inference_mode():
        static, dynamic = StaticCache.for_model(model, 2, 20), DynamicCache()
        logits = [model(input_ids=ids, past_key_values=cache, use_cache=True).logits for cache in (static, dynamic)]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    assert static.capacity == CAPACITY_STEP and static.rows == 2 and static.key_buffers[0].shape[-2] == CAPACITY_STEP
    assert static.get_seq_length() == dynamic.get_seq_length() == 9
    for mine, theirs in zip(static.layers, dynamic.layers, strict=True):
        assert mine.keys.shape == theirs.keys.shape and mine.values.shape == theirs.values.shape  # the filled part only
        torch.testing.assert_close(mine.keys, theirs.keys)
        assert mine.keys.data_ptr() == static.key_buffers[static.layers.index(mine)].data_ptr()  # a view, not a copy


def test_static_cache_lengths_move_with_advance_crop_and_updates(pool):
    cache = StaticCache(layers=2, rows=1, kv_heads=1, head_dim=4, capacity=130, dtype=torch.float32, device="cpu")
    assert cache.capacity == 2 * CAPACITY_STEP and [capacity_for(n) for n in (1, 128, 129)] == [128, 128, 256]
    new = torch.ones(1, 1, 5, 4)
    for layer in cache.layers:
        layer.update(new, 2 * new)
    cache.advance(3)  # what the compiled step does after writing 3 columns itself
    assert cache.get_seq_length() == 8 and all(layer.keys.shape[-2] == layer.values.shape[-2] == 8 for layer in cache.layers)
    cache.crop(-6)
    assert cache.get_seq_length() == 2 and cache.layers[1].values.shape[-2] == 2
    assert torch.equal(cache.layers[1].values, 2 * torch.ones(1, 1, 2, 4))
    keys, _ = cache.layers[0].update(3 * torch.ones(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))  # appended after the kept 2
    assert keys.shape[-2] == 3 and torch.equal(keys[..., 2, :], 3 * torch.ones(1, 1, 4))
    with pytest.raises(RuntimeError, match="asked to hold"):
        cache.layers[0].update(torch.ones(1, 1, cache.capacity, 4), torch.ones(1, 1, cache.capacity, 4))


def test_the_step_mask_follows_the_loops_attention_mask(pool):
    cache = StaticCache(layers=1, rows=2, kv_heads=1, head_dim=4, capacity=10, dtype=torch.float32, device="cpu")
    loop_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])  # a left-padded row
    mask = cache.mask_from(loop_mask)
    assert mask.shape == (2, CAPACITY_STEP) and mask[:, :3].tolist() == loop_mask.bool().tolist() and not mask[:, 3:].any()
    grown = torch.cat([loop_mask, torch.tensor([[1], [0]])], dim=1)  # one more column: written in place
    assert cache.mask_from(grown) is mask and mask[:, 3].tolist() == [True, False] and not mask[:, 4:].any()
    shorter = torch.ones(2, 2, dtype=torch.long)  # any other width: rebuilt from the start
    assert cache.mask_from(shorter)[:, :2].all() and not mask[:, 2:].any()


def test_a_copy_and_repeated_candidates_hold_the_same_entries(pool):
    source = DynamicCache()
    keys, values = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    source.update(keys, values, 0)
    source.update(keys + 1, values + 1, 1)
    static = StaticCache.copy_of(source, 20)
    assert static.shape == (2, 2, 3, CAPACITY_STEP, 4) and static.get_seq_length() == 7
    assert torch.equal(static.layers[1].keys, keys + 1) and torch.equal(static.layers[0].values, values)
    before = static.key_buffers[0].data_ptr()
    static.batch_repeat_interleave(3)  # 3 candidates per row: rows 0, 0, 0, 1, 1, 1
    assert static.rows == 6 and static.key_buffers[0].shape[0] == 6 and static.get_seq_length() == 7
    assert torch.equal(static.layers[1].keys, (keys + 1).repeat_interleave(3, dim=0))
    assert static.key_buffers[0].data_ptr() != before


def test_a_dropped_caches_buffers_are_reused_for_the_same_shape_only(pool):
    model = tiny_model("llama")
    cache = StaticCache.for_model(model, 2, 40)
    with torch.inference_mode():
        model(input_ids=torch.randint(3, 250, (2, 6)), past_key_values=cache, use_cache=True)
    first = cache.key_buffers[0].data_ptr()
    assert StaticCache.for_model(model, 2, 40).key_buffers[0].data_ptr() != first  # still in use: another set
    del cache
    assert kv_cache.idle_cache_bytes() > 0
    other = StaticCache.for_model(model, 3, 40)  # another shape: not that set
    assert other.key_buffers[0].data_ptr() != first
    again = StaticCache.for_model(model, 2, 40)
    assert again.key_buffers[0].data_ptr() == first  # the same shape: the dropped cache's set
    assert again.get_seq_length() == 0 and again.layers[0].keys.shape[-2] == 0  # empty, whatever the buffers held


def test_idle_buffers_are_kept_only_within_the_byte_budget(pool):
    model = tiny_model("llama")
    one_set = kv_cache.buffer_bytes(StaticCache.for_model(model, 2, 40)._buffers())
    assert kv_cache.idle_cache_bytes() == one_set  # the default budget keeps the dropped set
    kv_cache.set_idle_budget(1.5 * one_set / (1 << 20))  # room for one idle set, not two
    a, b = StaticCache.for_model(model, 2, 40), StaticCache.for_model(model, 3, 40)
    kept = a.key_buffers[0].data_ptr()
    del b, a  # b goes back first, then a: the most recent (a's) is the one kept
    assert kv_cache.idle_cache_bytes() == one_set
    assert StaticCache.for_model(model, 2, 40).key_buffers[0].data_ptr() == kept
    kv_cache.set_idle_budget(0)  # a smaller budget frees what no longer fits at once
    assert kv_cache.idle_cache_bytes() == 0 and pool.idle == []


def test_with_no_budget_a_caches_buffers_are_freed_with_it(pool):
    kv_cache.set_idle_budget(0)
    cache = StaticCache.for_model(tiny_model("llama"), 2, 40)
    buffers = [weakref.ref(t) for t in (*cache.key_buffers, *cache.value_buffers, cache.mask)]
    del cache
    assert kv_cache.idle_cache_bytes() == 0 and all(ref() is None for ref in buffers)  # nothing holds them any more
