import json
import os

import pytest

from overfill import OverfillError
from overfill.data import DataConfig, collate, load_data, load_examples, split_train_val
from tiny import tiny_tokenizer, write_jsonl

TOK = tiny_tokenizer()
END = 2  # <|im_end|>, the end-of-turn token


def ids(text: str) -> list[int]:
    """The tiny tokenizer is byte-level: one id per byte, specials recognised by name."""
    return TOK(text, add_special_tokens=False)["input_ids"]


def only(path, **kw):
    loaded = load_examples(path, TOK, **kw)
    assert len(loaded.examples) == 1, loaded.summary()
    return loaded.examples[0]


def test_chat_messages_split_at_the_final_reply(tmp_path):
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4"}]}
    e = only(write_jsonl(tmp_path / "chat.jsonl", [record]))
    assert e.context_ids == ids("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                                "<|im_start|>assistant\n")
    assert e.target_ids == ids("4") + [END]  # the template's trailing "\n" stays out of the target


def test_turns_after_the_last_reply_are_dropped(tmp_path):
    record = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                           {"role": "user", "content": "unanswered"}]}
    e = only(write_jsonl(tmp_path / "c.jsonl", [record]))
    assert e.context_ids == ids("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")
    assert e.target_ids == ids("A") + [END]


def test_sharegpt(tmp_path):
    record = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Who?"},
                                {"from": "gpt", "value": "Me."}]}
    e = only(write_jsonl(tmp_path / "s.jsonl", [record]))
    assert e.context_ids == ids("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n")
    assert e.target_ids == ids("Me.") + [END]


def test_alpaca_with_and_without_input_in_a_json_array(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "Sort", "input": "b a", "output": "a b"},
                                {"instruction": "Say hi", "input": "", "output": "hi"}], indent=2))
    loaded = load_examples(path, TOK)
    first, second = loaded.examples
    assert first.context_ids == ids("<|im_start|>user\nSort\n\nb a<|im_end|>\n<|im_start|>assistant\n")
    assert first.target_ids == ids("a b") + [END]
    assert second.context_ids == ids("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n")
    assert loaded.unit == "item"


def test_named_fields_gsm8k_style(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "1+1?", "answer": "2\n#### 2", "id": 7}])
    e = only(path, prompt_field="question", response_field="answer")
    assert e.context_ids == ids("<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n")
    assert e.target_ids == ids("2\n#### 2") + [END]
    # the common pairs are recognised without flags too
    assert only(path) == e
    # custom names need the flags
    other = write_jsonl(tmp_path / "o.jsonl", [{"problem": "1+1?", "solution": "2"}])
    assert only(other, prompt_field="problem", response_field="solution").target_ids == ids("2") + [END]
    with pytest.raises(OverfillError, match="unrecognised shape"):
        load_examples(other, TOK)


def test_truncation_keeps_context_end_and_reply_start(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "abcdef", "answer": "uvwxyz"}, {"question": "q", "answer": "a"}])
    full = load_examples(path, TOK).examples[0]
    loaded = load_examples(path, TOK, max_context=5, max_target=3)
    cut = loaded.examples[0]
    assert cut.context_ids == full.context_ids[-5:]
    assert cut.context_ids == ids("tant\n") and cut.target_ids == ids("uvw")
    assert loaded.truncated_contexts == 2 and loaded.truncated_targets == 1
    with pytest.raises(OverfillError, match="max_target must be at least 2"):
        load_examples(path, TOK, max_target=1)


def test_skipped_records_counted_by_reason_with_line_numbers(tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    lines = [
        json.dumps(good),                                                    # 1 ok
        "{not json",                                                         # 2 broken JSON
        json.dumps({"foo": 1}),                                              # 3 unrecognised shape
        json.dumps({"messages": [{"role": "user", "content": "alone"}]}),    # 4 no assistant reply
        "",                                                                  # 5 blank: ignored
        json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}]}),  # 6 empty
        json.dumps({"question": "", "answer": "x"}),                         # 7 empty prompt
        json.dumps([1, 2]),                                                  # 8 not an object
        json.dumps(good),                                                    # 9 ok
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = load_examples(path, TOK)
    assert len(loaded.examples) == 2 and loaded.records == 8
    assert loaded.skipped == {"broken JSON": [2], "unrecognised shape": [3, 8], "no assistant reply": [4],
                              "empty text": [6, 7]}
    summary = loaded.summary()
    assert "8 records -> 2 examples; skipped 6" in summary and "broken JSON: line 2" in summary
    assert "unrecognised shape: lines 3, 8" in summary and "\n" not in summary
    # a limit stops early and forgets what lies beyond
    limited = load_examples(path, TOK, limit=1)
    assert len(limited.examples) == 1 and limited.skipped == {} and limited.records == 1


