"""`overfill bench`'s terminal tables: the key point, the measured ratios, the sweeps, the loop overhead."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from overfill.bench.timing import paired_ratio


def _range(s: dict, fmt: str) -> str:
    return f"{s['median']:{fmt}} \\[{s['min']:{fmt}}-{s['max']:{fmt}}]"


def print_bench(console, result: dict, out: Path) -> None:
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
    for column in ("ratio", "value"):
        table.add_column(column, justify="left" if column == "ratio" else "right")
    for r in key["ratios"]:
        table.add_row(r["name"], _range(r, ".3f"))
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
    console.print(f"{env['cpu']['name']} ({', '.join(env['cpu']['instruction_sets']) or 'no AVX2'}), {env['torch_threads']} threads, load average {env['load_average'][0] if env['load_average'] else '?'} "
                  f"at start; {result['seconds']:.0f} s; wrote {', '.join(result['files'])} to [bold]{out}[/]")
