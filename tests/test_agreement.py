"""Agreement with the full model in `overfill eval`: by hand on token lists and scores, and end to end on tiny
models (the full model against itself, a keep-everything decoder, a different decoder, refresh entries)."""

import json
import math
import statistics

import pytest
import torch
from rich.console import Console

from overfill.errors import OverfillError
from overfill.evaluation import EvalConfig, evaluate
from overfill.evaluation.agreement import first_divergence, greedy_agreement, teacher_forced_agreement
from overfill.evaluation.report import print_eval_table
from overfill.evaluation.scoring import TokenScores
from overfill.modeling import OverFillModel
from overfill.prune import PruneConfig, prune_model
from tiny import save_tiny, tiny_model, write_jsonl

AGREEMENT_KEYS = {"top1_token1", "top1", "nll_token1", "nll", "ppl", "tokens", "near_ties", "tie"}
GREEDY_KEYS = {"token1_match", "token_match", "exact_match", "first_divergence_mean", "first_divergence_median"}

# ---------------------------------------------------------------- by hand


def test_greedy_agreement_and_first_divergence_by_hand():
    replies = [[1, 2, 3, 9], [5, 6, 2], [7], [4, 4, 2]]
    reference = [[1, 2, 4, 9], [5, 6, 2], [8, 1], [4, 4, 4, 4]]
    assert [first_divergence(a, b) for a, b in zip(replies, reference, strict=True)] == [2, 3, 0, 2]
    a = greedy_agreement(replies, reference)
    assert a["token1_match"] == pytest.approx(3 / 4)
    assert a["token_match"] == pytest.approx((2 + 2 + 0 + 1) / (3 + 2 + 1 + 3))  # positions 2..N of the longer reply
    assert a["exact_match"] == pytest.approx(1 / 4)
    assert a["first_divergence_mean"] == pytest.approx((2 + 3 + 0 + 2) / 4)
    assert a["first_divergence_median"] == 2
    # A stop token where the full model goes on is a divergence; a strict prefix counts its own length.
    assert first_divergence([3, 2], [3, 5, 2]) == 1 and first_divergence([3, 5], [3, 5, 2]) == 2


def test_near_ties_count_as_top1_within_the_margin_only():
    # Two replies; margins below the argmax: 0 = the argmax, 1e-4 = float noise, 0.7 = another token preferred.
    scores = [TokenScores([-0.1, -0.2, -1.0], [True, True, False], [0.0, 0.0, 0.7]),
              TokenScores([-0.3, -0.4], [False, False], [1e-4, 1e-4])]
    summary, pos = teacher_forced_agreement(scores, tie=1e-3)
    assert summary["top1_token1"] == 1.0  # token 1 apart: both within the margin
    assert summary["top1"] == pytest.approx(2 / 3) and summary["tokens"] == 3  # tokens 2..N: 0.0, 0.7, 1e-4
    assert summary["near_ties"] == 1  # the second reply's token 2 (token 1 is reported apart)
    assert summary["nll"] == pytest.approx((0.2 + 1.0 + 0.4) / 3) and summary["nll_token1"] == pytest.approx(0.2)
    assert pos["top1"] == [1.0, 1.0, 0.0] and pos["count"] == [2, 2, 1]
    exact, _ = teacher_forced_agreement(scores, tie=0.0)
    assert exact["top1"] == pytest.approx(1 / 3) and exact["top1_token1"] == 0.5 and exact["near_ties"] == 0


# ---------------------------------------------------------------- end to end


