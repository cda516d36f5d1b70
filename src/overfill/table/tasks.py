"""The six tasks of the paper's Table 2, each lm-eval's own task definition pointed at the user's local files.

`write_task_folder` writes, under the run's output folder, one YAML per task that `include`s the lm-eval
task the authors ran (by its absolute path in the installed lm-eval) and overrides only where the data
come from: `dataset_path: json` / `csv` with `data_files` in --data-dir, or, for the paired WMT text files,
a `custom_dataset`. Prompts, stop strings, answer filters and metrics stay lm-eval's. lm-eval then reads
the folder through `TaskManager(include_path=...)`; nothing is copied from --data-dir.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from overfill.errors import OverfillError

PREFIX = "overfill_table_"
SHIM = "overfill_table_docs"  # the module lm-eval's `!function` loads from the task folder


@dataclass(frozen=True)
class TableTask:
    name: str  # the --tasks name and the --data-dir subfolder
    label: str  # the row of the table
    base: str  # the lm-eval task YAML it includes, relative to lm_eval/tasks
    shots: int
    shots_source: str
    metric: str  # lm-eval's result key, "metric,filter"
    metric_label: str
    needs: tuple[str, ...]  # files (glob patterns) the subfolder must hold

    @property
    def lm_eval_name(self) -> str:
        return PREFIX + self.name

    @property
    def percent(self) -> bool:
        """Shares (accuracies) are shown as percentages, as the paper does; BLEU is already on 0-100."""
        return not self.metric.startswith("bleu")


TASKS: dict[str, TableTask] = {t.name: t for t in (
    TableTask("gsm8k", "GSM8K-CoT", "gsm8k/gsm8k-cot-llama.yaml", 8, "lm-eval gsm8k_cot_llama's own 8 CoT examples",
              "exact_match,flexible-extract", "exact match (last number)", ("test.jsonl",)),
    TableTask("arc", "ARC-Challenge", "arc/arc_challenge_chat.yaml", 0, "the authors' script (arc_challenge_chat, 0-shot)",
              "exact_match,remove_whitespace", "exact match (answer letter)", ("arc_challenge/*/*.jsonl*",)),
    TableTask("mmlu", "MMLU", "llama3/instruct/mmlu/_continuation_template_yaml", 5, "lm-eval mmlu_llama's own 5-shot (dev split)",
              "exact_match,strict_match", "exact match (answer letter)", ("test/*_test.csv", "dev/*_dev.csv")),
    TableTask("wmt16_de_en", "WMT16 DE-EN", "translation/wmt16_de-en.yaml", 4, "the authors' script default (4)",
              "bleu,none", "BLEU", ("newstest2016.de", "newstest2016.en")),
    TableTask("ifeval", "IFEval", "ifeval/ifeval.yaml", 0, "lm-eval ifeval (0-shot)",
              "prompt_level_strict_acc,none", "prompt-level strict accuracy", ("input_data.jsonl",)),
    TableTask("nq_open", "NQ", "nq_open/nq_open.yaml", 4, "the authors' script default (4)",
              "exact_match,remove_whitespace", "exact match (any answer)", ("NQ-open.dev.jsonl",)),
)}
TASK_NAMES = tuple(TASKS)


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def check_data(data_dir: Path, names) -> None:
    """Every chosen task's subfolder and files are there (one error line naming the first missing one)."""
    for name in names:
        task = TASKS[name]
        folder = data_dir / name
        if not folder.is_dir():
            raise OverfillError(f"--data-dir {data_dir} has no {name}/ folder (the {task.label} files): add it, or leave "
                                f"{name} out of --tasks")
        for pattern in task.needs:
            if not any(folder.glob(pattern)):
                raise OverfillError(f"--data-dir {data_dir}/{name} has no {pattern}: put the {task.label} files there "
                                    f"(see `overfill table --help`), or leave {name} out of --tasks")


def check_ifeval_scoring() -> None:
    """IFEval is scored by lm-eval's own instruction checkers, which import langdetect and immutabledict: checked
    here, so that a machine without them gets one line before any model loads, not a failure mid-run."""
    import importlib.util

    missing = [m for m in ("langdetect", "immutabledict", "nltk") if importlib.util.find_spec(m) is None]
    if missing:
        raise OverfillError(f"IFEval's scoring (lm-eval's instruction checkers) needs {', '.join(missing)}: "
                            f"pip install {' '.join(missing)} (or 'overfill[eval]'), or leave ifeval out of --tasks")


PUNKT = "nltk punkt_tab"
REGEX_SENTENCES = "IFEval's own regex sentence splitter (nltk's punkt_tab data not installed)"


