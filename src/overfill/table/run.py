"""`overfill table`: the paper's Table 2 on local files, one (task, configuration) cell at a time, resumable.

Each cell is one `lm_eval.simple_evaluate` call on the harness model of `evaluation/lm_eval.py` (greedy
`generate_until` through our two-stage loop, or vLLM's engine with --engine vllm), on the task folder
`tasks.write_task_folder` writes. A finished cell is saved at once as cells/TASK__CONFIGURATION.json (with
its per-example replies beside it), and a rerun with the same settings keeps it: an interrupted run
loses at most the cell it was in. The table, its summary and its figure are remade from the cells.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from overfill.atomic import atomic_write_text
from overfill.table.config import TableConfig
from overfill.table.tasks import PUNKT, TASKS, ifeval_sentence_counter, prepare_ifeval_scoring, write_task_folder

BOOTSTRAP_ITERS = 1000  # BLEU's standard error is bootstrapped (lm-eval's default of 100000 takes minutes per cell)


def cell_path(out: Path, task: str, configuration: str) -> Path:
    return out / "cells" / f"{task}__{configuration}.json"


def cell_settings(config: TableConfig, task: str, configuration: str) -> dict:
    """What a cell's score depends on: a saved cell is reused only when all of it matches."""
    source = {"full": None, "pruned": config.pruned, "overfill": config.overfill}[configuration]
    return {"model": config.model, "decoder": str(Path(source).expanduser().resolve()) if source else None,
            "data": str((Path(config.data_dir).expanduser() / task).resolve()), "limit": config.limit,
            "max_gen_toks": config.max_gen_toks, "chat_template": config.chat_template, "dtype": config.dtype,
            "shots": TASKS[task].shots, "metric": TASKS[task].metric,
            **({"sentence_counter": ifeval_sentence_counter()} if task == "ifeval" else {})}


