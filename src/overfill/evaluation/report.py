"""`overfill eval`'s terminal table: token 1 apart, tokens 2..N, agreement with the full model and answers per model."""

from __future__ import annotations

import math

from rich.table import Table

from overfill.terminal_tables import readable


def _fmt(value, digits: int = 3, percent: bool = False, percent_digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{percent_digits}%}" if percent else f"{value:.{digits}f}"


def print_eval_table(console, results: dict) -> None:
    data = results["data"]
    engines = sorted({m["engine"] for m in results["models"].values() if "engine" in m})
    replies = f", greedy replies on {' and '.join(engines)}" if engines else ""
    held_out = (f"{data['examples']} prompts alone (no reference replies)" if data.get("prompts_alone") else
                f"{data['examples']} examples, {data['target_tokens']} reply tokens")
    table = Table(title=f"overfill eval: {held_out}{replies}", header_style="bold")
    columns = ["model", "mode", "NLL y1", "NLL y2..N", "PPL y2..N", "top-1 y2..N", "y1 share of NLL",
               "agree top-1 y2..N", "NLL on full y2..N", "agree tok y2..N", "agree exact", "same tokens mean/med",
               "accuracy", "acc from y1"]
    for c in columns:
        table.add_column(c, justify="left" if c in ("model", "mode") else "right")
    for name, m in results["models"].items():
        agree, answers = m.get("agreement", {}), m.get("answers", {})
        from_first = f"{answers['correct_from_first_token']}/{answers['correct']}" if answers else "-"
        same = (f"{agree['first_divergence_mean']:.1f} / {agree['first_divergence_median']:g}"
                if "first_divergence_mean" in agree else "-")
        # NLL columns are absent with --no-nll, reply columns with --no-generate, agreement ones with
        # --no-agreement: all print '-'.
        table.add_row(name, m["mode"], _fmt(m.get("nll_token1")), _fmt(m.get("nll")), _fmt(m.get("ppl"), 2),
                      _fmt(m.get("top1"), percent=True), _fmt(m.get("token1_share_of_nll"), percent=True),
                      _fmt(agree.get("top1"), percent=True, percent_digits=1), _fmt(agree.get("nll")),
                      _fmt(agree.get("token_match"), percent=True), _fmt(agree.get("exact_match"), percent=True), same,
                      _fmt(answers.get("accuracy"), percent=True), from_first)
    console.print(readable(table))
    if any("first_divergence_mean" in m.get("agreement", {}) for m in results["models"].values()):
        console.print("agree top-1 / NLL on full: teacher-forced on the full model's greedy replies; agree tok / exact / "
                      "same tokens: each model's greedy replies against them (same tokens: before the first divergence)")
    ties = {n: m["agreement"]["near_ties"] for n, m in results["models"].items() if m.get("agreement", {}).get("near_ties")}
    if ties:
        tie = next(m["agreement"]["tie"] for m in results["models"].values() if "tie" in m.get("agreement", {}))
        console.print(f"counted as top-1 within {tie:g} nats of the argmax (--agreement-tie): "
                      + ", ".join(f"{n} {k} tokens" for n, k in ties.items()))
    for r in results.get("refresh", []):
        closed = f", {r['gap_closed']:.0%} of its gap to the full model's {r['full_nll']:.3f} closed" if r["gap_closed"] is not None else ""
        console.print(f"{r['name']}: reply NLL {r['nll']:.3f} vs {r['plain_nll']:.3f} without refresh{closed}")
