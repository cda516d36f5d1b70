"""Checks on the real bundled SmolLM2-135M-Instruct (materialised once into OVERFILL_HOME)."""

import json

import pytest
import torch

from overfill.generation import GenerationConfig, generate
from overfill.modeling import OverFillModel
from overfill.prune import PruneConfig, prune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pruned_smollm(tmp_path_factory, smollm_folder):
    out = tmp_path_factory.mktemp("smol") / "p45"
    # 16 calibration chats instead of 64: the widths do not depend on them, and the tests that use this decoder
    # compare it with itself (compiled against eager, speculative against the full model)
    prune(PruneConfig(model="smollm2-135m-instruct", out=str(out), ratio=0.45, calib_samples=16), progress=False)
    return out


def test_smollm_prunes_to_paper_widths(pruned_smollm):
    record = json.loads((pruned_smollm / "pruning.json").read_text())
    assert record["original"] == {"hidden_size": 576, "intermediate_size": 1536}
    assert record["requested"] == {"hidden_size": 316, "intermediate_size": 844}
    assert record["actual"] == {"hidden_size": 315, "intermediate_size": 844}
    config = json.loads((pruned_smollm / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]) == (30, 3, 64)
    assert 50e6 < record["parameters"]["pruned"] < 60e6


def eos_ids(tok, model) -> set[int]:
    value = model.generation_config.eos_token_id
    return {tok.eos_token_id, *([value] if isinstance(value, int) else value or [])}


def until_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def chat_prompt(tok, prompt: str) -> torch.Tensor:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]


@torch.inference_mode()
def overfill_by_hand(full, decoder, ids: torch.Tensor, n: int, eos: set[int]) -> list[int]:
    """Plain HF calls: the full model prefills and picks y1, the decoder extends its cache greedily."""
    out = full(input_ids=ids, use_cache=True)
    cache, tokens = out.past_key_values, [int(out.logits[0, -1].argmax())]
    while len(tokens) < n and tokens[-1] not in eos:
        position = ids.shape[1] + len(tokens) - 1
        out = decoder(input_ids=torch.tensor([[tokens[-1]]]), position_ids=torch.tensor([[position]]),
                      past_key_values=cache, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def test_smollm_full_pruned_and_overfill_reply(pruned_smollm):
    pair = OverFillModel.from_pair("smollm2-135m-instruct", str(pruned_smollm))
    tok = pair.tokenizer
    prompt = "What is the capital of France?"
    full = generate(pair, prompt, GenerationConfig(mode="full", max_new_tokens=24))[0]
    assert "Paris" in full.text
    ids, eos = chat_prompt(tok, prompt), eos_ids(tok, pair.full)
    replies = {mode: generate(pair, prompt, GenerationConfig(mode=mode, max_new_tokens=8))[0] for mode in ("pruned", "overfill")}
    # pruned: the decoder alone, as HF generate runs it
    with torch.inference_mode():
        hf = pair.decoder.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert replies["pruned"].token_ids == until_eos(hf[0, ids.shape[1]:].tolist(), eos)
    # overfill: the full model's first token, then the decoder on the full model's cache
    expected = overfill_by_hand(pair.full, pair.decoder, ids, 8, eos)
    assert replies["overfill"].token_ids == expected and len(expected) > 1
    assert expected[0] == full.token_ids[0]  # OverFill's first token is the full model's
    # this decoder does not merely copy the full model here, so the check above tells the two apart
    assert replies["overfill"].token_ids != full.token_ids[:8]


def test_decoder_equal_to_full_reproduces_full_generation(smollm_folder):
    from overfill.loading import load_model

    full, tok = load_model(smollm_folder)
    twin, _ = load_model(smollm_folder)
    pair = OverFillModel(full, twin, tok)
    prompts = ["Name three fruits.", "Write one sentence about the sea, please, in a calm tone."]
    config = GenerationConfig(mode="overfill", max_new_tokens=20)
    ours = generate(pair, prompts, config)
    tok.padding_side = "left"
    enc = tok.apply_chat_template([[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True,
                                  padding=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        hf = full.generate(**enc, max_new_tokens=20, do_sample=False)
    eos = eos_ids(tok, full)
    for row, reply in enumerate(ours):
        # HF pads a row that ended early; ours stops at its end token
        expected = until_eos(hf[row, enc["input_ids"].shape[1]:].tolist(), eos)
        assert reply.token_ids == expected, f"row {row}"
    assert all(len(r.token_ids) > 1 for r in ours)  # the decoder wrote tokens, not only the prefill


def test_compiled_greedy_equals_eager_on_the_bundled_model(pruned_smollm):
    """Float32, a left-padded batch, OverFill mode (the decoder's step; one model compiled keeps the suite short):
    the compiled step gives the eager loop's tokens."""
    model = OverFillModel.from_pair("smollm2-135m-instruct", str(pruned_smollm))
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a KV cache is.",
               "List three prime numbers."]
    eager = [r.token_ids for r in generate(model, prompts, GenerationConfig(max_new_tokens=48, compile=False))]
    compiled = [r.token_ids for r in generate(model, prompts, GenerationConfig(max_new_tokens=48, compile=True))]
    assert compiled == eager


def speculative_equals_full(decoder_folder, prompts: int, new_tokens: int, drafters: tuple[str, ...],
                            compile: tuple[bool, ...] = (False,)):
    from overfill.demo.prompts import demo_prompts

    model = OverFillModel.from_pair("smollm2-135m-instruct", str(decoder_folder))
    texts = [p.text for p in demo_prompts(0)[1][:prompts]]  # held-out chat prompts, one left-padded batch
    full = generate(model, texts, GenerationConfig(mode="full", max_new_tokens=new_tokens))
    for drafter in drafters:
        for compiled in compile:
            spec = generate(model, texts, GenerationConfig(mode="speculative", max_new_tokens=new_tokens, draft_tokens=3,
                                                           drafter=drafter, compile=compiled))
            assert [r.token_ids for r in spec] == [r.token_ids for r in full], f"{drafter}, compile={compiled}"
        assert spec[0].extra["speculation"]["rounds"] > 0


def test_speculative_gives_the_bundled_models_reply(pruned_smollm):
    """Greedy speculative decoding on the real model: the full model's tokens, on a padded batch (an untrained
    decoder keeps few drafts, so nearly every token comes from a verification pass: the path under test)."""
    speculative_equals_full(pruned_smollm, prompts=4, new_tokens=32, drafters=("overfill",))


@pytest.mark.heavy
def test_speculative_gives_the_bundled_models_long_replies(pruned_smollm):
    """8 prompts x 200 tokens, both drafters, eager and compiled by inductor (drafts and verification; several
    minutes on 2 cores: make test-heavy)."""
    speculative_equals_full(pruned_smollm, prompts=8, new_tokens=200, drafters=("overfill", "pruned"), compile=(False, True))
