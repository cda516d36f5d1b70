"""Prefill refresh on tiny random models: every K reply tokens the full model re-reads them.

Generation (`generation.refresh` step by step) and teacher forcing (`refresh.refreshed_handoff`,
the whole reply at once) must be the same schedule; the refreshed cache must be the full model's
own KV; a keep-everything decoder must stay the full model whatever K.
"""

import copy

import pytest
import torch

from overfill import OverfillError
from overfill import generation as generation_module
from overfill.generation import GenerationConfig, generate_ids
from overfill.kv_cache import GrowingCache
from overfill.modeling import OverFillModel, handoff, prefill
from overfill.refresh import refresh_schedule, refreshed_handoff, teacher_forcing
from overfill.tensors import left_pad
from test_generation import EOS, PAD, pruned_model
from tiny import KINDS, tiny_model, tiny_tokenizer

PROMPTS = [[1, 5, 9, 14, 3], [1, 7, 7, 30, 22, 41, 8, 12, 6]]  # different lengths: one row is left-padded


def run(model, config: GenerationConfig, prompts=PROMPTS, cache=None) -> torch.Tensor:
    ids, mask = left_pad(prompts, PAD)
    steps = list(generate_ids(model, ids, mask, config, eos_ids=set(), pad_id=PAD, cache=cache))
    return torch.stack([s.tokens for s in steps], dim=1)  # [B, steps]


def test_schedule_marks_the_token_after_each_block():
    assert refresh_schedule(7, 3).tolist() == [False, False, True, False, False, True, False]  # y4, y7 from the full model
    assert not refresh_schedule(2, 3).any()


@pytest.mark.parametrize("kind", KINDS)
def test_refresh_longer_than_the_reply_changes_nothing(kind):
    model = pruned_model(kind)
    plain = run(model, GenerationConfig(max_new_tokens=12))
    assert torch.equal(run(model, GenerationConfig(max_new_tokens=12, refresh_every=12)), plain)
    assert torch.equal(run(model, GenerationConfig(max_new_tokens=12, refresh_every=50)), plain)
    # ... and a refresh that does happen changes a genuinely pruned decoder's reply (the test can fail).
    assert not torch.equal(run(model, GenerationConfig(max_new_tokens=12, refresh_every=3)), plain)


@pytest.mark.parametrize("every", [1, 2, 5])
def test_keep_everything_decoder_with_refresh_is_the_full_model(every):
    full = tiny_model("llama")
    model = OverFillModel(full, copy.deepcopy(full), tiny_tokenizer())
    expected = run(model, GenerationConfig(mode="full", max_new_tokens=14))
    assert torch.equal(run(model, GenerationConfig(max_new_tokens=14, refresh_every=every)), expected)


def test_refreshed_positions_hold_the_full_models_own_kv():
    model = pruned_model("llama")
    every, new = 4, 11  # refreshes after y4 and y8: y1..y8 full-model KV; y9, y10 the decoder's
    cache = GrowingCache()
    tokens = run(model, GenerationConfig(max_new_tokens=new, refresh_every=every), cache=cache)
    ids, mask = left_pad(PROMPTS, PAD)
    width = ids.shape[1]
    refreshed = width + 2 * every
    full_ids = torch.cat([ids, tokens[:, : 2 * every]], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(tokens[:, : 2 * every])], dim=1)
    _, own = prefill(model.full, full_ids, full_mask)
    assert cache.get_seq_length() == width + new - 1  # the last token is chosen, never fed back
    real = full_mask.bool()
    for layer, reference in zip(cache.layers, own.layers, strict=True):
        for got, want in ((layer.keys, reference.keys), (layer.values, reference.values)):
            got, want = got[:, :, :refreshed], want
            assert torch.allclose(got.transpose(1, 2)[real], want.transpose(1, 2)[real], atol=1e-5)
    # The decoder's entries after the last refresh are not the full model's (its KV has other weights).
    _, whole = prefill(model.full, torch.cat([ids, tokens[:, :-1]], 1), torch.cat([mask, torch.ones_like(tokens[:, :-1])], 1))
    assert not torch.allclose(cache.layers[0].keys[:, :, refreshed:], whole.layers[0].keys[:, :, refreshed:], atol=1e-3)


class ForcedChooser:
    """Teacher forcing inside the generation loop: records each step's logits, returns the target token."""

    def __init__(self, targets: torch.Tensor):
        self.targets, self.logits = targets, []

    def choose(self, logits, history):
        self.logits.append(logits.float().log_softmax(-1))
        return self.targets[:, history.shape[1]]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("every", [2, 3, 7])
