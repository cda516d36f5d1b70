"""The local files in the shape lm-eval's own task definitions expect: lm-eval calls these from the task folder
`tasks.write_task_folder` writes (its YAMLs name them as `!function overfill_table_docs.NAME`).

Each function turns the rows the `datasets` json/csv loader read from the user's --data-dir into the rows of the
hub dataset the lm-eval task was written for, so that its prompt, filters and metric run unchanged:
- arc: AI2's OLMES request lines (one line per answer choice) -> one row per question, as `allenai/ai2_arc`;
- mmlu: the original CSV (question, A, B, C, D, answer letter; no header) -> `cais/mmlu` rows;
- wmt16_de_en: two line-aligned plain-text files -> `wmt16` de-en rows ({"translation": {"de", "en"}}),
  the one data set that no stock `datasets` loader can pair, hence a loader of its own (lm-eval's `custom_dataset`).
"""

from __future__ import annotations

from pathlib import Path

LETTERS = "ABCDEFGH"
MMLU_COLUMNS = ["question", "A", "B", "C", "D", "answer"]


def arc_question(query: str) -> str:
    """The question of an OLMES `doc.query` ("Question: ...\\nAnswer:")."""
    text = query.strip()
    text = text.removeprefix("Question:").strip()
    return text.removesuffix("Answer:").strip()


def arc_rows(lines) -> list[dict]:
    """One `ai2_arc` row per question, from request lines (the first line of each doc.id; the rest repeat it)."""
    rows, seen = [], set()
    for line in lines:
        doc = line["doc"]
        if doc["id"] in seen:
            continue
        seen.add(doc["id"])
        labels = list(LETTERS[: len(doc["choices"])])
        rows.append({"id": doc["id"], "question": arc_question(doc["query"]),
                     "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[int(doc["gold"])]})
    return rows


def arc_docs(dataset):
    import datasets

    return datasets.Dataset.from_list(arc_rows(dataset))


def mmlu_row(row: dict) -> dict:
    return {"question": row["question"], "choices": [str(row[letter]) for letter in "ABCD"],
            "answer": "ABCD".index(str(row["answer"]).strip())}


def mmlu_docs(dataset):
    import datasets

    return datasets.Dataset.from_list([mmlu_row(row) for row in dataset])


def wmt_rows(german: Path, english: Path) -> list[dict]:
    de = Path(german).read_text(encoding="utf-8").splitlines()
    en = Path(english).read_text(encoding="utf-8").splitlines()
    if len(de) != len(en):
        from overfill.errors import OverfillError

        raise OverfillError(f"{german} has {len(de)} lines and {english} {len(en)}: the two files must be line-aligned "
                            "translations of each other")
    return [{"translation": {"de": d, "en": e}} for d, e in zip(de, en)]


def wmt16_de_en(folder: str = "", **_metadata):
    """lm-eval's `custom_dataset`: the test split (few-shot examples are drawn from it, never the example itself)."""
    import datasets

    rows = wmt_rows(Path(folder) / "newstest2016.de", Path(folder) / "newstest2016.en")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
