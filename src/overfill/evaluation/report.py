"""`overfill eval`'s terminal table: token 1 apart, tokens 2..N, agreement and answers per model."""

from __future__ import annotations

import math

from rich.table import Table


def _fmt(value, digits: int = 3, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.0%}" if percent else f"{value:.{digits}f}"


def print_eval_table(console, results: dict) -> None:
    data = results["data"]
    engines = sorted({m["engine"] for m in results["models"].values() if "engine" in m})
    replies = f", greedy replies on {' and '.join(engines)}" if engines else ""
    table = Table(title=f"overfill eval: {data['examples']} examples, {data['target_tokens']} reply tokens{replies}",
                  header_style="bold")
    columns = ["model", "mode", "NLL y1", "NLL y2..N", "PPL y2..N", "top-1 y2..N", "y1 share of NLL",
               "agree tok y2..N", "agree exact", "accuracy", "acc from y1"]
    for c in columns:
        table.add_column(c, justify="left" if c in ("model", "mode") else "right")
    for name, m in results["models"].items():
        agree, answers = m.get("agreement", {}), m.get("answers", {})
        from_first = f"{answers['correct_from_first_token']}/{answers['correct']}" if answers else "-"
        # NLL columns are absent with --no-nll, reply columns with --no-generate: both print '-'.
        table.add_row(name, m["mode"], _fmt(m.get("nll_token1")), _fmt(m.get("nll")), _fmt(m.get("ppl"), 2),
                      _fmt(m.get("top1"), percent=True), _fmt(m.get("token1_share_of_nll"), percent=True),
                      _fmt(agree.get("token_match"), percent=True), _fmt(agree.get("exact_match"), percent=True),
                      _fmt(answers.get("accuracy"), percent=True), from_first)
    console.print(table)
    for r in results.get("refresh", []):
        closed = f", {r['gap_closed']:.0%} of its gap to the full model's {r['full_nll']:.3f} closed" if r["gap_closed"] is not None else ""
        console.print(f"{r['name']}: reply NLL {r['nll']:.3f} vs {r['plain_nll']:.3f} without refresh{closed}")