def hand_scores(full, decoder, context: list[int], reply: list[int]) -> tuple[list[bool], list[float]]:
    """Per reply token, unpadded and one example at a time: whether it is the argmax, and its log-prob
    (token 1 from the full model's prefill of the context, the rest from `decoder` on that cache)."""
    with torch.no_grad():
        out = full(torch.tensor([context]), use_cache=True)
        logits = [out.logits[0, -1]]
        if len(reply) > 1:
            positions = torch.arange(len(context), len(context) + len(reply) - 1)[None]
            rest = decoder(torch.tensor([reply[:-1]]), past_key_values=out.past_key_values, position_ids=positions).logits[0]
            logits += list(rest)
    hits = [int(lg.argmax()) == y for lg, y in zip(logits, reply, strict=True)]
    return hits, [lg.log_softmax(-1)[y].item() for lg, y in zip(logits, reply, strict=True)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """'same': the full model + a decoder pruned keeping every channel (its logits are the full model's);
    'other': the full model + another tiny model of its shape. One held-out file, one record without a reply."""
    root = tmp_path_factory.mktemp("agreement")
    full, tok = save_tiny(root / "full", seed=0)
    keep_all = prune_model(full, tok, PruneConfig(ratio=0.0), progress=False).model
    OverFillModel(full, keep_all, tok, full_source=str(root / "full")).save_pretrained(root / "same")
    OverFillModel(full, tiny_model(seed=1), tok, full_source=str(root / "full")).save_pretrained(root / "other")
    data = write_jsonl(root / "held_out.jsonl", [
        {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = 5\n#### 5"},
        {"question": "4 pens per box, 3 boxes?", "answer": "4 * 3 = 12\n#### 12"},
        {"question": "no answer here"},
        {"question": "10 - 7?", "answer": "10 - 7 = 3\n#### 3"},
        {"question": "A train goes 60 km/h for 2 hours. How far?", "answer": "60 * 2 = 120\n#### 120"},
    ])
    return root, data


def run_eval(root, data, out, **kwargs):
    entries = (f"full=full:{root / 'same'}", f"same=overfill:{root / 'same'}", f"other=overfill:{root / 'other'}",
               f"pruned=pruned:{root / 'other'}")
    config = EvalConfig(data=str(data), entries=entries, out=str(out),
                        **{"prompt_field": "question", "response_field": "answer", "max_new_tokens": 10, "batch_size": 3, **kwargs})
    return config, evaluate(config)


@pytest.fixture(scope="module")
def evaluated(checkpoints, tmp_path_factory):
    root, data = checkpoints
    out = tmp_path_factory.mktemp("agreement-out")
    config, results = run_eval(root, data, out, refresh_every=(1, 500))
    rows = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    replies = {name: [r["token_ids"] for r in rows if r["model"] == name] for name in results["models"]}
    return config, results, out, replies, rows


def test_the_full_model_and_a_keep_everything_decoder_agree_fully(evaluated):
    _, results, _, replies, rows = evaluated
    m = results["models"]
    reference = replies["full"]
    assert min(map(len, reference)) > 1  # there are tokens 2..N to agree on
    for name in ("full", "same"):  # the full model on its own replies; a decoder with the full model's logits
        agree = m[name]["agreement"]
        assert agree["top1"] == 1.0 and agree["top1_token1"] == 1.0
        assert agree["near_ties"] == 0  # float32: each of its own tokens is its exact teacher-forced argmax
        assert agree["tokens"] == sum(len(r) - 1 for r in reference)
    assert m["same"]["agreement"]["nll"] == pytest.approx(m["full"]["agreement"]["nll"], abs=1e-5)
    # In generation the keep-everything decoder never diverges: each reply counts its whole length.
    assert replies["same"] == reference
    assert m["same"]["agreement"]["first_divergence_mean"] == pytest.approx(statistics.mean(map(len, reference)))
    assert m["same"]["agreement"]["first_divergence_median"] == statistics.median(map(len, reference))
    assert all(r["first_divergence"] == len(r["token_ids"]) for r in rows if r["model"] in ("full", "same"))


def test_a_different_decoder_agrees_less_as_counted_by_hand(evaluated):
    config, results, _, replies, rows = evaluated
    m = results["models"]
    reference, ours = replies["full"], replies["other"]
    # Tokens before the first divergence, counted here from the generated token lists.
    counts = []
    for a, b in zip(ours, reference, strict=True):
        k = 0
        for x, y in zip(a, b):
            if x != y:
                break
            k += 1
        counts.append(k)
    assert min(counts) >= 1  # token 1 is the full model's in overfill mode
    assert ours != reference and counts != [len(r) for r in reference]
    agree = m["other"]["agreement"]
    assert agree["first_divergence_mean"] == pytest.approx(sum(counts) / len(counts))
    assert agree["first_divergence_median"] == statistics.median(counts)
    assert [r["first_divergence"] for r in rows if r["model"] == "other"] == counts
    # Teacher forced on the full model's replies: top-1 and NLL by hand, unpadded, one reply at a time.
    pair = OverFillModel.from_pretrained(next(e.checkpoint for e in config.model_entries() if e.name == "other"))
    examples = config.read(pair.tokenizer).examples
    hand = [hand_scores(pair.full, pair.decoder, e.context_ids, r) for e, r in zip(examples, reference, strict=True)]
    hits = [h for row, _ in hand for h in row[1:]]
    nll = -sum(lp for _, row in hand for lp in row[1:]) / len(hits)
    assert agree["top1"] == pytest.approx(sum(hits) / len(hits)) and agree["top1"] < 1.0
    assert agree["top1_token1"] == 1.0  # token 1 is the full model's
    assert agree["nll"] == pytest.approx(nll, abs=1e-4) and agree["nll"] > m["full"]["agreement"]["nll"]
    # The per-position curve: the share of replies whose token k is the decoder's top-1.
    width = max(map(len, reference))
    by_position = [[row[k] for row, _ in hand if k < len(row)] for k in range(width)]
    curve = results["agreement_per_position"]["other"]
    assert curve["count"] == [len(col) for col in by_position]
    assert curve["top1"] == pytest.approx([sum(col) / len(col) for col in by_position])
    assert curve["top1"][0] == 1.0 and min(curve["top1"][1:]) < 1.0


def test_results_json_and_figures_carry_the_agreement_fields(evaluated):
    _, results, out, _, _ = evaluated
    saved = json.loads((out / "results.json").read_text())
    names = ["full", "same", "other", "other+refresh1", "other+refresh500", "pruned", "same+refresh1", "same+refresh500"]
    assert set(saved["models"]) == set(names)
    for name, m in saved["models"].items():
        assert AGREEMENT_KEYS | GREEDY_KEYS <= set(m["agreement"]), name
        assert "nll" in m and "agreement" in m["seconds"]  # reference NLL beside it
    curves = json.loads((out / "agreement_per_position.json").read_text())
    assert set(curves) == set(saved["agreement_per_position"]) == set(names)
    assert (out / "agreement_per_position.png").stat().st_size > 0 and (out / "per_position.png").stat().st_size > 0
    # Pruned mode picks token 1 with the decoder: token 1 is no longer the full model's by construction.
    assert saved["models"]["pruned"]["agreement"]["top1_token1"] == pytest.approx(
        saved["agreement_per_position"]["pruned"]["top1"][0])


def test_refresh_entries_are_measured_on_their_schedule(evaluated):
    _, results, _, replies, _ = evaluated
    m = results["models"]
    # Refresh every token: the full model predicts each one, so it agrees fully, in teacher forcing and generating.
    assert m["other+refresh1"]["agreement"]["top1"] == 1.0 and replies["other+refresh1"] == replies["full"]
    assert m["other+refresh1"]["agreement"]["first_divergence_mean"] == pytest.approx(statistics.mean(map(len, replies["full"])))
    # A K past every reply is plain OverFill.
    for key in ("top1", "nll", "first_divergence_mean"):
        assert m["other+refresh500"]["agreement"][key] == pytest.approx(m["other"]["agreement"][key], abs=1e-6)


def test_the_report_prints_the_agreement_columns(evaluated):
    _, results, _, _, _ = evaluated
    console = Console(record=True, width=400)
    print_eval_table(console, results)
    text = console.export_text()
    for header in ("agree top-1 y2..N", "NLL on full y2..N", "same tokens mean/med"):
        assert header in text
    for name in ("full", "other"):
        agree = results["models"][name]["agreement"]
        row = next(line for line in text.splitlines() if line.strip("│ ").startswith(f"{name} "))
        assert f"{agree['top1']:.1%}" in row and f"{agree['nll']:.3f}" in row
        assert f"{agree['first_divergence_mean']:.1f} / {agree['first_divergence_median']:g}" in row


def test_no_agreement_skips_the_teacher_forced_pass(checkpoints, tmp_path):
    root, data = checkpoints
    _, results = run_eval(root, data, tmp_path / "out", agreement=False)
    for m in results["models"].values():
        assert set(m["agreement"]) == GREEDY_KEYS and "agreement" not in m["seconds"]
    assert results["agreement_per_position"] == {} and not (tmp_path / "out" / "agreement_per_position.json").exists()
    _, results = run_eval(root, data, tmp_path / "nll-only", generate=False)  # no replies: nothing to agree with
    assert all("agreement" not in m for m in results["models"].values())


def test_agreement_tie_is_checked_in_one_line(checkpoints):
    root, data = checkpoints
    for tie in (-0.1, math.inf):
        with pytest.raises(OverfillError) as err:
            EvalConfig(data=str(data), checkpoint=str(root / "same"), prompt_field="question", response_field="answer",
                       agreement_tie=tie)
        assert "\n" not in str(err.value) and "--agreement-tie" in str(err.value)



def test_prompts_alone_give_the_agreement_of_the_same_prompts_with_replies(checkpoints, tmp_path):
    root, data = checkpoints
    with_replies = [r for r in map(json.loads, data.read_text().splitlines()) if "answer" in r]
    questions = write_jsonl(tmp_path / "questions.jsonl", [{"question": r["question"]} for r in with_replies])
    _, reference = run_eval(root, data, tmp_path / "replies", nll=False)
    config, alone = run_eval(root, questions, tmp_path / "alone", nll=False, response_field=None)
    assert config.prompts_alone and alone["data"]["prompts_alone"] and not reference["data"]["prompts_alone"]
    assert alone["data"]["examples"] == reference["data"]["examples"] == len(with_replies)
    for name, m in alone["models"].items():
        assert "nll" not in m and "answers" not in m  # nothing to score or grade against
        assert m["agreement"] == reference["models"][name]["agreement"]  # the same contexts, so the same replies
    console = Console(record=True, width=400)
    print_eval_table(console, alone)
    assert f"{len(with_replies)} prompts alone" in console.export_text()


def test_a_chat_file_without_replies_needs_no_nll(checkpoints, tmp_path):
    root, _ = checkpoints
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": q}]}
                                                    for q in ("What is 2 + 2?", "Name a colour.", "Say hi.")])
    entries = (f"full=full:{root / 'same'}", f"other=overfill:{root / 'other'}")
    results = evaluate(EvalConfig(data=str(chats), entries=entries, out=str(tmp_path / "out"), max_new_tokens=6, nll=False))
    assert results["data"]["examples"] == 3 and results["models"]["full"]["agreement"]["top1"] == 1.0
    assert results["models"]["other"]["agreement"]["top1"] < 1.0
    with pytest.raises(OverfillError) as err:  # the reference NLL has nothing to score
        evaluate(EvalConfig(data=str(chats), entries=entries, out=str(tmp_path / "nll")))
    assert "\n" not in str(err.value) and "--no-nll" in str(err.value) and not (tmp_path / "nll").exists()
    with pytest.raises(OverfillError) as err:  # a prompt field alone is refused before any model loads
        EvalConfig(data=str(chats), entries=entries, prompt_field="question")
    assert "\n" not in str(err.value) and "--no-nll" in str(err.value)
