"""The generation loop on tiny random models (issue 3): parity with HF `generate`, batching, candidates,
stop rules, sampling, streaming. Token ids are compared, not only text."""

import copy
import functools
import math

import pytest
import torch
from transformers import DynamicCache

from overfill import OverfillError
from overfill.generation import GenerationConfig, encode_prompt, eos_ids_of, generate, generate_ids, stream
from overfill.modeling import MODES, OverFillModel
from overfill.prune import PruneConfig, prune_model
from overfill.tensors import left_pad
from tiny import KINDS, tiny_model, tiny_pruned, tiny_tokenizer

PROMPTS = ["hi", "What is the capital of France?", "Tell me a story about a dragon and a knight.", "2+2="]
EOS, PAD = 2, 0


@functools.cache
def _pruned_pair(kind: str, letters: bool):
    if not letters:
        return tiny_pruned(kind)  # shared with test_reference; pruned_model hands out copies
    full, tok = tiny_model(kind), tiny_tokenizer()
    letters_only(full, tok)
    decoder = prune_model(full, tok, PruneConfig(ratio=0.5), progress=False).model
    return full, decoder


def pruned_model(kind: str = "llama", letters: bool = False) -> OverFillModel:
    """A full model and a genuinely pruned (ratio 0.5) decoder; fresh copies, so tests may edit them."""
    full, decoder = _pruned_pair(kind, letters)
    model = OverFillModel(copy.deepcopy(full), copy.deepcopy(decoder), tiny_tokenizer())
    assert model.decoder.config.hidden_size < model.full.config.hidden_size
    return model


def letters_only(model, tok) -> None:
    """Make an untied model write only lowercase letters (readable text for stop-string tests)."""
    assert not model.config.tie_word_embeddings
    keep = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    keep[tok.convert_tokens_to_ids(list("abcdefghijklmnopqrstuvwxyz"))] = True
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0  # logit 0, below the best letter's


def until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("kind", KINDS)
def test_overfill_with_decoder_equal_to_full_matches_hf_generate(kind):
    full, tok = tiny_model(kind), tiny_tokenizer()
    model = OverFillModel(full, copy.deepcopy(full), tok)
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": [encode_prompt(tok, p) for p in PROMPTS]}, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # genuinely left-padded
    with torch.no_grad():
        hf = full.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    ours = generate(model, PROMPTS, GenerationConfig(mode="overfill", max_new_tokens=24))
    width = batch["input_ids"].shape[1]
    for row, reply in enumerate(ours):
        expected = until_eos(hf[row, width:].tolist())
        assert reply.token_ids == expected, f"row {row}"
    assert sum(len(r.token_ids) for r in ours) > 3 * len(PROMPTS)  # not a trivial all-EOS run


# ---------------------------------------------------------------- batching


@pytest.mark.parametrize("mode", MODES)
def test_batch_equals_each_row_alone(mode):
    model = pruned_model("llama")
    config = GenerationConfig(mode=mode, max_new_tokens=16)
    batch = generate(model, PROMPTS, config)
    for prompt, reply in zip(PROMPTS, batch, strict=True):
        alone = generate(model, prompt, config)[0]
        assert (reply.token_ids, reply.text, reply.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason)


def test_modes_use_different_models():
    model = pruned_model("llama")
    replies = {mode: generate(model, PROMPTS, GenerationConfig(mode=mode, max_new_tokens=8)) for mode in MODES}
    ids = {mode: [r.token_ids for r in rs] for mode, rs in replies.items()}
    # overfill and full share the first token (the full model's), overfill and pruned do not need to
    assert [r[0] for r in ids["overfill"]] == [r[0] for r in ids["full"]]
    assert ids["overfill"] != ids["full"] and ids["overfill"] != ids["pruned"]


def test_candidates_prefill_once_and_repeat_the_cache():
    model = pruned_model("llama")
    calls = []
    handle = model.full.register_forward_hook(lambda *_: calls.append(1))
    try:
        sampled = generate(model, PROMPTS[1], GenerationConfig(num_return_sequences=4, temperature=1.0, seed=3, max_new_tokens=12))
    finally:
        handle.remove()
    assert len(calls) == 1  # the prompt is prefilled by the full model exactly once
    assert len(sampled) == 4 and [r.sequence_index for r in sampled] == [0, 1, 2, 3]
    assert len({tuple(r.token_ids) for r in sampled}) == 4  # sampled candidates differ
    # greedy candidates from the repeated cache equal the single greedy reply, for every prompt of a batch
    greedy = generate(model, PROMPTS[:2], GenerationConfig(num_return_sequences=3, max_new_tokens=12))
    single = generate(model, PROMPTS[:2], GenerationConfig(max_new_tokens=12))
    assert [r.prompt_index for r in greedy] == [0, 0, 0, 1, 1, 1]
    for r in greedy:
        assert r.token_ids == single[r.prompt_index].token_ids


