"""Terminal summaries (rich tables) of the commands: prune, bench and eval."""

from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table


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
    console.print(table)
    if out is not None:
        console.print(f"saved to [bold]{out}[/]")


def _range(s: dict, fmt: str) -> str:
    return f"{s['median']:{fmt}} \\[{s['min']:{fmt}}-{s['max']:{fmt}}]"


def print_bench(console, result: dict, out: Path) -> None:
    from overfill.timing import paired_ratio

    key = result["key_point"]
    repeats = result["config"]["repeats"]
    table = Table(title=f"overfill bench: batch {key['batch']}, prompt {key['prompt_len']} tokens, "
                        f"{key['new_tokens']} new tokens, median \\[min-max] of {repeats}", header_style="bold")
    for column in ("row", "prefill + 1st (ms)", "decode (ms/token)", "decode tok/s", "end-to-end (s)", "tokens/step"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for row, s in key["rows"].items():
        table.add_row(row, _range({k: 1e3 * v for k, v in s["prefill_s"].items()}, ".0f"),
                      _range(s["decode_ms_per_token"], ".1f"), _range(s["decode_tokens_per_s"], ".1f"),
                      _range(s["e2e_s"], ".2f"), f"{s['new_tokens_per_step']['median']:.2f}")
    console.print(table)

    table = Table(title="ratios measured in this run (paired per repeat: median \\[min-max])", header_style="bold")
    for column in ("ratio", "value", "issue target"):
        table.add_column(column, justify="left" if column == "ratio" else "right")
    for r in key["ratios"]:
        mark = "" if r["met"] is None else (" [green]met[/]" if r["met"] else " [red]not met[/]")
        table.add_row(r["name"], _range(r, ".3f"), (r["target"] or "") + mark)
    console.print(table)

    for name, sweep in result["sweeps"].items():
        table = Table(title=f"{name.replace('_', ' ')} sweep: end-to-end s (median)", header_style="bold")
        table.add_column(name.replace("_", " "), justify="right")
        modes = list(sweep["rows"])
        for mode in modes:
            table.add_column(mode, justify="right")
        both = "overfill" in modes and "pruned" in modes
        if both:
            table.add_column("overfill / pruned", justify="right")
        for i, value in enumerate(sweep["values"]):
            cells = [f"{sweep['rows'][m][i]['e2e_s']['median']:.2f}" for m in modes]
            if both:
                ratio = paired_ratio(sweep["rows"]["overfill"][i], sweep["rows"]["pruned"][i], "e2e_s")
                cells.append(f"{ratio['median']:.3f}" if ratio else "")
            table.add_row(str(value), *cells)
        console.print(table)

    if "overhead" in result:
        o = result["overhead"]
        hand, inner = o["overhead_vs_by_hand_ms_per_step"], o["overhead_in_loop_ms_per_step"]
        console.print(
            f"loop overhead ({o['steps']} overfill decode steps x {o['repeats']}): loop step "
            f"{o['loop_ms_per_step']['median']:.2f} ms, decoder forward by hand {o['by_hand_forward_ms_per_step']['median']:.2f} ms "
            f"-> {hand['median']:+.3f} ms/step ({o['overhead_vs_by_hand_percent']:+.2f}%, IQR {hand['q1']:+.2f}..{hand['q3']:+.2f}); "
            f"outside the decoder forward inside the loop: {inner['median']:+.3f} ms/step ({o['overhead_in_loop_percent']:+.2f}%)"
        )
    env = result["environment"]
    console.print(f"{env['torch_threads']} threads, load average {env['load_average'][0] if env['load_average'] else '?'} "
                  f"at start; {result['seconds']:.0f} s; wrote {', '.join(result['files'])} to [bold]{out}[/]")


def _fmt(value, digits: int = 3, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.0%}" if percent else f"{value:.{digits}f}"


def print_eval_table(console, results: dict) -> None:
    data = results["data"]
    table = Table(title=f"overfill eval: {data['examples']} examples, {data['target_tokens']} reply tokens", header_style="bold")
    columns = ["model", "mode", "NLL y1", "NLL y2..N", "PPL y2..N", "top-1 y2..N", "y1 share of NLL",
               "agree tok y2..N", "agree exact", "accuracy", "acc from y1"]
    for c in columns:
        table.add_column(c, justify="left" if c in ("model", "mode") else "right")
    for name, m in results["models"].items():
        agree, answers = m.get("agreement", {}), m.get("answers", {})
        from_first = f"{answers['correct_from_first_token']}/{answers['correct']}" if answers else "-"
        table.add_row(name, m["mode"], _fmt(m["nll_token1"]), _fmt(m["nll"]), _fmt(m["ppl"], 2), _fmt(m["top1"], percent=True),
                      _fmt(m["token1_share_of_nll"], percent=True), _fmt(agree.get("token_match"), percent=True),
                      _fmt(agree.get("exact_match"), percent=True), _fmt(answers.get("accuracy"), percent=True), from_first)
    console.print(table)
