"""`overfill demo`: the composed prompts (deterministic, varied, held-out topics and wording apart from training) and
the whole pipeline on a tiny random model (distilled replies, both decoders, agreement, the chat comparison), whose
rerun reuses the cached replies and the pruned decoder."""

import io
import json
import math

import pytest
import torch
from rich.console import Console

from overfill.data import load_examples
from overfill.demo import DemoConfig, run_demo
from overfill.demo.families import FAMILIES
from overfill.demo.prompts import CHAT_FAMILIES, chat_prompts, demo_prompts, is_heldout_topic
from overfill.demo.report import gap_closed, verdict
from test_cli import assert_one_line_error, run_cli
from tiny import tiny_model, tiny_tokenizer

EOS = 2


# ---------------------------------------------------------------- the prompts


def test_prompts_are_deterministic_and_the_seed_only_orders_them():
    train, heldout = demo_prompts(0)
    assert (train, heldout) == demo_prompts(0)
    other_train, other_heldout = demo_prompts(1)
    assert [p.text for p in other_train] != [p.text for p in train]
    assert sorted(p.text for p in other_train) == sorted(p.text for p in train)
    assert sorted(p.text for p in other_heldout) == sorted(p.text for p in heldout)


def test_prompts_are_many_and_varied_from_the_first_ones_on():
    train, heldout = demo_prompts(0)
    assert len(train) + len(heldout) >= 2000
    assert len({p.text for p in train}) == len(train) and len({p.text for p in heldout}) == len(heldout)
    assert len(FAMILIES) >= 12
    first = train[: 2 * len(FAMILIES)]  # dealt family by family: a short run already covers every kind
    assert {p.family for p in first} == set(FAMILIES)
    assert {p.family for p in heldout[: len(FAMILIES)]} == set(FAMILIES)
    # every wording of every family but its held-out one is used in training
    assert len({(p.family, p.template) for p in train}) == sum(len(f["templates"]) - 1 for f in FAMILIES.values()) >= 40
    assert len({(p.family, p.topic) for p in train}) >= 300
    lengths = [len(p.text) for p in train]
    assert min(lengths) >= 10 and max(lengths) < 400  # one-line requests up to a short text to summarise


def test_heldout_prompts_share_no_prompt_topic_or_heldout_wording_with_training():
    train, heldout = demo_prompts(0)
    assert not {p.text for p in train} & {p.text for p in heldout}
    for family, spec in FAMILIES.items():
        train_topics = {p.topic for p in train if p.family == family}
        heldout_topics = {p.topic for p in heldout if p.family == family}
        assert heldout_topics and not train_topics & heldout_topics, family
        last = len(spec["templates"]) - 1
        assert last not in {p.template for p in train if p.family == family}, family
        assert last in {p.template for p in heldout if p.family == family}, family
    topics = {family: [t if isinstance(t, tuple) else (t,) for t in spec["topics"]] for family, spec in FAMILIES.items()}
    for p in heldout:
        assert is_heldout_topic(topics[p.family].index(p.topic))
    assert [p.family for p in chat_prompts(heldout)] == list(CHAT_FAMILIES)
    assert all(p in heldout for p in chat_prompts(heldout))


@pytest.mark.parametrize("args, fragment", [(("--loss", "mse"), "--loss got 'mse': pick one of ce, kd, ce+kd"),
                                            (("--prompts", "100000"), "more than the"),
                                            (("--heldout", "0"), "--heldout must be at least 1"),
                                            (("--max-new-tokens", "1"), "at least 2")])
def test_bad_settings_are_one_line(monkeypatch, capsys, tmp_path, args, fragment):
    code, _, err = run_cli(monkeypatch, capsys, "demo", "--out", str(tmp_path / "out"), *args)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_gap_and_verdict():
    assert gap_closed(1.0, 2.0, 1.5) == 0.5
    assert math.isnan(gap_closed(1.2, 1.1, 1.0))
    agreement = {"full": {"top1": 1.0, "nll": 0.5}, "pruned": {"top1": 0.4, "nll": 2.5}, "overfill": {"top1": 0.55, "nll": 1.5}}
    text = verdict(agreement, gap_closed(0.5, 2.5, 1.5), 12)
    assert "55.0% of the time vs 40.0%" in text and "closes 50% of the pruned-to-full NLL gap" in text
    assert "no gap to close" in verdict(agreement, float("nan"), 12)


# ---------------------------------------------------------------- the pipeline on a tiny model


def letters_folder(folder):
    """A tiny Llama that writes lowercase letters and, now and then, its end-of-turn token: some replies end
    before the demo's length limit and some are cut there, as the real model's do."""
    model, tokenizer = tiny_model("llama", tie_word_embeddings=False), tiny_tokenizer()
    keep = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    keep[tokenizer.convert_tokens_to_ids(list("abcdefghijklmnopqrstuvwxyz"))] = True
    keep[EOS] = True
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0
        model.lm_head.weight[EOS] *= 2.5
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder), tokenizer


