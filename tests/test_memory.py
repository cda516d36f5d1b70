"""Memory at a real model's scale, checked at a tiny one: weights loaded once in their dtype, the fingerprint of the
files as stored, a pruned decoder kept in its model's dtype, and the memory check's phases."""

import json

import pytest
import torch

from overfill import tensors
from overfill.bench import memory, synthetic
from overfill.fingerprint import fingerprint
from overfill.loading import load_model
from overfill.modeling import OverFillModel

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


@pytest.fixture
def tiny_pair(tmp_path):
    counts = memory.write_pair(TINY, synthetic.DECODER_045, torch.float32, tmp_path)
    return tmp_path, counts


def test_a_model_loads_straight_into_its_dtype_with_its_stored_fingerprint(tiny_pair):
    folder, _ = tiny_pair
    as_stored, _ = load_model(str(folder / "full"))  # float32, as written
    halved, _ = load_model(str(folder / "full"), dtype=torch.bfloat16)
    assert {p.dtype for p in halved.parameters()} == {torch.bfloat16}
    stored = fingerprint(as_stored)  # sampled in memory: the stored values
    assert fingerprint(halved, stored=folder / "full") == fingerprint(as_stored, stored=folder / "full") == stored
    assert fingerprint(halved) != stored  # the bfloat16 values in memory are not the files'


def test_a_pair_loads_in_bfloat16_and_checks_its_fingerprint_against_the_files(tiny_pair):
    folder, _ = tiny_pair
    model = OverFillModel.from_pair(str(folder / "full"), str(folder / "decoder"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    record = json.loads((folder / "decoder" / "pruning.json").read_text())
    assert model.full_fingerprint == record["source_fingerprint"]
    mixed = OverFillModel.from_pair(str(folder / "full"), str(folder / "decoder"), dtype=torch.bfloat16,
                                    decoder_dtype="float32")
    assert mixed.decoder.lm_head.weight.dtype == torch.float32 and mixed.full.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.decoder.lm_head.weight, load_model(str(folder / "decoder"))[0].lm_head.weight,
                               rtol=0, atol=0)  # read in float32 from the files, never through bfloat16


def test_the_memory_check_measures_every_phase(tiny_pair, monkeypatch):
    folder, counts = tiny_pair
    monkeypatch.setattr("overfill.decode_step.BACKEND", "aot_eager")
    lines = []
    result = memory.measure(folder, torch.float32, torch.device("cpu"), say=lines.append, prompt_len=8, new_tokens=4)
    phases = result["phases"]
    assert list(phases) == ["load", "eager decode, batch 1", "compiled decode, batch 1", "compiled decode, batch 8",
                            "speculative (compiled), batch 1"] and len(lines) == len(phases)
    assert result["weight_bytes"] == 4 * (counts["full"] + counts["decoder"])  # float32, the tied head counted once
    assert phases["compiled decode, batch 8"]["kv_bytes"] == 8 * phases["compiled decode, batch 1"]["kv_bytes"] > 0
    for row in phases.values():
        assert row["peak_resident_bytes"] >= result["runtime_bytes_before_load"] > 0
        assert row["over_weights"] > 0


def _resident_file_bytes() -> int:
    return memory.PeakResident.kinds()["file"]


def test_a_weight_mapped_from_its_file_hands_its_pages_back(tmp_path):
    """The pages a copied weight leaves in its file's mapping go back to the kernel, and its values survive."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    values = torch.arange(8 * 2**20, dtype=torch.float32).view(2048, -1)  # 32 MiB
    save_file({"weight": values}, tmp_path / "model.safetensors")
    with safe_open(tmp_path / "model.safetensors", "pt") as stored:
        mapped = stored.get_tensor("weight")
    assert torch.equal(mapped, values)  # every page read, so resident
    before = _resident_file_bytes()
    if not tensors.hand_back_pages(mapped):
        pytest.skip("this kernel takes no MADV_PAGEOUT hint")
    assert before - _resident_file_bytes() > 24 * 2**20
    assert torch.equal(mapped, values)  # read again from the file
    assert not tensors.hand_back_pages(values.clone())  # memory of its own: freed when dropped, left alone


def test_hf_models_compute_logits_from_contiguous_rows(tiny_pair):
    """Prefill asks for the last column by index: on a strided [B, 1, H] view `F.linear` would multiply every row by
    a copy of the LM head (one per row: gigabytes at a real vocabulary)."""
    from overfill.modeling import prefill, prefill_with_reply

    folder, _ = tiny_pair
    model, _ = load_model(str(folder / "full"), dtype=torch.float32)
    seen = []
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append((args[0].shape, args[0].is_contiguous())))
    ids = torch.randint(3, 250, (3, 7))
    with torch.inference_mode():
        prefill(model, ids, torch.ones_like(ids))
        prefill_with_reply(model, ids, torch.ones_like(ids), ids[:, :4], torch.ones_like(ids[:, :4]), 4)
    assert seen == [(torch.Size([3, 1, 64]), True), (torch.Size([3, 4, 64]), True)]
