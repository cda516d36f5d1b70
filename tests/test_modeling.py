"""OverFillModel on tiny random models (issue 3): the training loss, pair checks, save/load."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from overfill import OverfillError
from overfill.data import collate, split_messages
from overfill.fingerprint import fingerprint
from overfill.generation import GenerationConfig, generate
from overfill.modeling import MODES, OverFillModel
from overfill.prune import PruneConfig, prune_model
from tiny import KINDS, save_tiny, tiny_model, tiny_tokenizer

CHATS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sky."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],
]


def pruned_pair(kind="llama", ratio=0.5):
    full, tok = tiny_model(kind), tiny_tokenizer()
    decoder = prune_model(full, tok, PruneConfig(ratio=ratio), progress=False).model
    return OverFillModel(full, decoder, tok)


def batch_of(tok, chats=CHATS):
    return collate([split_messages(tok, c) for c in chats], pad_id=0)


def loss_of(model, batch):
    return model(batch.context_ids, batch.context_mask, batch.target_ids, batch.target_mask).loss


# ---------------------------------------------------------------- training forward


def test_loss_depends_on_the_context():
    model = pruned_pair()
    batch = batch_of(model.tokenizer)
    row = int((batch.context_mask[:, 0] == 0).nonzero()[0])  # the left-padded row
    base = loss_of(model, batch)
    for column in (-6, -20):  # a context token near the reply, and one further back
        changed = copy.deepcopy(batch)
        changed.context_ids[row, column] = (changed.context_ids[row, column] + 1) % 200 + 3
        assert changed.context_mask[row, column] == 1
        assert not torch.isclose(loss_of(model, changed), base)
    # and padding is not context: changing a pad token changes nothing
    padded = copy.deepcopy(batch)
    padded.context_ids[row, 0] = 77
    torch.testing.assert_close(loss_of(model, padded), base)


def test_gradients_reach_only_the_decoder():
    model = pruned_pair().train()
    assert not model.full.training and model.decoder.training  # the frozen model never trains (no dropout)
    loss_of(model, batch_of(model.tokenizer)).backward()
    assert all(p.grad is None for p in model.full.parameters())
    grads = [p.grad for p in model.decoder.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_equals_hand_computed_reference(kind):
    model = pruned_pair(kind)
    tok = model.tokenizer
    examples = [split_messages(tok, c) for c in CHATS]
    batch = collate(examples, pad_id=0)
    assert len({len(e.context_ids) for e in examples}) == 2 and len({len(e.target_ids) for e in examples}) == 2
    out = model(batch.context_ids, batch.context_mask, batch.target_ids, batch.target_mask)
    # By hand, one row at a time with no padding: full model over the context, decoder over
    # y1..y_{N-1} on top of that cache, cross-entropy on y2..yN, mean over all those tokens.
    nll, count = torch.tensor(0.0), 0
    for e in examples:
        context, target = torch.tensor([e.context_ids]), torch.tensor([e.target_ids])
        with torch.no_grad():
            cache = model.full(input_ids=context, use_cache=True).past_key_values
        positions = torch.arange(context.shape[1], context.shape[1] + target.shape[1] - 1)[None]
        logits = model.decoder(input_ids=target[:, :-1], past_key_values=cache, position_ids=positions).logits[0]
        logp = logits.log_softmax(-1)
        nll = nll - logp[torch.arange(target.shape[1] - 1), target[0, 1:]].sum()
        count += target.shape[1] - 1
    assert out.tokens == count
    torch.testing.assert_close(out.loss, nll / count)
    # logits predict y2..yN: y1 is the full model's token, no decoder loss term
    assert out.logits.shape[:2] == (2, batch.target_ids.shape[1] - 1)


def test_gradient_checkpointing_on_the_decoder_is_refused():
    model = pruned_pair().train()
    enable = getattr(model.decoder, "activation_checkpointing_enable", None) or model.decoder.gradient_checkpointing_enable
    enable()  # would silently drop the context cache (docs/design.md, "Traps in transformers 5.x")
    with pytest.raises(OverfillError, match="gradient checkpointing"):
        loss_of(model, batch_of(model.tokenizer))


# ---------------------------------------------------------------- pair checks


@pytest.mark.parametrize("field, change", [("num_key_value_heads", {"num_key_value_heads": 4}),
                                           ("num_hidden_layers", {"num_hidden_layers": 2}),
                                           ("head_dim", {"head_dim": 8})])
def test_mismatched_pair_is_refused_naming_the_field(field, change):
    full = tiny_model("llama")
    config = copy.deepcopy(full.config)
    for key, value in change.items():
        setattr(config, key, value)
    decoder = AutoModelForCausalLM.from_config(config)
    with pytest.raises(OverfillError, match=f"{field} is {change[field]} in the decoder but {getattr(full.config, field)}"):
        OverFillModel(full, decoder, tiny_tokenizer())


def test_decoder_with_another_sliding_window_is_refused():
    full = tiny_model("mistral")
    decoder = tiny_model("mistral", sliding_window=4)  # would attend to fewer cached positions
    with pytest.raises(OverfillError, match="sliding_window is 4 in the decoder but None"):
        OverFillModel(full, decoder, tiny_tokenizer())


def test_different_architecture_is_refused():
    with pytest.raises(OverfillError, match="model_type"):
        OverFillModel(tiny_model("llama"), tiny_model("qwen3"), tiny_tokenizer())


def test_different_tokenizer_is_refused():
    tok = tiny_tokenizer()
    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])
    full = tiny_model("llama")
    with pytest.raises(OverfillError, match="vocabulary"):
        OverFillModel(full, copy.deepcopy(full), tok, decoder_tokenizer=other)


# ---------------------------------------------------------------- save / load


def replies(model):
    prompts = ["hi", "What is the capital of France?"]
    return {mode: [r.token_ids for r in generate(model, prompts, GenerationConfig(mode=mode, max_new_tokens=10))]
            for mode in MODES}


def assert_same_tensors(got, want) -> None:
    """Every tensor of `want` and no other, equal, under the same names (a missing or extra one fails)."""
    got, want = got.state_dict(), want.state_dict()
    assert list(got) == list(want)
    for (name, a), b in zip(got.items(), want.values(), strict=True):
        assert torch.equal(a, b), name


def test_save_load_gives_identical_outputs(tmp_path):
    full_folder = tmp_path / "full"
    full, tok = save_tiny(full_folder, "qwen2")
    decoder = prune_model(full, tok, PruneConfig(ratio=0.5), progress=False).model
    model = OverFillModel(full, decoder, tok, full_source=str(full_folder), pruning={"ratio": 0.5, "kept": [1]})
    model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "overfill.json").read_text())
    assert meta["full_model"] == str(full_folder) and meta["pruning"] == {"ratio": 0.5}
    assert (tmp_path / "ckpt" / "decoder" / "config.json").is_file()

    expected = replies(model)
    given = OverFillModel.from_pretrained(tmp_path / "ckpt", full)  # the full model passed in
    recorded = OverFillModel.from_pretrained(tmp_path / "ckpt")  # the full model from overfill.json
    for loaded in (given, recorded):
        assert replies(loaded) == expected
        assert_same_tensors(loaded.decoder, model.decoder)
    assert recorded.full_source == str(full_folder)
    # saving over an existing checkpoint replaces it
    given.save_pretrained(tmp_path / "ckpt")
    assert replies(OverFillModel.from_pretrained(tmp_path / "ckpt", full)) == expected


def test_wrong_full_model_is_refused_by_fingerprint(tmp_path):
    model = pruned_pair("llama")
    model.save_pretrained(tmp_path / "ckpt")
    other = tiny_model("llama", seed=1)  # same config, other weights
    with pytest.raises(OverfillError, match="not the one this decoder was trained against") as err:
        OverFillModel.from_pretrained(tmp_path / "ckpt", other)
    assert "pass the original full model" in str(err.value) and "None" not in str(err.value)
    # the original full model (an equal copy) is accepted, and the saved decoder comes back with it
    loaded = OverFillModel.from_pretrained(tmp_path / "ckpt", tiny_model("llama", seed=0))
    assert loaded.full_fingerprint == model.full_fingerprint != fingerprint(other)
    assert_same_tensors(loaded.decoder, model.decoder)


def test_checkpoint_without_recorded_full_model_asks_for_one(tmp_path):
    model = pruned_pair("llama")
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(OverfillError, match="names no full model"):
        OverFillModel.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(OverfillError, match="not an OverFill checkpoint"):
        OverFillModel.from_pretrained(tmp_path)
