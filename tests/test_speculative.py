"""Lossless OverFill (overfill.speculative): greedy replies are the full model's, token for token; sampled
replies follow the full model's distribution; the verdict rules on their own."""

from __future__ import annotations

import copy

import pytest
import torch

from overfill.errors import OverfillError
from overfill.generation import GenerationConfig, TokenChooser, generate_ids
from overfill.modeling import OverFillModel
from overfill.speculative import Speculation, accept_greedy, accept_sampled, speculative_ids
from overfill.tensors import left_pad
from tiny import KINDS, tiny_model, tiny_pruned, tiny_tokenizer

EOS, PAD = 2, 0


def pair(kind: str) -> OverFillModel:
    full, decoder = tiny_pruned(kind)
    return OverFillModel(copy.deepcopy(full), copy.deepcopy(decoder), tiny_tokenizer())


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (int(length),), generator=g).tolist() for length in torch.randint(3, 12, (n,), generator=g)]


def run(model, contexts, config, *, speculative: bool = False, **kw) -> list[list[int]]:
    """Each row's reply ids (the finishing token included), from the speculative loop or the plain one."""
    ids, mask = left_pad(contexts, PAD)
    loop = speculative_ids if speculative else generate_ids
    rows = [[] for _ in range(ids.shape[0] * config.num_return_sequences)]
    done = [False] * len(rows)
    for step in loop(model, ids, mask, config, eos_ids=set(kw.pop("eos", {EOS})), pad_id=PAD, **kw):
        for r, (token, fin) in enumerate(zip(step.tokens.tolist(), step.finished.tolist(), strict=True)):
            if not done[r]:
                rows[r].append(token)
                done[r] = fin
    return rows


# ---------------------------------------------------------------- greedy: the full model's reply


# every family with the OverFill drafter; the pruned drafter's own cache once (the step is the same code). Qwen2 in
# make test-heavy: its one trait, q/k/v biases, is in the compiled one-token step's tests (test_decode_step.py),
# and the block step is the same code with Q tokens
@pytest.mark.parametrize("kind, drafter", [pytest.param(kind, "overfill", marks=[pytest.mark.heavy] if kind == "qwen2" else [])
                                           for kind in KINDS] + [("llama", "pruned")])
def test_compiled_drafts_give_the_full_models_reply(kind, drafter, monkeypatch):
    """--compile: the decoder drafts with its compiled one-token step on static caches, the full model verifies
    each block with its own compiled step over k + 1 tokens, each round crops the caches; the reply is still the
    full model's."""
    from overfill import decode_step

    monkeypatch.setattr(decode_step, "BACKEND", "aot_eager")  # the captured graph on PyTorch's kernels: no C++ build
    model, contexts = pair(kind), prompts(3)
    want = run(model, contexts, GenerationConfig(mode="full", max_new_tokens=20), eos=set())
    for k in (2, 4):
        counted = {}
        for compile in (False, True):
            config = GenerationConfig(mode="speculative", max_new_tokens=20, draft_tokens=k, drafter=drafter, compile=compile)
            counted[compile] = Speculation()
            assert run(model, contexts, config, speculative=True, eos=set(), stats=counted[compile]) == want
        assert counted[True].as_dict() == counted[False].as_dict()  # the same drafts, kept as often, in as many rounds
        assert counted[True].emitted == counted[False].emitted
    assert decode_step.compile_seconds(model.decoder), "the drafts did not come from the compiled step"
    blocks = {key.split()[-1] for key in decode_step.compile_seconds(model.full)}
    assert {"3x2x128", "3x3x128", "3x5x128"} <= blocks, f"the verification did not run compiled: {blocks}"
    # A decoder that is the full model drafts the full model's tokens: every draft is kept.
    same = OverFillModel(model.full, copy.deepcopy(model.full), model.tokenizer)
    stats = Speculation()
    config = GenerationConfig(mode="speculative", max_new_tokens=20, draft_tokens=3, drafter=drafter, compile=True)
    assert run(same, contexts, config, speculative=True, eos=set(), stats=stats) == want
    assert stats.acceptance_rate == 1.0
    if drafter == "pruned":  # after a round that kept every draft, its drafter reads two tokens: compiled too
        caught_up = {key.split()[-1] for key in decode_step.compile_seconds(same.decoder)}
        assert "3x2x128" in caught_up, f"the drafter's catch-up did not run compiled: {caught_up}"