@pytest.mark.parametrize("mode", MODES)
def test_continuing_a_kept_cache_equals_prefilling_everything(mode):
    """What multi-turn chat relies on: prefill only the new tokens on top of a kept prefix cache."""
    model = pruned_model("llama")
    tok = model.tokenizer
    chat = [{"role": "user", "content": PROMPTS[2]}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": PROMPTS[1]}]
    ids = encode_prompt(tok, chat)
    keep = len(ids) // 2
    config = GenerationConfig(mode=mode, max_new_tokens=10)
    eos = eos_ids_of(tok, model.full)
    cache = DynamicCache()
    prefix = torch.tensor([ids[:keep]])
    next(generate_ids(model, prefix, torch.ones_like(prefix), config, eos_ids=eos, pad_id=PAD, cache=cache))
    assert cache.get_seq_length() == keep
    steps = generate_ids(model, torch.tensor([ids[keep:]]), torch.ones(1, len(ids), dtype=torch.long), config,
                         eos_ids=eos, pad_id=PAD, cache=cache, past_lengths=torch.tensor([keep]))
    continued = [int(s.tokens[0]) for s in steps]
    fresh = generate(model, chat, config)[0]
    assert continued == fresh.token_ids


# ---------------------------------------------------------------- stopping


def test_stop_string_cuts_text_and_ends_the_row():
    model = pruned_model("qwen2", letters=True)
    free = generate(model, PROMPTS[1], GenerationConfig(max_new_tokens=40))[0]
    assert free.finish_reason == "length" and free.text.isalpha() and len(free.text) == 40
    for start, size in [(6, 3), (4, 20)]:  # 20 characters spans more tokens than a short tail window
        stop = free.text[start : start + size]
        cut = free.text.index(stop)
        reply = generate(model, PROMPTS[1], GenerationConfig(max_new_tokens=40, stop=(stop, "never")))[0]
        assert reply.text == free.text[:cut]
        assert reply.finish_reason == "stop"
        # generation ended on the token that completed the stop string
        assert reply.token_ids == free.token_ids[: cut + len(stop)]


def test_stop_given_as_one_string():
    assert GenerationConfig(stop="###").stop == ("###",)
    assert GenerationConfig(stop=["a", "bc"]).stop == ("a", "bc")
    with pytest.raises(OverfillError, match="empty stop string"):
        GenerationConfig(stop=("",))


def test_eos_ends_rows_independently():
    model = pruned_model("qwen2")
    config = GenerationConfig(mode="overfill", max_new_tokens=12)
    free = [r.token_ids for r in generate(model, PROMPTS, config)]
    assert all(EOS not in ids for ids in free)
    # Swap the output rows of EOS and a token that row 0 first writes at a decoder step (and no other
    # row writes): row 0 now ends there with EOS, the other rows are untouched (lm_head is untied,
    # so the models' inputs do not change).
    step = next(i for i, t in enumerate(free[0]) if i >= 2 and t not in free[0][:i] and all(t not in r for r in free[1:]))
    token = free[0][step]
    for m in (model.full, model.decoder):
        with torch.no_grad():
            m.lm_head.weight[[EOS, token]] = m.lm_head.weight[[token, EOS]]
    replies = generate(model, PROMPTS, config)
    assert replies[0].token_ids == free[0][:step] + [EOS] and replies[0].finish_reason == "eos"
    for reply, ids in zip(replies[1:], free[1:], strict=True):
        assert reply.token_ids == ids and reply.finish_reason == "length"
    # at the token level, the finished row holds pad while the others go on
    tok = model.tokenizer
    ids, mask = left_pad([encode_prompt(tok, p) for p in PROMPTS], PAD)
    steps = list(generate_ids(model, ids, mask, config, eos_ids=eos_ids_of(tok, model.full), pad_id=PAD))
    tokens = torch.stack([s.tokens for s in steps], 1)  # [B, steps]
    assert len(steps) == 12 and tokens[0, step] == EOS and (tokens[0, step + 1 :] == PAD).all()
    assert steps[step].finished.tolist() == [True, False, False, False]
    assert tokens[1:].tolist() == free[1:]


def test_all_rows_finished_ends_the_loop():
    model = pruned_model("qwen2")
    first = [r.token_ids[0] for r in generate(model, PROMPTS, GenerationConfig(max_new_tokens=1))]
    # Every row's first token becomes an end token (models may name several in their generation config).
    model.full.generation_config.eos_token_id = [EOS, *first]
    calls = []
    handle = model.decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        replies = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10))
    finally:
        handle.remove()
    assert [r.token_ids for r in replies] == [[t] for t in first]
    assert all(r.text == "" and r.finish_reason == "eos" for r in replies)
    assert calls == []  # the decoder never ran: nothing was left to decode