def test_zero_usable_records_is_one_line_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1}, {"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(OverfillError) as err:
        load_examples(path, TOK)
    message = str(err.value)
    assert "no usable records" in message and "line 1" in message and "line 2" in message and "\n" not in message
    with pytest.raises(OverfillError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl", TOK)


def test_train_validation_split_is_seeded_and_disjoint(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = load_data(DataConfig(data=str(path), val_size=5, seed=1), TOK)
    b = load_data(DataConfig(data=str(path), val_size=5, seed=1), TOK)
    c = load_data(DataConfig(data=str(path), val_size=5, seed=2), TOK)
    assert len(a.train) == 15 and len(a.val) == 5
    assert a.val == b.val and a.val != c.val
    key = lambda e: tuple(e.context_ids)  # noqa: E731
    assert not {key(e) for e in a.train} & {key(e) for e in a.val}
    # a separate validation file: all of --data trains, the first --val-size of the other validates
    val_path = write_jsonl(tmp_path / "v.jsonl", [{"question": "vq", "answer": "va"}] * 3)
    d = load_data(DataConfig(data=str(path), val_data=str(val_path), val_size=2), TOK)
    assert len(d.train) == 20 and len(d.val) == 2
    assert len(load_data(DataConfig(data=str(path), val_size=0, limit=7), TOK).train) == 7
    with pytest.raises(OverfillError, match="cannot be held out"):
        split_train_val(a.train, 15, 0)
    with pytest.raises(OverfillError, match="go together"):
        DataConfig(data=str(path), prompt_field="question")


def test_collate_pads_context_left_and_target_right(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "a", "answer": "bcd"}, {"question": "long q", "answer": "e"}])
    first, second = load_examples(path, TOK).examples
    batch = collate([first, second], pad_id=0)
    assert batch.context_ids[0, -len(first.context_ids):].tolist() == first.context_ids
    assert batch.context_mask[0].tolist() == [0] * 5 + [1] * len(first.context_ids)
    assert batch.target_ids[1].tolist() == second.target_ids + [0, 0]
    assert batch.target_mask[1].tolist() == [1, 1, 0, 0]


def test_template_refusals_and_split_handoffs_are_skipped_not_fatal(tmp_path):
    from overfill.data import ChatTemplateError, chat_ids

    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    rows = [chat, {"messages": [{"role": "system", "content": "be brief"}, *chat["messages"]]}]
    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    strict = tiny_tokenizer()
    strict.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}" + TOK.chat_template
    loaded = load_examples(path, strict)
    assert len(loaded.examples) == 1 and loaded.skipped == {"rejected by the chat template": [2]}
    with pytest.raises(ChatTemplateError, match="no system turns") as err:
        chat_ids(strict, rows[1]["messages"], add_generation_prompt=True)
    assert isinstance(err.value, OverfillError) and "\n" not in str(err.value)
    # A template whose generation prompt differs from how the reply's header renders cannot be split.
    odd = tiny_tokenizer()
    odd.chat_template = TOK.chat_template.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>bot\n{% endif %}")
    with pytest.raises(OverfillError, match="no usable records.*share a token at the handoff"):
        load_examples(path, odd)


def test_utf8_bom_and_line_separators_inside_strings_are_read(tmp_path):
    """Lines are split on newlines only: U+2028 is legal inside a JSON string, and a BOM is not part of the first record."""
    path = tmp_path / "odd.jsonl"
    row = json.dumps({"question": "a\u2028b", "answer": "c d"}, ensure_ascii=False)
    path.write_bytes(b"\xef\xbb\xbf" + (row + "\n" + row + "\n").encode("utf-8"))
    loaded = load_examples(path, TOK, prompt_field="question", response_field="answer")
    assert len(loaded.examples) == 2 and not loaded.skipped


def test_a_json_array_that_is_not_utf8_is_one_error(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'[{"question": "q", "answer": "\xff"}]')
    with pytest.raises(OverfillError, match=r"is not UTF-8 text \(byte 0xff on line 1\)"):
        load_examples(path, TOK, prompt_field="question", response_field="answer")


def test_files_are_checked_by_check_files_not_when_a_config_is_built(tmp_path):
    """A config names files that may not exist yet; the stage's first step, check_files(), refuses them."""
    config = DataConfig(data=str(tmp_path / "later.jsonl"), val_data=str(tmp_path / "val.jsonl"))
    with pytest.raises(OverfillError, match="--data .* does not exist"):
        config.check_files()
    write_jsonl(tmp_path / "later.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(OverfillError, match="--val-data .* does not exist"):
        config.check_files()


UNREADABLE_DATA = {
    # name: (how to make it under tmp_path, what the one error line says)
    "a truncated JSON array": (lambda p: p.write_text('[{"prompt": "a", "response": "b"}, {"prompt": "c", "resp'),
                               "is not valid JSON"),
    "text that is not JSON": (lambda p: p.write_text("prompt,response\na,b\nc,d\n"), "holds no JSON records"),
    "JSON lines that hold no object": (lambda p: p.write_text('1\n"text"\nnull\n'), "holds no JSON records"),
    "a folder": (lambda p: p.mkdir(), "is a folder"),
    "a file on the way": (lambda p: None, "cannot be read (Not a directory)"),
    "a pipe, readable only once": (lambda p: os.mkfifo(p), "is not a regular file"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE_DATA))
def test_check_files_reads_and_parses_the_data(tmp_path, case):
    """The data file is read and parsed by check_files, before any model loads: not only its first bytes sniffed."""
    make, says = UNREADABLE_DATA[case]
    (tmp_path / "afile").write_text("keep")
    data = tmp_path / ("afile/data.jsonl" if case == "a file on the way" else "data.jsonl")
    make(data)
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "a", "response": "b"}])
    for config in (DataConfig(data=str(data)), DataConfig(data=str(val), val_data=str(data))):
        flag = "--val-data" if config.val_data else "--data"
        with pytest.raises(OverfillError) as err:
            config.check_files()
        assert str(err.value).startswith(f"{flag} {data} ") and says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("template", ["{{ messages[0]['content'] - 1 }}", "{{ (messages | length) // 0 }}",
                                      "{{ raise_exception('roles must alternate') }}"])
def test_a_chat_template_that_fails_skips_the_record_with_a_reason(tmp_path, template):
    """A template raises whatever Python raises inside it, not only jinja2's errors: each refuses the record, by name."""
    from overfill.data.examples import ChatTemplateError, chat_ids

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    with pytest.raises(ChatTemplateError, match="chat template refuses this conversation"):
        chat_ids(tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "bb"}])
    with pytest.raises(OverfillError, match="no usable records.*rejected by the chat template"):
        load_examples(path, tokenizer)