def ifeval_sentence_counter() -> str:
    """What splits sentences for IFEval's "at most / at least N sentences" and "N words in capitals" rules:
    nltk's punkt_tab data where installed (lm-eval's choice); otherwise the regex splitter IFEval's checkers
    already use for their other sentence rules. lm-eval would download punkt_tab on first import; a run never
    downloads, so without the data the checkers get the regex splitter, and the cell records which one scored it."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        return PUNKT
    except LookupError:
        return REGEX_SENTENCES


def prepare_ifeval_scoring() -> str:
    """Import lm-eval's IFEval checkers without their download, with the sentence counter `ifeval_sentence_counter`
    names; returns that name."""
    import nltk

    counter = ifeval_sentence_counter()
    if counter == PUNKT:
        return counter
    download, nltk.download = nltk.download, lambda *args, **kwargs: False
    try:
        from lm_eval.tasks.ifeval import instructions_util
    finally:
        nltk.download = download

    class RegexSentences:
        tokenize = staticmethod(instructions_util.split_into_sentences)

    class NltkWithRegexSentences:
        """nltk as the checkers see it, but for word_tokenize, which splits sentences with punkt_tab first (for the
        "N words in capitals" rule): here it splits them with the regex splitter."""

        def __getattr__(self, name):
            return getattr(nltk, name)

        @staticmethod
        def word_tokenize(text, language="english", preserve_line=False):
            sentences = [text] if preserve_line else instructions_util.split_into_sentences(text)
            return [word for sentence in sentences for word in nltk.word_tokenize(sentence, language, preserve_line=True)]

    instructions_util._get_sentence_tokenizer = lambda: RegexSentences
    instructions_util.nltk = NltkWithRegexSentences()
    return counter


def _yaml(config: dict, functions: dict[str, str] | None = None) -> str:
    import yaml

    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    return text + "".join(f"{key}: !function {SHIM}.{name}\n" for key, name in (functions or {}).items())


def _local_json(task: TableTask, base: Path, files: dict[str, str], split: str, **more) -> dict:
    return {"include": str(base), "task": task.lm_eval_name, "tag": [], "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": files}, "test_split": split, **more}


def write_task_folder(folder: Path, data_dir: Path, names, limit: int | None) -> dict[str, tuple[str, int | None]]:
    """Write the task YAMLs for `names` into `folder`; per task, (the lm-eval task or group to run, its limit).

    MMLU is one lm-eval task per subject in a group (as lm-eval's own mmlu_llama), each prompted with its own
    subject's five dev examples; a --limit N spreads over the subjects (ceil(N / subjects) questions each; below
    the number of subjects, one question from each of the first N).
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{SHIM}.py").write_text("# Written by `overfill table`: lm-eval loads the data adapters from here.\n"
                                       "from overfill.table.docs import *  # noqa: F401,F403\n")
    base = lm_eval_tasks_dir()
    data_dir = data_dir.resolve()
    plan: dict[str, tuple[str, int | None]] = {}
    for name in names:
        task, where = TASKS[name], data_dir / name
        include = base / task.base
        functions = None
        if name == "gsm8k":
            config = _local_json(task, include, {"test": str(where / "test.jsonl")}, "test")
        elif name == "arc":
            files = sorted(str(p) for p in (where / "arc_challenge").glob("*/*.jsonl*"))
            config = _local_json(task, include, {"test": files}, "test", training_split=None, validation_split=None,
                                 fewshot_split=None)
            functions = {"process_docs": "arc_docs"}
        elif name == "wmt16_de_en":
            config = {"include": str(include), "task": task.lm_eval_name, "tag": [], "dataset_path": "json",
                      "dataset_name": None, "dataset_kwargs": {"folder": str(where)}, "training_split": None,
                      "validation_split": None, "test_split": "test", "fewshot_split": "test"}
            functions = {"custom_dataset": "wmt16_de_en"}
        elif name == "ifeval":
            config = _local_json(task, include, {"train": str(where / "input_data.jsonl")}, "train")
        elif name == "nq_open":
            config = _local_json(task, include, {"validation": str(where / "NQ-open.dev.jsonl")}, "validation",
                                 training_split=None, fewshot_split="validation")
        elif name == "mmlu":
            subjects = sorted(p.name.removesuffix("_test.csv") for p in (where / "test").glob("*_test.csv"))
            if limit is not None and limit < len(subjects):
                subjects = subjects[:limit]  # a quick run: one question from each of the first N subjects
            for subject in subjects:
                dev = where / "dev" / f"{subject}_dev.csv"
                if not dev.is_file():
                    raise OverfillError(f"--data-dir {data_dir}/mmlu has test/{subject}_test.csv but no dev/{subject}_dev.csv "
                                        "(the five few-shot examples of that subject): add it, or remove the test file")
                config = {"include": str(include), "task": f"{task.lm_eval_name}_{subject}", "tag": [],
                          "task_alias": subject, "dataset_path": "csv", "dataset_name": None,
                          "dataset_kwargs": {"data_files": {"test": str(where / "test" / f"{subject}_test.csv"), "dev": str(dev)},
                                             "column_names": list(_mmlu_columns()), "keep_default_na": False},
                          "description": f"The following are multiple choice questions (with answers) about "
                                         f"{subject.replace('_', ' ')}.\n\n", "num_fewshot": task.shots}
                (folder / f"{task.lm_eval_name}_{subject}.yaml").write_text(_yaml(config, {"process_docs": "mmlu_docs"}))
            group = {"group": task.lm_eval_name, "task": [f"{task.lm_eval_name}_{s}" for s in subjects],
                     "aggregate_metric_list": [{"metric": "exact_match", "aggregation": "mean", "weight_by_size": True,
                                                "filter_list": ["strict_match"]}], "metadata": {"version": 1}}
            (folder / f"{task.lm_eval_name}.yaml").write_text(_yaml(group))
            plan[name] = (task.lm_eval_name, None if limit is None else math.ceil(limit / len(subjects)))
            continue
        config["num_fewshot"] = task.shots
        (folder / f"{task.lm_eval_name}.yaml").write_text(_yaml(config, functions))
        plan[name] = (task.lm_eval_name, limit)
    return plan


def _mmlu_columns():
    from overfill.table.docs import MMLU_COLUMNS

    return MMLU_COLUMNS