def test_teacher_forced_refresh_equals_generation_under_teacher_forcing(kind, every, monkeypatch):
    model = pruned_model(kind)
    n = 9
    torch.manual_seed(1)
    targets = torch.randint(3, 60, (len(PROMPTS), n))
    forced = ForcedChooser(targets)
    monkeypatch.setattr(generation_module, "TokenChooser", lambda config: forced.choose)
    run(model, GenerationConfig(max_new_tokens=n, refresh_every=every))
    stepwise = torch.stack(forced.logits, dim=1).gather(-1, targets[..., None]).squeeze(-1)  # [B, N]

    ids, mask = left_pad(PROMPTS, PAD)
    with torch.no_grad():
        stages = refreshed_handoff(model.full, model.decoder, ids, mask, targets, torch.ones_like(targets), every)
    logits = torch.cat([stages.first[:, None], stages.rest.float()], dim=1).log_softmax(-1)
    at_once = logits.gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(at_once, stepwise, atol=1e-4), (at_once - stepwise).abs().max()
    assert stages.by_prefill.tolist() == refresh_schedule(n - 1, every).tolist()
    # Refresh is not plain OverFill: the tokens after each block are scored differently.
    with torch.no_grad():
        plain = handoff(model.full, model.decoder, ids, mask, targets, torch.ones_like(targets))
    assert not torch.allclose(plain.rest, stages.rest, atol=1e-4)


def test_teacher_forced_refresh_handles_padded_replies():
    """Right-padded replies of different lengths score each row as it would alone."""
    model = pruned_model("llama")
    ids, mask = left_pad(PROMPTS, PAD)
    targets = torch.tensor([[5, 8, 13, 21, 34, 2, 0, 0], [4, 6, 8, 10, 12, 14, 16, 2]])
    target_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8])
    with torch.no_grad():
        both = refreshed_handoff(model.full, model.decoder, ids, mask, targets, target_mask, 3)
        alone = refreshed_handoff(model.full, model.decoder, ids[:1, -5:], mask[:1, -5:], targets[:1, :6],
                                  target_mask[:1, :6], 3)
    assert torch.allclose(both.rest[0, :5], alone.rest[0], atol=1e-4)


def test_training_loss_with_refresh_leaves_out_the_full_models_picks():
    model = pruned_model("llama")
    ids, mask = left_pad(PROMPTS, PAD)
    targets = torch.randint(3, 60, (2, 10))
    target_mask = torch.ones_like(targets)
    target_mask[0, 7:] = 0  # row 0: y1..y7, so its y9 pick is padding anyway
    out = model(ids, mask, targets, target_mask, via=teacher_forcing(4))
    assert out.tokens == (6 - 1) + (9 - 2)  # y2..y7 less y5; y2..y10 less y5 and y9
    # The training loop weights each micro-batch's loss by the same count (its gradient scale).
    from overfill.data import Batch
    from overfill.train.loss import scored_tokens

    batch = Batch(context_ids=ids, context_mask=mask, target_ids=targets, target_mask=target_mask)
    assert scored_tokens(batch, 1, refresh_every=4) == out.tokens
    assert scored_tokens(batch, 1) == 6 + 9
    out.loss.backward()
    assert model.decoder.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert all(p.grad is None for p in model.full.parameters())


def test_refresh_with_candidates_stops_and_bad_values():
    model = pruned_model("llama")
    config = GenerationConfig(max_new_tokens=10, refresh_every=3, num_return_sequences=2, temperature=1.0, seed=0)
    tokens = run(model, config)
    assert tokens.shape == (4, 10)
    again = run(model, config)
    assert torch.equal(tokens, again)  # seeded sampling through refreshes is reproducible
    eos_at = run(model, GenerationConfig(max_new_tokens=10, refresh_every=3))
    ids, mask = left_pad(PROMPTS, PAD)
    stop = int(eos_at[0, 4])  # a token row 0 makes right after a refresh: rows end there, the loop goes on
    assert stop not in eos_at[1].tolist()  # row 1 never makes it: it must run to the budget
    steps = list(generate_ids(model, ids, mask, GenerationConfig(max_new_tokens=10, refresh_every=3), eos_ids={stop, EOS},
                              pad_id=PAD))
    assert stop not in eos_at[0, :4].tolist() and not bool(steps[3].finished[0]) and bool(steps[4].finished[0])
    assert len(steps) == 10 and not bool(steps[-1].finished[1])  # the loop goes on for row 1, through refreshes
    after = torch.stack([s.tokens for s in steps[5:]], dim=1)  # [B, 5]
    assert (after[0] == PAD).all()  # row 0 ended: padding from then on
    assert torch.equal(after[1], eos_at[1, 5:])  # row 1 as without the stop token
    with pytest.raises(OverfillError, match="refresh-every"):
        GenerationConfig(refresh_every=-1)


def test_a_reply_shorter_than_a_block_runs_the_plain_handoff():
    model = pruned_model("llama")
    ids, mask = left_pad(PROMPTS, PAD)
    targets = torch.randint(3, 60, (2, 4))  # 3 reply inputs, fewer than K = 5: no refresh happens
    with torch.no_grad():
        short = refreshed_handoff(model.full, model.decoder, ids, mask, targets, torch.ones_like(targets), 5)
        plain = handoff(model.full, model.decoder, ids, mask, targets, torch.ones_like(targets))
    assert short.by_prefill is None and torch.equal(short.rest, plain.rest)
    assert teacher_forcing(0) is handoff


def test_the_stages_do_not_import_refresh():
    """Figure 1 is prefill then decode: modeling needs nothing from the refresh schedule built on it (no import
    circle, lazy imports inside functions included)."""
    import ast
    from pathlib import Path

    import overfill.modeling

    tree = ast.parse(Path(overfill.modeling.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "overfill.refresh" not in imported
