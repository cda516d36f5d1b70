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
    prune(PruneConfig(model="smollm2-135m-instruct", out=str(out), ratio=0.45), progress=False)
    return out


def test_smollm_prunes_to_paper_widths(pruned_smollm):
    record = json.loads((pruned_smollm / "pruning.json").read_text())
    assert record["original"] == {"hidden_size": 576, "intermediate_size": 1536}
    assert record["requested"] == {"hidden_size": 316, "intermediate_size": 844}
    assert record["actual"] == {"hidden_size": 315, "intermediate_size": 844}
    config = json.loads((pruned_smollm / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]) == (30, 3, 64)
    assert 50e6 < record["parameters"]["pruned"] < 60e6


def test_smollm_full_pruned_and_overfill_reply(pruned_smollm):
    pair = OverFillModel.from_pair("smollm2-135m-instruct", str(pruned_smollm))
    prompt = "What is the capital of France?"
    full = generate(pair, prompt, GenerationConfig(mode="full", max_new_tokens=24))[0]
    assert "Paris" in full.text
    for mode in ("pruned", "overfill"):
        reply = generate(pair, prompt, GenerationConfig(mode=mode, max_new_tokens=8))[0]
        assert reply.new_tokens >= 1 and isinstance(reply.text, str)
    # OverFill's first token is the full model's.
    overfill = generate(pair, prompt, GenerationConfig(mode="overfill", max_new_tokens=1))[0]
    assert overfill.token_ids[0] == full.token_ids[0]


def test_decoder_equal_to_full_reproduces_full_generation(smollm_folder):
    from overfill.zoo import load_model

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
    for row, reply in enumerate(ours):
        expected = hf[row, enc["input_ids"].shape[1]:].tolist()
        assert reply.token_ids == expected[: len(reply.token_ids)]
