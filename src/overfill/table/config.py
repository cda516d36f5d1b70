"""`overfill table`'s settings: which models fill the three columns, which local task files fill the rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from overfill.config import as_tuple, at_least, comma_list
from overfill.engines import Engine, check_engine
from overfill.errors import OverfillError
from overfill.model_source import FullModelSource
from overfill.table.tasks import TASK_NAMES, TASKS

CONFIGURATIONS = ("full", "pruned", "overfill")
QUICK = {"limit": 2, "max_gen_toks": 16}  # the small preset: a few examples per task, short replies


@dataclass
class TableConfig(FullModelSource):
    data_dir: str = ""
    """Folder holding the task files, one subfolder per task: gsm8k/test.jsonl; arc/arc_challenge/*/requests.jsonl.gz (AI2's OLMES request lines); mmlu/test/*_test.csv + mmlu/dev/*_dev.csv (no header: question, A-D, answer letter); wmt16_de_en/newstest2016.de + .en (line-aligned); ifeval/input_data.jsonl; nq_open/NQ-open.dev.jsonl. Read in place, never copied."""
    out: str = "runs/table"
    """Output folder: table.json, table.md, table.png, and cells/ (one file per task and configuration: a rerun keeps finished ones)."""
    overfill: str | None = None
    """The OverFill column: a checkpoint folder from `overfill train` (the full model prefills, its decoder decodes), or a pruned decoder folder paired with --model."""
    pruned: str | None = None
    """The pruned column: the standalone baseline, a checkpoint trained with `overfill train --mode pruned` (or a pruned decoder folder); it prefills and decodes alone."""
    configurations: tuple[str, ...] = comma_list(CONFIGURATIONS)
    """Columns to fill (repeat or comma-separate): full, pruned, overfill."""
    tasks: tuple[str, ...] = comma_list(TASK_NAMES)
    """Rows to fill (repeat or comma-separate): gsm8k, arc, mmlu, wmt16_de_en, ifeval, nq_open."""
    limit: int | None = None
    """Evaluate only the first N examples of each task (MMLU: N spread over its subjects, one each from the first N subjects when N is smaller)."""
    max_gen_toks: int | None = None
    """Cap on every reply's length in tokens (default: each lm-eval task's own)."""
    batch_size: int = 8
    """Prompts generated together."""
    chat_template: bool | None = None
    """Prompt through the tokenizer's chat template, few-shot examples as earlier turns, as the paper does (default: when the tokenizer has one)."""
    engine: Engine = "torch"
    """What generates the replies: torch (our own two-stage loop) or vllm (the vLLM plugin's engine, one per configuration, in its own process; needs overfill[vllm]). Scoring is lm-eval's either way."""
    compile: bool | None = None
    """With --engine torch: a compiled decode step (--compile), eager (--no-compile), or decided by device and workload (default)."""
    quick: bool = False
    """The small preset: 2 examples per task and replies of at most 16 tokens (a plumbing check, not a measurement)."""
    force: bool = False
    """Recompute every cell, even finished ones."""

    def __post_init__(self):
        super().__post_init__()
        if self.quick:
            self.limit = self.limit or QUICK["limit"]
            self.max_gen_toks = self.max_gen_toks or QUICK["max_gen_toks"]
        self.configurations = tuple(dict.fromkeys(c.strip() for c in as_tuple(self.configurations) if c.strip()))
        self.tasks = tuple(dict.fromkeys(t.strip() for t in as_tuple(self.tasks) if t.strip()))
        for c in self.configurations:
            if c not in CONFIGURATIONS:
                raise OverfillError(f"--configurations got '{c}': pick from {', '.join(CONFIGURATIONS)}")
        for t in self.tasks:
            if t not in TASKS:
                raise OverfillError(f"--tasks got '{t}': pick from {', '.join(TASK_NAMES)}")
        if not self.configurations or not self.tasks:
            raise OverfillError("nothing to evaluate: pass at least one of --configurations and of --tasks")
        if not self.data_dir:
            raise OverfillError("table needs --data-dir: the folder holding the task files (see `overfill table --help`)")
        for column in ("pruned", "overfill"):
            if column in self.configurations and not getattr(self, column):
                raise OverfillError(f"the {column} column needs --{column} FOLDER (a checkpoint or a pruned decoder folder), "
                                    f"or leave {column} out of --configurations")
        at_least(self, 1, "limit", "max_gen_toks", "batch_size")
        check_engine(self.engine)

    def check_files(self) -> None:
        from overfill.atomic import check_writable
        from overfill.table.tasks import check_data, check_ifeval_scoring

        data_dir = Path(self.data_dir).expanduser()
        if not data_dir.is_dir():
            raise OverfillError(f"--data-dir {data_dir} is not a folder: pass the folder holding the task subfolders")
        check_data(data_dir, self.tasks)
        for column in ("pruned", "overfill"):
            folder = getattr(self, column)
            if column in self.configurations and not (Path(folder).expanduser() / "config.json").is_file() \
                    and not (Path(folder).expanduser() / "overfill.json").is_file():
                raise OverfillError(f"--{column} {folder} is not a checkpoint or model folder (no overfill.json or config.json): "
                                    "pass the folder `overfill train` or `overfill prune` wrote")
        if "ifeval" in self.tasks:
            check_ifeval_scoring()
        check_writable(self.out, "--out")
