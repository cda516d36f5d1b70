import torch
from transformers import DynamicCache

from overfill.kv_cache import MIN_CAPACITY, GrowingCache
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