@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("drafter", ["overfill", "pruned"])
def test_greedy_speculation_gives_the_full_models_reply(kind, drafter):
    model, contexts = pair(kind), prompts(3)  # a left-padded batch of different lengths
    want = run(model, contexts, GenerationConfig(mode="full", max_new_tokens=20), eos=set())
    for k in (1, 3, 6):
        stats = Speculation()
        config = GenerationConfig(mode="full", max_new_tokens=20, draft_tokens=k, drafter=drafter)
        assert run(model, contexts, config, speculative=True, eos=set(), stats=stats) == want
        assert stats.rounds > 0 and stats.drafted > 0
    assert [len(r) for r in want] == [20, 20, 20]


@pytest.mark.parametrize("drafter", ["overfill", "pruned"])
def test_a_decoder_that_is_the_full_model_has_every_draft_kept(drafter):
    """Output alone cannot show a drafter reading the wrong cache (verification hides it); acceptance can."""
    full = tiny_model("llama")
    model = OverFillModel(full, copy.deepcopy(full), tiny_tokenizer())
    stats = Speculation()
    config = GenerationConfig(mode="full", max_new_tokens=17, draft_tokens=4, drafter=drafter)
    got = run(model, prompts(2), config, speculative=True, eos=set(), stats=stats)
    assert got == run(model, prompts(2), GenerationConfig(mode="full", max_new_tokens=17), eos=set())
    # 1 token from the prefill, then 16 in rounds of 4 kept drafts + 1: 16 / 5 -> 3 full rounds and a 1-token one
    assert stats.acceptance_rate == 1.0 and (stats.rounds, stats.drafted, stats.emitted) == (4, 2 * 12, 16)


def test_speculation_ends_rows_on_eos_and_stop_and_repeats_candidates():
    model, contexts = pair("llama"), prompts(2, seed=3)
    plain = run(model, contexts, GenerationConfig(mode="full", max_new_tokens=24, num_return_sequences=2), eos=set())
    stop_token = plain[0][5]  # a token the first row writes mid-way: as an end-of-turn id it must end it there
    config = GenerationConfig(mode="full", max_new_tokens=24, num_return_sequences=2, draft_tokens=3)
    want = run(model, contexts, GenerationConfig(mode="full", max_new_tokens=24, num_return_sequences=2), eos={stop_token})
    got = run(model, contexts, config, speculative=True, eos={stop_token})
    assert got == want and got[0][-1] == stop_token and len(got[0]) <= 6
    assert len(got) == 4  # 2 prompts x 2 candidates, each prefilled once

    def is_stopped(row, ids):  # a stop rule seen token by token, as stop strings are
        return len(ids) >= 3 + row

    assert run(model, contexts, config, speculative=True, eos=set(), is_stopped=is_stopped) == \
        run(model, contexts, GenerationConfig(mode="full", max_new_tokens=24, num_return_sequences=2), eos=set(),
            is_stopped=is_stopped)


# ---------------------------------------------------------------- the verdict rules


def test_greedy_verdict_keeps_the_batchs_shortest_agreeing_prefix():
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7]])
    logits = torch.full((2, 4, 10), -1.0)
    for row, choice in enumerate(([5, 6, 7, 8], [5, 6, 7, 1])):  # row 1's second draft (9) is refused for 6
        logits[row, torch.arange(4), torch.tensor(choice)] = 1.0
    verdict = accept_greedy(drafts, logits, torch.tensor([True, True]))
    assert verdict.kept.tolist() == [3, 1] and verdict.n == 1
    assert verdict.tokens.tolist() == [[5, 6], [5, 6]]  # row 0 emits its own kept draft, row 1 the full model's token
    finished_row_1 = accept_greedy(drafts, logits, torch.tensor([True, False]))
    assert finished_row_1.n == 3 and finished_row_1.tokens[0].tolist() == [5, 6, 7, 8]


def test_sampled_verdict_draws_from_the_full_models_distribution():
    """The first emitted token of speculative sampling is distributed as p, whatever q drafted it."""
    g = torch.Generator().manual_seed(0)
    vocab, rows, k = 5, 200_000, 2
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3])  # a poor drafter
    draft_probs = q.expand(rows, k, vocab)
    drafts = torch.multinomial(q, rows * k, replacement=True, generator=g).view(rows, k)
    target = p.expand(rows, k + 1, vocab)

    def sample(probs):
        return torch.multinomial(probs, 1, generator=g).squeeze(-1)

    verdict = accept_sampled(drafts, draft_probs, target, torch.ones(rows, dtype=torch.bool),
                             lambda shape: torch.rand(shape, generator=g), sample)
    first = torch.bincount(verdict.tokens[:, 0], minlength=vocab).float() / rows
    assert (first - p).abs().max() < 0.005
    # each draft is kept with probability sum_x min(p(x), q(x))
    assert (verdict.kept >= 1).float().mean() == pytest.approx(float(torch.minimum(p, q).sum()), abs=0.005)


