"""The compiled decode step (decode_step.py) on its static KV cache: token for token what the eager loop makes.

Most tests here check the loop around the step (padding, sampling, stop strings, streaming,
candidates, refresh, chat) with the step's graph captured by torch.compile and run by PyTorch's
own kernels (`captured`: seconds, no C++ build per shape); `test_inductor_step_equals_eager` and
the slow tests compile it with inductor, as every command does.
"""

import copy
import warnings

import pytest
import torch
from transformers import DynamicCache

from overfill import decode_step, step_weights
from overfill.chat import ChatSession
from overfill.decode_step import compile_seconds
from overfill.devices import decide_compile
from overfill.errors import OverfillWarning
from overfill.generation import GenerationConfig, encode_prompt, generate, stream
from overfill.kv_cache import CAPACITY_STEP, StaticCache, capacity_for
from overfill.modeling import MODES, OverFillModel, prefill
from overfill.tensors import left_pad
from test_generation import PROMPTS, pruned_model
from tiny import KINDS, tiny_model, tiny_tokenizer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def captured(monkeypatch):
    monkeypatch.setattr(decode_step, "BACKEND", "aot_eager")


def replies(model, prompts, **settings):
    return [r.token_ids for r in generate(model, prompts, GenerationConfig(**settings))]


def same_both_ways(model, prompts=PROMPTS, **settings):
    """Eager and compiled replies, asserted equal token for token (and non-trivial)."""
    eager = replies(model, prompts, compile=False, **settings)
    compiled = replies(model, prompts, compile=True, **settings)
    assert compiled == eager
    assert sum(map(len, eager)) > 2 * len(eager)
    return compiled


# ---------------------------------------------------------------- parity with the eager loop


@pytest.mark.parametrize("device", DEVICES)
def test_inductor_step_equals_eager(device):
    """The real thing (inductor, CUDA graphs on a GPU): a left-padded batch, every mode, then other prompts
    of other lengths reuse the compiled step."""
    model = pruned_model("llama").to(device)
    for mode in MODES:
        same_both_ways(model, mode=mode, max_new_tokens=16)
    compiled = {**compile_seconds(model.full), **compile_seconds(model.decoder)}
    assert [key.split()[-1] for key in compiled] == ["4x128"]  # one batch shape, one cache capacity
    shorter = [p[: len(p) // 2 + 1] for p in PROMPTS]  # other lengths, same batch and cache capacity
    same_both_ways(model, shorter, max_new_tokens=16)
    assert {**compile_seconds(model.full), **compile_seconds(model.decoder)} == compiled  # nothing compiled again


@pytest.mark.parametrize("kind", KINDS)
def test_captured_step_equals_eager_for_every_architecture(kind, captured):
    """Llama, Qwen2 (q/k/v biases), Qwen3 (q/k norms), Mistral: the step's own arithmetic, every mode."""
    model = pruned_model(kind)
    for mode in MODES:
        same_both_ways(model, mode=mode, max_new_tokens=12)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("qwen2", "qwen3", "mistral"))
def test_inductor_step_equals_eager_for_the_other_architectures(kind):
    """Compiled with inductor (a C++ build per model: slow on two cores)."""
    same_both_ways(pruned_model(kind), mode="overfill", max_new_tokens=16)


# ---------------------------------------------------------------- every feature of the loop


def test_padded_batch_equals_each_row_alone(captured):
    model = pruned_model("llama")
    batch = same_both_ways(model, max_new_tokens=12)
    for prompt, ids in zip(PROMPTS, batch, strict=True):
        assert replies(model, prompt, compile=True, max_new_tokens=12) == [ids]


def test_seeded_sampling_matches_eager(captured):
    model = pruned_model("llama")
    sampled = same_both_ways(model, temperature=1.0, top_k=20, seed=3, max_new_tokens=12)
    assert sampled != replies(model, PROMPTS, compile=True, max_new_tokens=12)  # sampled, not greedy


def test_candidates_share_one_prefill(captured):
    model = pruned_model("llama")
    greedy = same_both_ways(model, PROMPTS[:2], num_return_sequences=3, max_new_tokens=10)
    single = replies(model, PROMPTS[:2], max_new_tokens=10)
    assert greedy == [single[0]] * 3 + [single[1]] * 3
    sampled = same_both_ways(model, PROMPTS[1], num_return_sequences=4, temperature=1.0, seed=2, max_new_tokens=10)
    assert len({tuple(ids) for ids in sampled}) == 4


def test_stop_strings_and_streaming(captured):
    model = pruned_model("qwen2", letters=True)
    free = generate(model, PROMPTS[1], GenerationConfig(max_new_tokens=40))[0].text
    stop = free[8:12]
    config = GenerationConfig(max_new_tokens=40, stop=(stop,), compile=True)
    reply = generate(model, PROMPTS[1], config)[0]
    assert reply.text == free[: free.index(stop)] and reply.finish_reason == "stop"
    assert "".join(stream(model, PROMPTS[1], config)) == reply.text


def test_prefill_refresh(captured):
    model = pruned_model("llama")
    same_both_ways(model, mode="overfill", refresh_every=4, max_new_tokens=14)


def test_chat_turns(captured):
    model = pruned_model("llama")

    def chat(compile):
        session = ChatSession(model, GenerationConfig(max_new_tokens=8, compile=compile))
        return [session.say(text) for text in ("hello", "and again", "once more")], session

    (eager, _), (compiled, session) = chat(False), chat(True)
    assert compiled == eager
    assert session.cache.get_seq_length() == len(session.cached_ids)  # the kept cache: the context's KV alone


def test_int8_and_bfloat16_decoders(captured):
    """Decoders in another dtype than the full model's cache: int8 layers are called as they are, bfloat16 reads
    the float32 cache cast."""
    from overfill.precision import set_decoder_dtype

    for dtype in ("int8", "bfloat16"):
        model = pruned_model("llama")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OverfillWarning)
            set_decoder_dtype(model.decoder, dtype)
        eager = replies(model, PROMPTS, compile=False, max_new_tokens=10)
        compiled = replies(model, PROMPTS, compile=True, max_new_tokens=10)
        agree = sum(a == b for e, c in zip(eager, compiled, strict=True) for a, b in zip(e, c)) / sum(map(len, eager))
        assert agree > (0.99 if dtype == "int8" else 0.8), dtype  # bfloat16 rounds its own way