def scored_answers(out: Path, task: str, configuration: str) -> dict[tuple[str, int], str]:
    """A cell's scored answer per example (what the task's filter kept of the reply), keyed by (lm-eval task, doc id)."""
    path = cell_path(out, task, configuration).with_suffix(".samples.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {(r["task"], r["doc_id"]): r["filtered"] for r in rows}


def finished_cell(out: Path, task: str, configuration: str, settings: dict) -> dict | None:
    path = cell_path(out, task, configuration)
    try:
        cell = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return cell if cell.get("settings") == settings else None


def load_lm(config: TableConfig, configuration: str):
    """The harness model of one column: the full model alone, the pruned baseline alone, or the OverFill pair."""
    from overfill.evaluation.lm_eval import OverFillLM

    folder = {"full": None, "pruned": config.pruned, "overfill": config.overfill}[configuration]
    common = {"dtype": config.dtype, "device": config.device, "batch_size": config.batch_size,
              "trust_remote_code": config.trust_remote_code, "compile": config.compile}
    if folder and (Path(folder).expanduser() / "overfill.json").is_file():
        sources = {"path": folder, "model": config.model}
    else:
        sources = {"model": config.model or _default_model(), "decoder": folder}
    if config.engine == "vllm":
        from overfill.table.vllm_lm import VLLMTableLM

        return VLLMTableLM(mode=configuration, **sources, **common)
    return OverFillLM(mode=configuration, **sources, **common)


def _default_model() -> str:
    from overfill.zoo import DEFAULT_MODEL

    return DEFAULT_MODEL


def evaluate_cell(lm, task_manager, task: str, lm_eval_name: str, limit: int | None, config: TableConfig,
                  chat: bool) -> tuple[dict, list[dict]]:
    """One simple_evaluate call: the cell's score, standard error and count, and its per-example records."""
    import lm_eval

    spec = TASKS[task]
    gen_kwargs = {"max_gen_toks": config.max_gen_toks} if config.max_gen_toks else None
    results = lm_eval.simple_evaluate(model=lm, tasks=[lm_eval_name], task_manager=task_manager, limit=limit,
                                      apply_chat_template=chat, fewshot_as_multiturn=chat, gen_kwargs=gen_kwargs,
                                      log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS, verbosity="ERROR")
    metric, _, filter_name = spec.metric.partition(",")
    row = results["results"][lm_eval_name]
    scale = 100.0 if spec.percent else 1.0
    stderr = row.get(f"{metric}_stderr,{filter_name}")
    counts = results.get("n-samples", {})
    n = sum(int(c.get("effective", 0)) for name, c in counts.items() if name == lm_eval_name or name.startswith(lm_eval_name + "_"))
    score = {"score": float(row[spec.metric]) * scale,
             "stderr": float(stderr) * scale if isinstance(stderr, (int, float)) else None, "n": n}
    records = []
    for name, samples in results.get("samples", {}).items():
        for s in samples:
            if s.get("filter", filter_name) != filter_name:  # one record per example: the filter the table reads
                continue
            arguments = (s.get("arguments") or [[None]])[0]
            records.append({"task": name, "doc_id": s.get("doc_id"), "prompt": arguments[0], "target": s.get("target"),
                            "reply": (s.get("resps") or [[None]])[0][0], "filtered": (s.get("filtered_resps") or [None])[0],
                            metric: s.get(metric)})
    if score["stderr"] is None:
        score["stderr"] = mean_stderr([r[metric] for r in records], scale)
    return score, records


def mean_stderr(values, scale: float) -> float | None:
    """The standard error of a mean of per-example scores (sample deviation / sqrt(n), lm-eval's `mean_stderr`),
    for a group lm-eval leaves without one (MMLU with a single question in some subject); None for other metrics."""
    if len(values) < 2 or not all(isinstance(v, (int, float)) for v in values):
        return None
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return scale * (variance / len(values)) ** 0.5


def run_table(config: TableConfig, console: Console | None = None):
    """Fill every (task, configuration) cell not already finished, then write table.json / .md / .png."""
    from overfill.table.report import build_table, print_summary, write_outputs

    console = console or Console()
    config.check_files()
    out = Path(config.out).expanduser()
    plan = write_task_folder(out / "tasks", Path(config.data_dir).expanduser(), config.tasks, config.limit)
    cells: dict[tuple[str, str], dict] = {}
    todo: dict[str, list[str]] = {}
    for configuration in config.configurations:
        for task in config.tasks:
            settings = cell_settings(config, task, configuration)
            kept = None if config.force else finished_cell(out, task, configuration, settings)
            if kept:
                cells[(task, configuration)] = kept
            else:
                todo.setdefault(configuration, []).append(task)
    if cells:
        console.print(f"[dim]keeping {len(cells)} finished cell(s) from {escape(str(out / 'cells'))} (--force recomputes them)[/]",
                      highlight=False)
    total = sum(map(len, todo.values()))
    if total:
        _fill(config, out, plan, todo, cells, console, total)
    table = build_table(config, cells, {key: scored_answers(out, *key) for key in cells})
    paths = write_outputs(table, out)
    print_summary(console, table, paths)
    return table


def _fill(config, out, plan, todo, cells, console, total) -> None:
    from lm_eval.tasks import TaskManager
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if any("ifeval" in tasks for tasks in todo.values()):  # before lm-eval reads the task folder, which imports them
        counter = prepare_ifeval_scoring()
        if counter != PUNKT:
            console.print(f"[yellow]IFEval: sentence counts by {counter}[/]", highlight=False)
    task_manager = TaskManager(include_path=str(out / "tasks"), include_defaults=False)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} cells"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        bar = progress.add_task("table", total=total)
        for configuration, tasks in todo.items():
            progress.update(bar, description=f"loading {configuration}")
            lm = load_lm(config, configuration)
            try:
                chat = config.chat_template if config.chat_template is not None else bool(getattr(lm.tokenizer, "chat_template", None))
                for task in tasks:
                    progress.update(bar, description=f"{configuration} on {TASKS[task].label}")
                    lm_eval_name, limit = plan[task]
                    started = time.perf_counter()
                    score, records = evaluate_cell(lm, task_manager, task, lm_eval_name, limit, config, chat)
                    cell = {"task": task, "configuration": configuration, **score, "metric": TASKS[task].metric_label,
                            "seconds": round(time.perf_counter() - started, 1), "chat_template": chat,
                            "engine": config.engine, "settings": cell_settings(config, task, configuration)}
                    samples = cell_path(out, task, configuration).with_suffix(".samples.jsonl")
                    atomic_write_text(samples, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))
                    atomic_write_text(cell_path(out, task, configuration), json.dumps(cell, indent=1))
                    cells[(task, configuration)] = cell
                    progress.advance(bar)
                    err = f" ± {cell['stderr']:.1f}" if cell["stderr"] is not None else ""
                    progress.console.print(f"{configuration:>8} {TASKS[task].label:<14} {cell['score']:6.1f}{err} "
                                           f"({cell['n']} examples, {cell['seconds']:.0f} s)", highlight=False)
            finally:
                getattr(lm, "close", lambda: None)()  # a column's vLLM engine stops before the next column's starts
                del lm
