"""Terminal summary (a rich table) of a pruning record (`prune.py`), which the prune and demo commands print."""

from __future__ import annotations

from rich.table import Table

from overfill.terminal_tables import readable


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def print_prune_summary(console, record: dict, out=None) -> None:
    table = Table(title="overfill prune", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("full", justify="right")
    table.add_column("pruned", justify="right")
    orig, actual, req = record["original"], record["actual"], record["requested"]
    hidden_note = "" if req["hidden_size"] == actual["hidden_size"] else f" (asked {req['hidden_size']})"
    mlp_note = "" if req["intermediate_size"] == actual["intermediate_size"] else f" (asked {req['intermediate_size']})"
    table.add_row("hidden size", str(orig["hidden_size"]), f"{actual['hidden_size']}{hidden_note}")
    table.add_row("MLP size", str(orig["intermediate_size"]), f"{actual['intermediate_size']}{mlp_note}")
    table.add_row("layers / KV cache", str(record["kept_layers"]), "same (cache-compatible)")
    params = record["parameters"]
    table.add_row("parameters", _millions(params["source"]), f"{_millions(params['pruned'])} ({params['pruned'] / params['source']:.0%})")
    cal = record["calibration"]
    table.add_row("calibration", f"{cal['sequences']} seqs, {cal['tokens']} tokens", f"{record['seconds']:.1f} s")
    console.print(readable(table))
    if out is not None:
        console.print(f"saved to [bold]{out}[/]")
