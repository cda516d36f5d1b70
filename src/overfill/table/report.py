"""The table from the cells: the paper's layout (task rows, configuration columns, standard errors), OverFill's
relative improvement over the pruned model and the share of the pruned-to-full gap it closes, the paper's own
figures beside ours; written as table.json, table.md and table.png, and summed up on the console."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from overfill.atomic import atomic_write_text
from overfill.table.config import CONFIGURATIONS
from overfill.table.paper import PAPER, PAPER_AVERAGE_RELATIVE_IMPROVEMENT, PAPER_SCORES
from overfill.table.tasks import PUNKT, TASKS

NAMES = {"full": "Full", "pruned": "Pruned", "overfill": "OverFill"}


def relative_improvement(overfill: float | None, pruned: float | None) -> float | None:
    """(OverFill - pruned) / pruned, in percent, as the paper's headline averages it per task; None where undefined."""
    if overfill is None or pruned is None or pruned == 0:
        return None
    return 100.0 * (overfill - pruned) / pruned


def gap_closed(full: float | None, pruned: float | None, overfill: float | None) -> float | None:
    """How much of the pruned model's shortfall from the full model OverFill makes up: 0 = no better than pruned,
    1 = as good as the full model; None where the full and pruned scores are equal (no gap)."""
    if None in (full, pruned, overfill) or full == pruned:
        return None
    return (overfill - pruned) / (full - pruned)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def same_answers(full: dict | None, other: dict | None) -> float | None:
    """The share of examples (percent) whose scored answer is the full model's own: the answer letter on ARC and
    MMLU, the last number on GSM8K, the whole reply on WMT16 and IFEval. None without both columns' answers."""
    keys = (full or {}).keys() & (other or {}).keys()
    return 100.0 * sum(full[k] == other[k] for k in keys) / len(keys) if keys else None


def build_table(config, cells: dict[tuple[str, str], dict], answers: dict[tuple[str, str], dict] | None = None) -> dict:
    """The table from the cells; `answers[(task, configuration)]` (each example's scored answer) adds how often the
    pruned model and OverFill give the full model's own answer."""
    answers = answers or {}
    rows = []
    for task in config.tasks:
        spec = TASKS[task]
        scores = {c: ({k: cells[(task, c)][k] for k in ("score", "stderr", "n", "seconds")} if (task, c) in cells else None)
                  for c in config.configurations}
        value = {c: (scores[c] or {}).get("score") for c in CONFIGURATIONS if c in scores}
        paper = PAPER_SCORES[task]
        rows.append({"task": task, "label": spec.label, "metric": spec.metric_label, "shots": spec.shots,
                     "shots_source": spec.shots_source, "scores": scores,
                     "relative_improvement": relative_improvement(value.get("overfill"), value.get("pruned")),
                     "gap_closed": gap_closed(value.get("full"), value.get("pruned"), value.get("overfill")),
                     "same_answer_as_full": {c: same_answers(answers.get((task, "full")), answers.get((task, c)))
                                             for c in ("pruned", "overfill") if c in config.configurations},
                     "paper": paper, "paper_relative_improvement": relative_improvement(paper["overfill"], paper["pruned"]),
                     "paper_gap_closed": gap_closed(paper["full"], paper["pruned"], paper["overfill"])})
    return {"paper": PAPER, "configurations": list(config.configurations),
            "settings": {"model": config.model, "pruned": config.pruned, "overfill": config.overfill, "limit": config.limit,
                         "max_gen_toks": config.max_gen_toks, "engine": config.engine, "greedy": True},
            "rows": rows, "notes": notes(cells),
            "average_relative_improvement": _mean(r["relative_improvement"] for r in rows),
            "average_gap_closed": _mean(r["gap_closed"] for r in rows),
            "paper_average_relative_improvement": PAPER_AVERAGE_RELATIVE_IMPROVEMENT}


def notes(cells: dict[tuple[str, str], dict]) -> list[str]:
    """What a reader must know to compare the cells with lm-eval's own runs of the same tasks."""
    counters = {cell["settings"].get("sentence_counter") for (task, _), cell in cells.items() if task == "ifeval"}
    return [f"IFEval's rules on sentences and on words in capitals split sentences with {c}."
            for c in sorted(counters - {None, PUNKT})]