# ---------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible():
    model = pruned_model("llama")

    def sample(seed, **kw):
        return [r.token_ids for r in generate(model, PROMPTS, GenerationConfig(temperature=1.0, seed=seed, max_new_tokens=16, **kw))]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(5, top_k=5, top_p=0.9) == sample(5, top_k=5, top_p=0.9)
    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=16))
    assert sample(1) != [r.token_ids for r in greedy]
    # top_k=1 is greedy whatever the seed
    assert sample(7, top_k=1) == [r.token_ids for r in greedy]


def test_generation_leaves_the_global_rng_alone():
    model = pruned_model("llama")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate(model, PROMPTS[0], GenerationConfig(max_new_tokens=2))
    generate(model, PROMPTS[0], GenerationConfig(max_new_tokens=2, temperature=1.0))
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("mode", MODES)
def test_stream_joins_to_the_generated_text(mode):
    model = pruned_model("llama")  # random bytes: partial UTF-8 characters must be held back, not lost
    config = GenerationConfig(mode=mode, max_new_tokens=30)
    pieces = list(stream(model, PROMPTS[2], config))
    reply = generate(model, PROMPTS[2], config)[0]
    assert len(pieces) > 1 and "".join(pieces) == reply.text


def test_stream_with_stop_string_joins_to_the_generated_text():
    model = pruned_model("qwen2", letters=True)
    free = generate(model, PROMPTS[1], GenerationConfig(max_new_tokens=40))[0].text
    for stop in (free[10:13], free[5:25]):
        config = GenerationConfig(max_new_tokens=40, stop=(stop,))
        pieces = list(stream(model, PROMPTS[1], config))
        assert "".join(pieces) == generate(model, PROMPTS[1], config)[0].text == free[: free.index(stop)]
        assert all(stop not in "".join(pieces[: i + 1]) for i in range(len(pieces)))


def test_reply_reports_timings(monkeypatch):
    """prefill_s is the prefill model's pass (with token 1), decode_s the decode model's steps: on an injected
    clock that each model's forward moves on by its own amount, so the attribution is exact."""
    from types import SimpleNamespace

    from overfill import generation as generation_module

    model = pruned_model("llama")
    now = [0.0]
    monkeypatch.setattr(generation_module, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def costs(seconds):
        def hook(*_):
            now[0] += seconds
        return hook

    model.full.register_forward_hook(costs(1.0))
    model.decoder.register_forward_hook(costs(0.25))
    reply = generate(model, PROMPTS[1], GenerationConfig(max_new_tokens=8))[0]
    assert reply.new_tokens == 8
    # one prefill by the full model; tokens 2..8 are 7 decoder steps
    assert (reply.prefill_s, reply.decode_s, reply.decode_tokens_per_s) == (1.0, 7 * 0.25, 4.0)
    assert {k: reply.as_dict()[k] for k in ("new_tokens", "prefill_s", "decode_s", "decode_tokens_per_s")} == {
        "new_tokens": 8, "prefill_s": 1.0, "decode_s": 1.75, "decode_tokens_per_s": 4.0}


@pytest.mark.parametrize("bad", [dict(temperature=math.nan), dict(temperature=math.inf), dict(top_k=math.nan)])
def test_sampling_numbers_are_checked_for_their_range_not_for_being_negative(bad):
    with pytest.raises(OverfillError, match="sampling needs temperature >= 0"):
        GenerationConfig(**bad)
