"""Evaluation metrics against hand-computed values, and the lm-eval adapter end to end on tiny models."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from overfill.data import Example
from overfill.errors import OverfillError
from overfill.evaluation import EvalConfig, evaluate, parse_entry
from overfill.evaluation.answers import answer_accuracy, extract_answer, reference_answer
from overfill.evaluation.metrics import nll_summary, per_position
from overfill.evaluation.scoring import TokenScores, score_examples
from overfill.modeling import OverFillModel
from tiny import save_tiny, tiny_model, tiny_tokenizer, write_jsonl

# The harness must never reach the hub here (set before `datasets` is first imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = [
    Example([1, 40, 41, 42, 43, 44], [60, 61, 62, 2]),
    Example([1, 50, 51], [70, 2]),
    Example([1, 40, 41, 42, 43, 44, 45, 46, 47], [80]),
]


def pair(seed_decoder: int | None = None) -> OverFillModel:
    """Full model + decoder (a copy of the full model, or another tiny model of the same shape)."""
    decoder = tiny_model(seed=0 if seed_decoder is None else seed_decoder)
    return OverFillModel(tiny_model(seed=0), decoder, tiny_tokenizer())


def by_hand(model, example: Example) -> list[float]:
    """log p(y_i | x, y_<i) from one unpadded forward over context + target."""
    ids = torch.tensor([example.context_ids + example.target_ids])
    with torch.no_grad():
        logprobs = model(ids).logits[0].log_softmax(-1)
    start = len(example.context_ids) - 1
    return [logprobs[start + i, y].item() for i, y in enumerate(example.target_ids)]


def by_hand_top1(model, example: Example) -> list[bool]:
    """Whether each target token is the argmax, from one unpadded forward over context + target."""
    ids = torch.tensor([example.context_ids + example.target_ids])
    with torch.no_grad():
        logits = model(ids).logits[0]
    start = len(example.context_ids) - 1
    return [int(logits[start + i].argmax()) == y for i, y in enumerate(example.target_ids)]


def overfill_logprobs(full, decoder, context: list[int], target: list[int]) -> list[float]:
    """log p(y_i): y1 from the full model's prefill of the context, y2..yN from `decoder` on that cache."""
    with torch.no_grad():
        out = full(torch.tensor([context]), use_cache=True)
        logprobs = [out.logits[0, -1].log_softmax(-1)[target[0]].item()]
        if len(target) > 1:
            positions = torch.arange(len(context), len(context) + len(target) - 1)[None]
            rest = decoder(torch.tensor([target[:-1]]), past_key_values=out.past_key_values, position_ids=positions).logits[0]
            logprobs += rest.log_softmax(-1).gather(-1, torch.tensor(target[1:])[:, None]).squeeze(-1).tolist()
    return logprobs