def _num(value, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def _cell(score: dict | None) -> str:
    if score is None:
        return "—"
    return _num(score["score"]) + (f" ± {score['stderr']:.1f}" if score.get("stderr") is not None else "")


def _same(row: dict) -> str:
    same = row.get("same_answer_as_full", {})
    return " / ".join(_num(same.get(c), suffix="%") for c in ("pruned", "overfill"))


def markdown(table: dict) -> str:
    configs = table["configurations"]
    head = ["Task (metric, shots)", *[NAMES[c] for c in configs], "OverFill vs pruned", "gap closed",
            "same answer as Full (Pruned / OverFill)",
            *[f"paper {NAMES[c]}" for c in CONFIGURATIONS], "paper OverFill vs pruned"]
    lines = [f"# OverFill table ({table['paper']}, our run beside it)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["rows"]:
        lines.append("| " + " | ".join([f"{row['label']} ({row['metric']}, {row['shots']}-shot)",
                                        *[_cell(row["scores"].get(c)) for c in configs],
                                        _num(row["relative_improvement"], suffix="%"), _num(row["gap_closed"], 2),
                                        _same(row), *[_num(row["paper"][c]) for c in CONFIGURATIONS],
                                        _num(row["paper_relative_improvement"], suffix="%")]) + " |")
    lines += ["", f"Average relative improvement of OverFill over pruned: {_num(table['average_relative_improvement'], suffix='%')} "
              f"(paper: {table['paper_average_relative_improvement']}%); average share of the pruned-to-full gap closed: "
              f"{_num(table['average_gap_closed'], 2)}.",
              "", "Scores in percent (BLEU for WMT16), ± one standard error (lm-eval's); greedy generation. "
              "Paper figures marked n/a were not available to this tool. "
              f"Examples per task: {table['settings']['limit'] or 'all'}.", *table.get("notes", [])]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> Path:
    from overfill.plotting import COLORS, pyplot

    plt = pyplot()
    rows, configs = table["rows"], table["configurations"]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rows), 4.2))
    width = 0.8 / max(1, len(configs))
    for i, c in enumerate(configs):
        xs = [k + (i - (len(configs) - 1) / 2) * width for k in range(len(rows))]
        ys = [(r["scores"].get(c) or {}).get("score") or 0.0 for r in rows]
        errs = [(r["scores"].get(c) or {}).get("stderr") or 0.0 for r in rows]
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=NAMES[c], color=COLORS.get(c))
        paper = [(x, r["paper"][c]) for x, r in zip(xs, rows) if r["paper"][c] is not None]
        if paper:
            ax.scatter([x for x, _ in paper], [y for _, y in paper], marker="_", s=300, color="black", zorder=3,
                       label="paper" if i == 0 else None)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['label']}\n({r['shots']}-shot)" for r in rows], fontsize=8)
    ax.set_ylabel("score (%, BLEU for WMT16)")
    average = table["average_relative_improvement"]
    ax.set_title(f"OverFill vs pruned: {_num(average, suffix='%')} average relative improvement "
                 f"(paper {table['paper_average_relative_improvement']}%)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(table: dict, out: Path) -> dict[str, Path]:
    paths = {"json": out / "table.json", "markdown": out / "table.md", "png": out / "table.png"}
    atomic_write_text(paths["json"], json.dumps(table, indent=1))
    atomic_write_text(paths["markdown"], markdown(table))
    plot(table, paths["png"])
    return paths


def print_summary(console: Console, table: dict, paths: dict[str, Path]) -> None:
    configs = table["configurations"]
    view = Table(title=f"Our run beside {table['paper']}")
    for name in ("task", *[NAMES[c] for c in configs], "vs pruned", "gap closed", "= Full P/O", "paper F/P/O"):
        view.add_column(name, justify="left" if name == "task" else "right")
    for row in table["rows"]:
        paper = "/".join(_num(row["paper"][c]) for c in CONFIGURATIONS)
        view.add_row(row["label"], *[_cell(row["scores"].get(c)) for c in configs], _num(row["relative_improvement"], suffix="%"),
                     _num(row["gap_closed"], 2), _same(row), paper)
    console.print(view)
    console.print(f"average relative improvement of OverFill over pruned: {_num(table['average_relative_improvement'], suffix='%')} "
                  f"(paper {table['paper_average_relative_improvement']}%); written {escape(', '.join(str(p) for p in paths.values()))}",
                  highlight=False, soft_wrap=True)