def test_sampled_replies_follow_the_full_models_distribution():
    """A tiny model with 6 tokens: the first two reply tokens' joint frequencies over 4,000 sampled replies
    match the full model's own sampled replies' (and the exact distribution) within sampling error."""
    full = tiny_model("llama", 0, vocab_size=6, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    decoder = tiny_model("llama", 1, vocab_size=6, pad_token_id=0, eos_token_id=1, bos_token_id=1)  # another model
    model = OverFillModel(full, decoder, tiny_tokenizer())
    context, rows = [[2, 3, 4, 5, 2]], 4000
    with torch.inference_mode():
        first = full(torch.tensor(context)).logits[0, -1].softmax(-1)  # [6]
        second = full(torch.tensor([context[0] + [t] for t in range(6)])).logits[:, -1].softmax(-1)  # [6, 6]
    exact = first[:, None] * second  # P(y1, y2)

    def frequencies(speculative: bool, seed: int) -> torch.Tensor:
        config = GenerationConfig(mode="full", max_new_tokens=2, temperature=1.0, seed=seed,
                                  num_return_sequences=rows, draft_tokens=2)
        got = run(model, context, config, speculative=speculative, eos=set(), chooser=TokenChooser(config))
        pairs = torch.tensor(got)
        return torch.bincount(pairs[:, 0] * 6 + pairs[:, 1], minlength=36).float().view(6, 6) / rows

    spec, plain = frequencies(True, 1), frequencies(False, 2)
    # total variation distance; with 4,000 samples over 36 cells its sampling noise is ~0.04
    assert 0.5 * (spec - exact).abs().sum() < 0.06
    assert 0.5 * (plain - exact).abs().sum() < 0.06


# ---------------------------------------------------------------- through generate, chat and the CLI


def test_generate_and_chat_in_speculative_mode_give_the_full_models_replies():
    from overfill.chat import ChatSession
    from overfill.generation import generate

    model = pair("qwen2")
    prompts_ = ["hi", "Tell me a story about a dragon."]
    full = generate(model, prompts_, GenerationConfig(mode="full", max_new_tokens=16))
    spec = generate(model, prompts_, GenerationConfig(mode="speculative", max_new_tokens=16, draft_tokens=3))
    assert [r.token_ids for r in spec] == [r.token_ids for r in full] and spec[0].mode == "speculative"
    counters = spec[0].extra["speculation"]
    assert counters["rounds"] > 0 and 0 <= counters["acceptance_rate"] <= 1 and counters["tokens_per_full_pass"] >= 1
    assert spec[0].as_dict()["speculation"] == counters
    # streaming: the pieces join to the same text, cut at a stop string as generate cuts it
    from overfill.generation import stream

    stop = spec[1].text[3:5] or None
    streamed = "".join(stream(model, prompts_[1], GenerationConfig(mode="speculative", max_new_tokens=16, draft_tokens=3,
                                                                  stop=(stop,) if stop else ())))
    assert streamed == generate(model, prompts_[1], GenerationConfig(mode="full", max_new_tokens=16,
                                                                    stop=(stop,) if stop else ()))[0].text
    # chat: two turns, the earlier turn's full-model KV kept between them, as in full mode
    chats = {mode: ChatSession(model, GenerationConfig(mode=mode, max_new_tokens=10)) for mode in ("full", "speculative")}
    for turn in ("hello", "and then?"):
        assert chats["speculative"].say(turn) == chats["full"].say(turn)
    with pytest.raises(OverfillError, match="--drafter overfill in chat"):
        ChatSession(model, GenerationConfig(mode="speculative", drafter="pruned"))


def test_speculative_settings_are_checked():
    for kwargs, says in ((dict(draft_tokens=0), "--draft-tokens must be at least 1"),
                         (dict(drafter="other"), "--drafter got 'other'"),
                         (dict(refresh_every=4), "pick one")):
        with pytest.raises(OverfillError, match=says):
            GenerationConfig(mode="speculative", **kwargs)
    with pytest.raises(OverfillError, match="speculative"):  # the error lists it among the modes
        GenerationConfig(mode="lossless")