def greedy_overfill(full, decoder, context: list[int], n: int) -> list[int]:
    """n greedy tokens: the full model's first from its prefill, then `decoder` extending that cache."""
    with torch.no_grad():
        out = full(torch.tensor([context]), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        cache = out.past_key_values
        while len(tokens) < n:
            position = torch.tensor([[len(context) + len(tokens) - 1]])
            logits = decoder(torch.tensor([tokens[-1:]]), past_key_values=cache, position_ids=position).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tokens


# ---------------------------------------------------------------- answers


def test_gsm8k_answer_extraction():
    assert reference_answer("3 + 2 = <<3+2=5>>5 apples.\n#### 5") == "5"
    assert reference_answer("so $1,234.50 in all\n#### 1,234.50") == "1234.5"
    assert reference_answer("no final answer") is None
    assert extract_answer("He pays 3 * 4 = 12 dollars, then 12 + 6 = 18.") == "18"  # the last number
    assert extract_answer("#### $18.00\nQuestion: what about 7?") == "18"  # the number after ####
    assert extract_answer("The answer is -3.") == "-3"
    assert extract_answer("I don't know") is None


def test_answer_accuracy_by_hand():
    result = answer_accuracy(["so 5 in all", "#### 7", "12", "anything"], ["so", "####", "12", "x"], ["5", "12", "12", None])
    assert result == {"accuracy": 2 / 3, "graded": 3, "correct": 2, "correct_from_first_token": 1}


# ---------------------------------------------------------------- metrics by hand


def test_nll_and_per_position_by_hand():
    p = [[0.5, 0.25, 1.0], [0.1, 0.5]]
    scores = [TokenScores([math.log(x) for x in row], [True, False, True][: len(row)]) for row in p]
    s = nll_summary(scores)
    assert s["nll_token1"] == pytest.approx(-(math.log(0.5) + math.log(0.1)) / 2)
    assert s["nll"] == pytest.approx(-(math.log(0.25) + math.log(1.0) + math.log(0.5)) / 3)
    assert s["ppl"] == pytest.approx(math.exp(s["nll"]))
    total = -sum(math.log(x) for row in p for x in row)
    assert s["nll_all"] == pytest.approx(total / 5)
    assert s["token1_share_of_nll"] == pytest.approx(-(math.log(0.5) + math.log(0.1)) / total)
    assert s["top1_token1"] == 1.0 and s["top1"] == pytest.approx(1 / 3) and s["tokens"] == 3
    pos = per_position(scores)
    assert pos["position"] == [1, 2, 3] and pos["count"] == [2, 2, 1]
    assert pos["mean_prob"] == pytest.approx([0.3, 0.375, 1.0])
    assert pos["mean_nll"] == pytest.approx([-(math.log(0.5) + math.log(0.1)) / 2, -(math.log(0.25) + math.log(0.5)) / 2, 0.0])
    assert pos["top1"] == [1.0, 0.0, 1.0]


def test_full_mode_scores_match_one_forward_under_left_padding():
    model = pair()
    scores = score_examples(model, "full", EXAMPLES, batch_size=3)  # one left-padded batch
    for example, s in zip(EXAMPLES, scores, strict=True):
        assert s.logprobs == pytest.approx(by_hand(model.full, example), abs=1e-4)
        assert len(s.top1) == len(example.target_ids)


def test_overfill_mode_token1_is_the_full_models_and_the_rest_the_decoders():
    model = pair(seed_decoder=1)
    full = score_examples(model, "full", EXAMPLES, batch_size=2)
    overfill = score_examples(model, "overfill", EXAMPLES, batch_size=2)
    pruned = score_examples(model, "pruned", EXAMPLES, batch_size=2)
    for example, f, o, p in zip(EXAMPLES, full, overfill, pruned, strict=True):
        assert o.logprobs[0] == pytest.approx(f.logprobs[0], abs=1e-5)
        assert p.logprobs == pytest.approx(by_hand(model.decoder, example), abs=1e-4)
        # Tokens 2..N by hand: the decoder continues the full model's cache of the context.
        with torch.no_grad():
            cache = model.full(torch.tensor([example.context_ids]), use_cache=True).past_key_values
            if len(example.target_ids) > 1:
                logits = model.decoder(torch.tensor([example.target_ids[:-1]]), past_key_values=cache).logits[0]
                expected = logits.log_softmax(-1).gather(-1, torch.tensor(example.target_ids[1:])[:, None]).squeeze(-1)
                assert o.logprobs[1:] == pytest.approx(expected.tolist(), abs=1e-4)
    # With decoder == full model, OverFill is the full model.
    same = pair()
    for a, b in zip(score_examples(same, "overfill", EXAMPLES), score_examples(same, "full", EXAMPLES), strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    full, tok = save_tiny(root / "full", seed=0)
    OverFillModel(full, tiny_model(seed=1), tok, full_source=str(root / "full")).save_pretrained(root / "ckpt")
    data = write_jsonl(root / "held_out.jsonl", [
        {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = 5\n#### 5"},
        {"question": "4 pens per box, 3 boxes?", "answer": "4 * 3 = 12\n#### 12"},
        {"question": "no answer here"},
        {"question": "10 - 7?", "answer": "10 - 7 = 3\n#### 3"},
    ])
    return root, data


def test_evaluate_writes_results_and_plot(tiny_checkpoint, tmp_path):
    root, data = tiny_checkpoint
    config = EvalConfig(data=str(data), entries=("full", "pruned", "ours=overfill"), checkpoint=str(root / "ckpt"),
                        prompt_field="question", response_field="answer", out=str(tmp_path / "out"), max_new_tokens=6)
    results = evaluate(config)
    assert results["data"]["examples"] == 3 and sum(map(len, results["data"]["skipped"].values())) == 1 and results["data"]["answer"] == "gsm8k"
    m = results["models"]
    assert set(m) == {"full", "pruned", "ours"}
    assert m["ours"]["nll_token1"] == pytest.approx(m["full"]["nll_token1"], abs=1e-5)  # y1 is the full model's
    assert m["full"]["agreement"]["exact_match"] == 1.0 and m["ours"]["agreement"]["token1_match"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "out" / "replies.jsonl").read_text().splitlines()]
    ours = [r for r in rows if r["model"] == "ours"]
    assert [r["reference_answer"] for r in ours] == ["5", "12", "3"]  # the record without an answer was skipped
    answers = m["ours"]["answers"]
    assert answers["graded"] == 3 and answers["correct"] == sum(r["answer"] == r["reference_answer"] for r in ours)
    assert answers["accuracy"] == pytest.approx(answers["correct"] / 3)
    for name in ("results.json", "per_position.json", "per_position.png", "replies.jsonl"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "per_position.json").read_text())
    assert saved["ours"]["count"][0] == 3


def test_evaluate_with_a_refresh_sweep(tiny_checkpoint, tmp_path):
    root, data = tiny_checkpoint
    config = EvalConfig(data=str(data), entries=("full", "overfill"), checkpoint=str(root / "ckpt"), refresh_every=(1, 2, 500),
                        prompt_field="question", response_field="answer", out=str(tmp_path / "out"), max_new_tokens=6)
    results = evaluate(config)
    m = results["models"]
    assert list(m) == ["full", "overfill", "overfill+refresh1", "overfill+refresh2", "overfill+refresh500"]
    # K past every reply: plain OverFill. K = 1: the full model picks every token, so it scores as the full model.
    assert m["overfill+refresh500"]["nll"] == pytest.approx(m["overfill"]["nll"], abs=1e-6)
    assert m["overfill+refresh1"]["nll"] == pytest.approx(m["full"]["nll"], abs=1e-4)
    assert abs(m["overfill+refresh2"]["nll"] - m["overfill"]["nll"]) > 1e-3  # a real refresh changes the scores
    assert m["overfill+refresh2"]["refresh_every"] == 2 and "refresh_every" not in m["overfill"]
    # Greedy replies with refresh every token are the full model's.
    assert m["overfill+refresh1"]["agreement"]["exact_match"] == 1.0
    closed = {r["name"]: r["gap_closed"] for r in results["refresh"]}
    assert closed["overfill+refresh1"] == pytest.approx(1.0, abs=1e-3) and closed["overfill+refresh500"] == pytest.approx(0.0, abs=1e-5)
    assert set(json.loads((tmp_path / "out" / "per_position.json").read_text())) == set(m)


def test_evaluate_speculative_entries(tiny_checkpoint, tmp_path):
    root, data = tiny_checkpoint
    config = EvalConfig(data=str(data), entries=("full", "overfill"), checkpoint=str(root / "ckpt"), draft_tokens=(2, 3),
                        drafters=("overfill", "pruned"), prompt_field="question", response_field="answer",
                        out=str(tmp_path / "out"), max_new_tokens=8, batch_size=2)
    m = evaluate(config)["models"]
    spec = ["overfill+spec2", "overfill+spec2/pruned", "overfill+spec3", "overfill+spec3/pruned"]
    assert list(m) == ["full", "overfill", *spec]
    for name in spec:
        # Lossless: the full model's own greedy replies, and its own scores under teacher forcing.
        assert m[name]["agreement"]["exact_match"] == 1.0 and m[name]["agreement"]["top1"] == pytest.approx(1.0)
        assert m[name]["nll"] == pytest.approx(m["full"]["nll"], abs=1e-6)
        counters = m[name]["speculation"]
        assert 0 <= counters["accepted"] <= counters["drafted"] and counters["rounds"] > 0
        assert 1 <= counters["tokens_per_full_pass"] <= m[name]["draft_tokens"] + 1
    assert m["overfill+spec3/pruned"]["drafter"] == "pruned" and "speculation" not in m["overfill"]
    # The tiny decoder disagrees with the full model somewhere, so this is not the full model renamed.
    assert m["overfill"]["agreement"]["exact_match"] < 1.0


def test_eval_config_errors_are_one_line(tiny_checkpoint):
    _, data = tiny_checkpoint
    cases = [
        dict(data="missing.jsonl", checkpoint="x"),
        dict(data=str(data), entries=("speculative",), checkpoint="x"),
        dict(data=str(data), entries=("overfill", "overfill:other"), checkpoint="x"),
        dict(data=str(data), entries=("pruned",), model="smollm2-135m-instruct"),
        dict(data=str(data), checkpoint="x", prompt_field="question"),
        dict(data=str(data), checkpoint="x", batch_size=0),
        dict(data=str(data), checkpoint="x", refresh_every=(8, "x")),
        dict(data=str(data), checkpoint="x", refresh_every=(0,)),
        dict(data=str(data), checkpoint="x", entries=("full",), refresh_every=(8,)),
        dict(data=str(data), checkpoint="x", engine="vllm", refresh_every=(8,)),
        dict(data=str(data), checkpoint="x", draft_tokens=0),
        dict(data=str(data), checkpoint="x", draft_tokens=2, drafters="big"),
        dict(data=str(data), checkpoint="x", entries=("full",), draft_tokens=(2,)),
        dict(data=str(data), checkpoint="x", engine="vllm", draft_tokens=(2,)),
    ]
    for kwargs in cases:
        with pytest.raises(OverfillError) as err:
            EvalConfig(**kwargs).check_files()
        assert "\n" not in str(err.value)
    entry = parse_entry("base=pruned:runs/a")
    assert (entry.name, entry.mode, entry.checkpoint) == ("base", "pruned", "runs/a")
    entry = parse_entry("full")  # no name: named after its mode; no checkpoint: the shared source
    assert (entry.name, entry.mode, entry.checkpoint) == ("full", "full", None)
    # an '=' after the ':' belongs to the checkpoint path, not to a name
    entry = parse_entry("overfill:runs/lr=2e-4")
    assert (entry.name, entry.mode, entry.checkpoint) == ("overfill", "overfill", "runs/lr=2e-4")


def test_an_entry_may_carry_its_own_dials():
    """An entry named like a variant is that variant; the global flags then vary only the entries without dials."""
    entry = parse_entry("fast=overfill@int8+spec2/pruned:runs/a")
    assert (entry.name, entry.mode, entry.checkpoint, entry.decoder_dtype, entry.draft_tokens, entry.drafter,
            entry.refresh_every) == ("fast", "overfill", "runs/a", "int8", 2, "pruned", 0)
    entry = parse_entry("overfill+refresh16:runs/r")  # no name: the configuration's own text
    assert (entry.name, entry.refresh_every, entry.draft_tokens, entry.decoder_dtype) == ("overfill+refresh16", 16, 0, None)
    config = EvalConfig(data="x.jsonl", checkpoint="c", entries=("full", "overfill", "overfill@int8+spec4", "r=overfill+refresh8"),
                        refresh_every=(32,), draft_tokens=(2,), drafters=("overfill",), decoder_dtypes=("bfloat16",))
    names = [e.name for e in config.model_entries()]
    assert names == ["full", "overfill", "overfill+refresh32", "overfill+spec2", "overfill@bfloat16", "overfill@int8+spec4", "r"]
    for bad in ("pruned@int8", "overfill@int4", "overfill+spec2/big", "overfill+spec0", "overfill+refreshX", "overfill+spec2+refresh8", "overfill+refresh8+spec2"):
        with pytest.raises(OverfillError) as err:
            parse_entry(bad)
        assert "\n" not in str(err.value) and "entry" in str(err.value)
    with pytest.raises(OverfillError, match="--engine torch"):
        EvalConfig(data="x.jsonl", checkpoint="c", entries=("overfill+spec2",), engine="vllm", nll=False)


# ---------------------------------------------------------------- lm-eval adapter


def test_lm_eval_adapter_loglikelihood_by_hand(tiny_checkpoint):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from overfill.evaluation.lm_eval import OverFillLM

    root, _ = tiny_checkpoint
    lm = OverFillLM(path=str(root / "ckpt"), mode="overfill")
    full_lm = OverFillLM(model=str(root / "full"), mode="full")
    requests = [Instance("loglikelihood", {}, ("Question: 3 + 2?\nAnswer:", " 5"), 0),
                Instance("loglikelihood", {}, ("Question: 3 + 2?\nAnswer:", " 5 apples"), 1)]
    ours, theirs = lm.loglikelihood(requests), full_lm.loglikelihood(requests)
    # One continuation token: scored by the full model alone, whatever the decoder.
    context, continuation = lm.tok_encode("Question: 3 + 2?\nAnswer:"), lm.tok_encode(" 5")
    assert len(continuation) == 2  # byte-level tiny tokenizer: ' ' and '5'
    expected = by_hand(full_lm.model.full, Example(context, continuation))
    assert theirs[0][0] == pytest.approx(sum(expected), abs=1e-4)
    assert ours[0][0] != pytest.approx(theirs[0][0])  # the second token is the decoder's
    assert len(ours) == len(theirs) == 2
    # overfill by hand: the full model scores ' ' after the context, the decoder scores '5' on the full model's cache
    full, decoder = lm.model.full, lm.model.decoder
    assert ours[0][0] == pytest.approx(sum(overfill_logprobs(full, decoder, context, continuation)), abs=1e-4)
    assert ours[0][1] == (greedy_overfill(full, decoder, context, 2) == continuation)
    assert theirs[0][1] == all(by_hand_top1(full, Example(context, continuation)))
    longer = lm.tok_encode(" 5 apples")
    assert ours[1][0] == pytest.approx(sum(overfill_logprobs(full, decoder, context, longer)), abs=1e-4)
    assert theirs[1][0] == pytest.approx(sum(by_hand(full, Example(context, longer))), abs=1e-4)

    # is_greedy: true for the continuation greedy decoding writes (full model's y1, then the decoder's), false
    # once one token is not the argmax; both models' choices differ, so the mode decides which one is greedy.
    greedy = greedy_overfill(full, decoder, context, 4)
    full_greedy = greedy_overfill(full, full, context, 4)
    assert greedy != full_greedy
    wrong_last = greedy[:-1] + [(greedy[-1] + 1 - 3) % 256 + 3]  # any other byte token
    requests = [(None, context, greedy), (None, context, wrong_last), (None, context, full_greedy)]
    assert [greedy_flag for _, greedy_flag in lm._loglikelihood_tokens(requests)] == [True, False, False]
    assert [greedy_flag for _, greedy_flag in full_lm._loglikelihood_tokens(requests)] == [False, False, True]


def test_lm_eval_adapter_runs_local_tasks_end_to_end(tiny_checkpoint, monkeypatch):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import overfill.evaluation.lm_eval  # noqa: F401  registers --model overfill

    root, _ = tiny_checkpoint
    monkeypatch.chdir(REPO)  # the task files name their data relative to the repository root
    tasks = ["overfill_two_questions_gen", "overfill_two_questions_mc", "overfill_two_questions_ppl"]
    results = lm_eval.simple_evaluate(
        model="overfill", model_args=f"path={root / 'ckpt'},mode=overfill,max_gen_toks=8", tasks=tasks,
        task_manager=TaskManager(include_path=str(REPO / "tests" / "lm_eval_task"), include_defaults=False),
        batch_size=4, device="cpu", log_samples=True,
    )
    scores = results["results"]
    assert scores["overfill_two_questions_gen"]["exact_match,last-number"] in (0.0, 0.5, 1.0)
    assert scores["overfill_two_questions_ppl"]["byte_perplexity,none"] > 1
    generated = results["samples"]["overfill_two_questions_gen"]
    assert len(generated) == 2 and all(isinstance(s["resps"][0][0], str) for s in generated)
    # multiple choice by hand: each choice scored as overfill scores it (the full model's first token, the
    # decoder's rest), the highest log-likelihood is the answer
    model, tok = OverFillModel.from_pretrained(root / "ckpt"), tiny_tokenizer()
    rows = [json.loads(line) for line in (REPO / "tests" / "lm_eval_task" / "two_questions.jsonl").read_text().splitlines()]
    hits = []
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        ids = tok(context, add_special_tokens=False)["input_ids"]
        lls = [sum(overfill_logprobs(model.full, model.decoder, ids, tok(" " + c, add_special_tokens=False)["input_ids"]))
               for c in row["choices"]]
        hits.append(max(range(len(lls)), key=lls.__getitem__) == row["label"])
    assert scores["overfill_two_questions_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    # generate_until by hand: greedy overfill for the task's 64 tokens, the end token dropped, cut at the
    # first of the task's stop strings
    stops = ("Question:", "\n\n")
    for sample in generated:
        context = f"Question: {sample['doc']['question']}\nAnswer:"
        reply = greedy_overfill(model.full, model.decoder, tok(context, add_special_tokens=False)["input_ids"], 64)
        reply = reply[: reply.index(tok.eos_token_id)] if tok.eos_token_id in reply else reply
        text = tok.decode(reply, skip_special_tokens=True)
        text = text[: min([text.index(s) for s in stops if s in text] + [len(text)])]
        assert sample["resps"][0][0] == text


def test_refresh_gap_is_measured_against_the_same_checkpoints_plain_entry():
    """The plain entry is found by what it is (checkpoint, dtype, no dials), not by name: an entry with its own
    refresh dial and no plain sibling is left out rather than failing the whole run at its end."""
    from overfill.evaluation.run import refresh_summary

    entries = [parse_entry(s) for s in ("full", "overfill", "overfill+refresh4", "r=overfill+refresh8:runs/r",
                                        "base=overfill:runs/b", "b8=overfill+refresh8:runs/b")]
    models = {"full": {"nll": 1.0}, "overfill": {"nll": 2.0}, "overfill+refresh4": {"nll": 1.5}, "r": {"nll": 1.2},
              "base": {"nll": 3.0}, "b8": {"nll": 2.0}}
    summary = {row["name"]: row for row in refresh_summary(entries, models)}
    assert set(summary) == {"overfill+refresh4", "b8"}
    assert summary["overfill+refresh4"]["gap_closed"] == pytest.approx(0.5)
    assert summary["b8"]["plain_nll"] == 3.0 and summary["b8"]["gap_closed"] == pytest.approx(0.5)


def test_an_entry_named_compiled_generates_with_the_compiled_step(monkeypatch):
    """+compiled is the entry's own step; without it the run's --compile choice stands."""
    from types import SimpleNamespace

    from overfill.evaluation import run

    asked = []
    monkeypatch.setattr(run, "generate_ids_batched", lambda *args, **kwargs: asked.append(kwargs["compile"]) or [])
    config = SimpleNamespace(engine="torch", max_new_tokens=4, batch_size=1)
    for name in ("overfill+compiled", "overfill+spec2+compiled", "overfill"):
        run.greedy_replies(config, "overfill", [[1, 2]], {0}, model=None, source=None, entry=parse_entry(name), compile=False)
    assert asked == [True, True, False]
    assert parse_entry("overfill+compiled").name == "overfill+compiled"
    with pytest.raises(OverfillError, match="--engine torch"):
        EvalConfig(data="x.jsonl", checkpoint="c", entries=("overfill+compiled",), engine="vllm", nll=False)