def test_a_model_the_step_cannot_run_decodes_eagerly():
    full = tiny_model("mistral", sliding_window=8)  # a window shorter than the cache
    model = OverFillModel(full, copy.deepcopy(full), tiny_tokenizer())
    with pytest.warns(OverfillWarning, match="decoding eagerly.*sliding window"):
        compiled = replies(model, PROMPTS, compile=True, max_new_tokens=10)
    assert compiled == replies(model, PROMPTS, compile=False, max_new_tokens=10)


# ---------------------------------------------------------------- the static cache


def test_static_cache_serves_the_eager_forward_like_a_dynamic_cache():
    model = tiny_model("qwen3")
    tok = tiny_tokenizer()
    ids, mask = left_pad([encode_prompt(tok, p) for p in PROMPTS], 0)
    with torch.inference_mode():
        logits, reference = prefill(model, ids, mask, DynamicCache())
        static = StaticCache.for_model(model, ids.shape[0], ids.shape[1] + 5)
        static_logits, _ = prefill(model, ids, mask, static)
    torch.testing.assert_close(static_logits, logits, rtol=1e-5, atol=1e-5)
    assert static.capacity == capacity_for(ids.shape[1] + 5) and static.capacity % CAPACITY_STEP == 0
    assert static.get_seq_length() == reference.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(static.layers[1].keys, reference.layers[1].keys)
    static.crop(-3)
    assert static.get_seq_length() == static.layers[0].values.shape[-2] == ids.shape[1] - 3


def test_the_compiled_step_holds_no_second_copy_of_the_weights(captured, tmp_path, monkeypatch):
    """The step's fused matrices are the only copy: the model's own layers view them, its eager forward still
    gives the same logits, and it saves and loads back as before. The layout is copied a row at a time here
    (as a weight mapped from its file is, a slice at a time)."""
    monkeypatch.setattr(step_weights, "COPY_BYTES", 1)
    model = pruned_model("qwen2")  # q/k/v biases too
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    with torch.inference_mode():
        before = model.decoder(ids).logits
    bytes_before = _parameter_bytes(model.decoder)
    eager = replies(model, PROMPTS, compile=False, max_new_tokens=6)
    assert replies(model, PROMPTS, compile=True, max_new_tokens=6) == eager
    step = decode_step._STEPS[model.decoder][torch.device("cpu")].weights
    layer = model.decoder.model.layers[1]
    storage = step.qkv.weight.untyped_storage().data_ptr()
    for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        assert linear.weight.untyped_storage().data_ptr() == storage
        assert linear.bias.untyped_storage().data_ptr() == step.qkv.bias.untyped_storage().data_ptr()
    assert layer.mlp.down_proj.weight.untyped_storage().data_ptr() == step.down.weight.untyped_storage().data_ptr()
    assert _parameter_bytes(model.decoder, step) <= bytes_before  # the step added no weight bytes
    with torch.inference_mode():
        torch.testing.assert_close(model.decoder(ids).logits, before)
    again = OverFillModel.from_pretrained(model.save_pretrained(tmp_path / "checkpoint"), model.full)
    assert replies(again, PROMPTS, compile=False, max_new_tokens=6) == eager


def test_a_model_trains_after_compiled_decoding_and_its_step_follows(captured):
    """The model's weights, views of the step's layout, stay ordinary tensors: a training step works on them after a
    compiled reply, and the next compiled reply uses the trained weights."""
    model = pruned_model("llama")
    replies(model, PROMPTS[:1], compile=True, max_new_tokens=4)
    assert not any(p.is_inference() for p in model.decoder.parameters())
    model.decoder.train()
    optimizer = torch.optim.SGD(model.decoder.parameters(), lr=0.5)
    model.decoder(torch.tensor([[5, 9, 14, 3, 7]]), labels=torch.tensor([[5, 9, 14, 3, 7]])).loss.backward()
    optimizer.step()
    model.decoder.eval()
    assert replies(model, PROMPTS, compile=True, max_new_tokens=6) == replies(model, PROMPTS, compile=False, max_new_tokens=6)


def _parameter_bytes(*modules) -> int:
    """Bytes of the distinct storages behind the modules' parameters."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in modules for p in m.parameters()}
    return sum(storages.values())


# ---------------------------------------------------------------- when to compile


def test_the_compile_decision_says_why():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert decide_compile(True, cpu, 10)[0] and not decide_compile(False, cuda, 10**6)[0]
    on, why = decide_compile(None, cpu, 100)
    assert not on and "eager" in why and "at most 100" in why and "--compile" in why
    on, why = decide_compile(None, cpu, 10**6)
    assert on and "compiled" in why and "1,000,000" in why
    assert decide_compile(None, cuda, 1)[0]