def test_demo_end_to_end_on_a_tiny_model_and_its_rerun(tmp_path):
    model, tokenizer = letters_folder(tmp_path / "full")
    config = dict(model=model, ratio=0.5, out=str(tmp_path / "demo"), prompts=24, max_new_tokens=10, steps=2, batch_size=4, heldout=4,
                  engine="torch")  # vLLM's CPU attention refuses the tiny model's head_dim
    text = io.StringIO()
    summary = run_demo(DemoConfig(**config), Console(file=text, width=200))
    out = tmp_path / "demo"
    data = summary["data"]
    assert data["generated"] == 24 and data["reused"] == 0

    # Training data: every reply, those cut at the limit learnt without an end-of-turn token.
    replies = [json.loads(line) for line in open(data["replies"], encoding="utf-8")]
    assert len(replies) == 24
    assert [json.loads(line) for line in open(out / "data" / "train.jsonl", encoding="utf-8")] == replies
    train_config = json.loads((out / "train-overfill" / "train_config.json").read_text())
    assert train_config["max_target"] == 10 and train_config["loss"] == "ce" and train_config["mode"] == "overfill"
    examples = load_examples(out / "data" / "train.jsonl", tokenizer, max_target=train_config["max_target"]).examples
    ended = [e for e in examples if e.target_ids[-1] == EOS]
    cut = [e for e in examples if e.target_ids[-1] != EOS]
    assert data["ended"] == len(ended) > 2 and data["cut"] == len(cut) > 2
    assert all(len(e.target_ids) <= 10 for e in ended) and all(len(e.target_ids) == 10 for e in cut)

    # Agreement: the frontier's eval figures, the full model agreeing with its own greedy replies.
    results = json.loads((out / "frontier" / "quality" / "results.json").read_text())
    assert results["data"]["examples"] == 4
    for name in ("full", "overfill", "pruned", "overfill+refresh8"):
        assert summary["agreement"][name]["top1"] == results["models"][name]["agreement"]["top1"]
    assert summary["agreement"]["full"]["top1"] == 1.0
    points = {p["name"]: p for p in summary["frontier"]["points"]}
    assert points["overfill+spec3"]["top1"] == 1.0 and points["overfill+spec3"]["acceptance_rate"] is not None
    assert (out / "frontier" / "quality" / "agreement_per_position.png").is_file() and (out / "validation_loss.png").is_file()
    assert (out / "frontier" / "frontier.png").is_file()
    assert set(points) == set(summary["agreement"]) | {"overfill+spec3"}

    report = (out / "report.md").read_text()
    assert (report.index("## Agreement with the full model") < report.index("## The dial") < report.index("## Chat")
            < report.index("## Training"))
    overfill = summary["agreement"]["overfill"]
    assert f"| OverFill | overfill | {overfill['top1']:.1%} | {overfill['nll']:.3f} |" in report
    assert f"**{summary['verdict']}**" in report

    # The chat comparison: held-out prompts, three models each, with timings, in the report and the terminal.
    assert len(summary["chat"]) == len(CHAT_FAMILIES)
    heldout_texts = {p.text for p in demo_prompts(0)[1]}
    for turn in summary["chat"]:
        assert turn["prompt"] in heldout_texts and turn["prompt"] in report
        assert list(turn["replies"]) == ["full", "speculative", "refresh", "overfill", "pruned"]
        for mode, reply in turn["replies"].items():
            assert 1 <= reply["new_tokens"] <= 10 and reply["prefill_s"] > 0
        assert turn["replies"]["speculative"]["text"] == turn["replies"]["full"]["text"]  # lossless
    first = summary["chat"][0]["replies"]
    assert f"> {first['overfill']['text'].strip().splitlines()[0]}" in report
    assert "tokens in" in report and "tok/s decoding" in report
    assert "OverFill" in text.getvalue() and summary["chat"][0]["prompt"][:40] in text.getvalue()

    # A rerun reuses the replies (none generated) and the pruned decoder (not pruned again).
    pruning = out / "pruned-0.5" / "pruning.json"
    stamp, replies_bytes = pruning.stat().st_mtime_ns, open(data["replies"], "rb").read()
    text = io.StringIO()
    again = run_demo(DemoConfig(**config, prompt="Say hello."), Console(file=text, width=200))
    assert again["data"]["generated"] == 0 and again["data"]["reused"] == 24
    assert pruning.stat().st_mtime_ns == stamp and open(data["replies"], "rb").read() == replies_bytes
    assert "reusing the pruned decoder" in text.getvalue()
    assert again["agreement"]["overfill"]["top1"] == overfill["top1"]  # same data, same seed: the same decoder
    assert [t["prompt"] for t in again["chat"]][-1] == "Say hello." and len(again["chat"]) == len(CHAT_FAMILIES) + 1


@pytest.mark.parametrize("content", ['{"source_model": "m", "config": {"ra', "[]", '{"config": 0.25}', b"\xff"])
def test_a_pruning_record_that_cannot_be_read_is_pruned_again(monkeypatch, tmp_path, content):
    """The demo reuses a pruned decoder whose pruning.json reads as one of these settings; anything else is pruned again."""
    from types import SimpleNamespace

    from rich.console import Console

    from overfill.demo import run as demo_run

    config = DemoConfig(model="m", out=str(tmp_path), quick=True, device="cpu")
    folder = tmp_path / f"pruned-{config.ratio:g}"
    folder.mkdir()
    (folder / "pruning.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    pruned = []
    monkeypatch.setattr("overfill.prune.prune", lambda prune_config: pruned.append(prune_config) or SimpleNamespace(record={}))
    monkeypatch.setattr("overfill.prune_report.print_prune_summary", lambda *args: None)
    assert demo_run._pruned(config, Console(file=io.StringIO())) == folder
    assert len(pruned) == 1 and pruned[0].force
