"""`overfill frontier`'s terminal table, and the configurations on the frontier in order of cost."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from overfill.terminal_tables import readable


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "" if value is None else f"{scale * value:{spec}}"


def print_frontier(console, result: dict, out: Path) -> None:
    points, front = result["points"], set(result["frontier"])
    config = result["config"]
    table = Table(title=f"overfill frontier: {result['data']['examples']} prompts for quality, the first "
                        f"{config['timing_prompts']} timed ({config['repeats']} rounds, batch 1); * on the frontier",
                  header_style="bold")
    columns = ["configuration", "decode step", "decode ms/token", "x full", "top-1 agreement", "first divergence",
               "reference NLL", "accuracy", "drafts accepted", "tokens/full pass"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("configuration", "decode step") else "right")
    for p in sorted(points, key=lambda p: p["decode_ms_per_token"]):
        spread = p["decode_ms_spread"]
        table.add_row(("* " if p["name"] in front else "  ") + p["name"], p["decode_step"],
                      f"{p['decode_ms_per_token']:.1f} \\[{spread['min']:.1f}-{spread['max']:.1f}]",
                      _fmt(p["decode_ms_vs_full"], ".2f"), _fmt(p["top1"], ".1%"), _fmt(p["first_divergence_mean"], ".1f"),
                      _fmt(p["nll"], ".3f"), _fmt(p["accuracy"], ".1%"), _fmt(p["acceptance_rate"], ".0%"),
                      _fmt(p["tokens_per_full_pass"], ".2f"))
    console.print(readable(table))
    by_name = {p["name"]: p for p in points}
    steps = [f"{name} ({by_name[name]['decode_ms_per_token']:.1f} ms, {by_name[name]['top1']:.1%})" for name in result["frontier"]]
    console.print("the frontier, cheapest first (each buys agreement with the full model at a price): " + " -> ".join(steps))
    checked = {p["name"]: p["replies_equal_full"] for p in points if p.get("replies_equal_full") is not None}
    if checked:
        differ = [f"{name} ({share:.0%} equal)" for name, share in checked.items() if share < 1]
        console.print("speculative rows' timed replies against the full row's: " +
                      ("every one identical, token for token" if not differ else
                       "[red]some differ[/]: " + ", ".join(differ) + " (float rounding can flip a near tie)"))
    env = result["environment"]
    console.print(f"{env['device']}, {env['dtype']}; "
                  f"{result['seconds']:.0f} s; wrote {', '.join(result['files'])} to [bold]{out}[/]")
