"""`overfill bench`'s terminal tables: the key point, the measured ratios, the sweeps, the loop overhead;
with --engine vllm, the same per key batch for vLLM and our loop, and the load run."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from overfill.configuration import Configuration
from overfill.interleaved import paired_ratio
from overfill.terminal_tables import readable


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
    console.print(readable(table))
    for row, s in key["rows"].items():
        spec = s.get("speculation")
        if spec and spec["acceptance_rate"] is not None:
            console.print(f"{row} (over its {spec['runs']} timed runs): {spec['acceptance_rate']:.1%} of {spec['drafted']} "
                          f"draft tokens accepted, {spec['tokens_per_full_pass']:.2f} tokens per pass of the full model")

    table = Table(title="ratios measured in this run (paired per repeat: median \\[min-max])", header_style="bold")
    for column in ("ratio", "value"):
        table.add_column(column, justify="left" if column == "ratio" else "right")
    for r in key["ratios"]:
        table.add_row(r["name"], _range(r, ".3f"))
    console.print(readable(table))

    for name, sweep in result["sweeps"].items():
        # Across batch sizes the decode step is what changes; elsewhere the whole reply's latency.
        metric, what, digits = ("decode_ms_per_token", "decode ms/token", ".1f") if name == "batch" else ("e2e_s", "end-to-end s", ".2f")
        table = Table(title=f"{name.replace('_', ' ')} sweep: {what} (median)", header_style="bold")
        table.add_column(name.replace("_", " "), justify="right")
        modes = list(sweep["rows"])
        for mode in modes:
            table.add_column(mode, justify="right")
        # OverFill against the pruned model (what it costs) and the full model (what it saves), per engine.
        pairs = [(Configuration(a, compiled=c).name, Configuration(b, compiled=c).name) for c in (False, True)
                 for a, b in (("overfill", "pruned"), ("full", "overfill"))]
        pairs = [(a, b) for a, b in pairs if a in modes and b in modes]
        for a, b in pairs:
            table.add_column(f"{a} / {b}", justify="right")
        for i, value in enumerate(sweep["values"]):
            cells = [f"{sweep['rows'][m][i][metric]['median']:{digits}}" for m in modes]
            for a, b in pairs:
                ratio = paired_ratio(sweep["rows"][a][i], sweep["rows"][b][i], metric)
                cells.append(f"{ratio['median']:.3f}" if ratio else "")
            table.add_row(str(value), *cells)
        console.print(readable(table))

    if "overhead" in result:
        o = result["overhead"]
        hand, inner = o["overhead_vs_by_hand_ms_per_step"], o["overhead_in_loop_ms_per_step"]
        console.print(
            f"loop overhead ({o['steps']} overfill decode steps x {o['repeats']}): loop step "
            f"{o['loop_ms_per_step']['median']:.2f} ms, decoder forward by hand {o['by_hand_forward_ms_per_step']['median']:.2f} ms "
            f"-> {hand['median']:+.3f} ms/step ({o['overhead_vs_by_hand_percent']:+.2f}%, IQR {hand['q1']:+.2f}..{hand['q3']:+.2f}); "
            f"outside the decoder forward inside the loop: {inner['median']:+.3f} ms/step ({o['overhead_in_loop_percent']:+.2f}%)"
        )
    compiles = {model: seconds for model, seconds in result.get("compile_seconds", {}).items() if seconds}
    if compiles:
        console.print("compiled step, first call of each shape (compiling; capturing a CUDA graph on a GPU): " + "; ".join(
            f"{model} " + ", ".join(f"{shape} {s:.1f} s" for shape, s in shapes.items()) for model, shapes in compiles.items()))
    if result.get("decoder_precision"):
        console.print(result["decoder_precision"])
    env = result["environment"]
    console.print(f"{env['cpu']['name']} ({', '.join(env['cpu']['instruction_sets']) or 'no AVX2'}), {env['torch_threads']} threads, load average {env['load_average'][0] if env['load_average'] else '?'} "
                  f"at start; {env.get('device', 'cpu')}, {env['dtype']}; {result['seconds']:.0f} s; wrote {', '.join(result['files'])} to [bold]{out}[/]")


# ---------------------------------------------------------------- --engine vllm


def _best(d: dict | None, fmt: str, scale: float = 1.0, median: bool = True) -> str:
    """'best [median]' of a {"best", "median"} value; '?' where missing."""
    if not d or d.get("best") is None:
        return "?"
    text = f"{scale * d['best']:{fmt}}"
    if median and d.get("median") is not None:
        text += f" \\[{scale * d['median']:{fmt}}]"
    return text


def _paired(r: dict) -> str:
    best = _best(r, ".3f")
    return best if r.get("paired") is None else f"[bold]{r['paired']:.3f}[/] · {best}"


def print_vllm_bench(console, result: dict, out: Path) -> None:
    config = result["config"]
    for key in result["key_points"]:
        table = Table(title=f"bench on vLLM and our loop: batch {key['batch']}, prompt {key['prompt_len']} tokens, "
                            f"{key['new_tokens']} new tokens; best \\[median] of {config['repeats']}", header_style="bold")
        for column in ("engine", "mode", "prefill + 1st (ms)", "decode (ms/token)", "decode tok/s", "end-to-end (s)"):
            table.add_column(column, justify="left" if column in ("engine", "mode") else "right")
        for engine, rows in key["rows"].items():
            for mode, row in rows.items():
                table.add_row(engine, mode, _best(row["prefill_s"], ".0f", 1e3), _best(row["decode_ms_per_token"], ".1f"),
                              _best(row["decode_tokens_per_s"], ".1f"), _best(row["e2e_s"], ".2f"))
        console.print(readable(table))
        for mode, row in key["rows"].get("vllm speculative", {}).items():
            spec = row.get("speculation")
            if spec and spec.get("acceptance_rate") is not None:
                console.print(f"vLLM speculative, {mode} (over all its timed runs): {spec['acceptance_rate']:.1%} of "
                              f"{spec['draft_tokens']:.0f} draft tokens accepted, "
                              f"{spec['tokens_per_full_pass']:.2f} tokens per pass of the full model")

    if result["key_points"]:
        _print_key_ratios(console, result["key_points"])

    for name, sweep in result["sweeps"].items():
        fixed = ", ".join(f"{k.replace('_', ' ')} {sweep[k]}" for k in ("prompt_len", "batch", "new_tokens") if k in sweep)
        table = Table(title=f"vLLM {name.replace('_', ' ')} sweep ({fixed}): best repeat", header_style="bold")
        for column in (name.replace("_", " "), "mode", "prefill (ms)", "decode (ms/step)", "end-to-end (s)", "tok/s",
                       *(f"e2e {label}" for label in sweep["ratios_e2e"])):
            table.add_column(column, justify="left" if column == "mode" else "right")
        for i, value in enumerate(sweep["values"]):
            for mode, points in sweep["rows"].items():
                p = points[i]
                ratios = [_best(r[i], ".3f", median=False) if mode == "overfill" else "" for r in sweep["ratios_e2e"].values()]
                table.add_row(str(value) if mode == next(iter(sweep["rows"])) else "", mode,
                              _best(p["prefill_s"], ".0f", 1e3, median=False),
                              _best(p["decode_ms_per_token"], ".1f", median=False), _best(p["e2e_s"], ".2f", median=False),
                              _best(p["tokens_per_s"], ".1f", median=False), *ratios,
                              end_section=mode == list(sweep["rows"])[-1])
        console.print(readable(table))

    for load in result.get("load") or []:
        print_load(console, load)
    if result.get("mixed_step"):
        print_mixed_step(console, result["mixed_step"])

    env = result["environment"]
    starts = ", ".join(f"{m} {w['engine_start_s']:.0f} s" for m, w in result["workers"].items())
    starts = f" (engine start: {starts})" if starts else ""
    load = f"{env['load_average'][0]:.2f}" if env["load_average"] else "?"
    console.print(f"{env['cpu']['name']} ({', '.join(env['cpu']['instruction_sets']) or 'no AVX2'}), {env['cpu_count']} cores, "
                  f"load average {load} at start; {env['vllm']}{starts}; {result['seconds']:.0f} s; wrote {', '.join(result['files'])} to [bold]{out}[/]")


def print_load(console, load: dict) -> None:
    table = Table(title=f"overfill serve under load: {load['clients']} concurrent streaming clients for ~{load['seconds']} s, "
                        f"prompt {load['prompt_len']}, {load['new_tokens']} new tokens ({load['client']})",
                  header_style="bold")
    for column in ("mode", "requests ok/sent", "failed", "duration (s)", "output tok/s", "TTFT p50/p99 (ms)",
                   "ITL p50/p99 (ms)", "TPOT p50 (ms)"):
        table.add_column(column, justify="left" if column == "mode" else "right")

    def pair(row, metric):
        a, b = row.get(f"{metric}_p50_ms"), row.get(f"{metric}_p99_ms")
        return "?" if a is None or b is None else f"{a:.0f} / {b:.0f}"

    for mode, row in load["rows"].items():
        tpot = row.get("tpot_p50_ms")
        table.add_row(mode, f"{row['completed']}/{row['requests']}", str(row["failed"]), f"{row['duration_s']:.1f}",
                      f"{row['output_tokens_per_s']:.1f}", pair(row, "ttft"), pair(row, "itl"),
                      "?" if tpot is None else f"{tpot:.1f}")
    console.print(readable(table))
    for mode, row in load["rows"].items():
        memory = row.get("resident_mb") or {}
        if memory:
            parts = "".join(f", {role} instance {memory[role]:.0f}" for role in ("prefill", "decode") if role in memory)
            console.print(f"resident memory after the run, {mode}: {memory['total']:.0f} MB{parts} (RSS summed over processes)")
        for role, moved in (row.get("kv_moved") or {}).items():
            console.print(f"KV moved, {role} instance: {moved['bytes_per_prompt'] / 2**20:.2f} MB and "
                          f"{moved['ms_per_prompt']:.1f} ms per prompt ({'stored' if role == 'prefill' else 'loaded'}; "
                          f"{moved['prompts']} prompts so far)")
    eager = load["rows"].get("overfill", {}).get("eager_steps")
    if eager is not None:
        console.print(f"OverFill's steps on the eager route in the measured run: {eager} (a request recomputing prompt "
                      "and reply after preemption; every other mixed step runs compiled, split by stage)")
    if load["ratios"]:
        console.print("load ratios: " + "; ".join(f"{r['name']} {r['value']:.3f}" for r in load["ratios"]))
    for mode, row in load["rows"].items():
        for error in row["errors"]:
            console.print(f"[yellow]load run {mode} error:[/] {escape(error)}", highlight=False)


def _print_key_ratios(console, keys: list[dict]) -> None:
    table = Table(title="ratios measured in this run: paired (median over rounds; vLLM modes interleaved), "
                        "then best \\[median]", header_style="bold")
    table.add_column("engine")
    table.add_column("ratio")
    for key in keys:
        table.add_column(f"batch {key['batch']}", justify="right")
    names = list(dict.fromkeys((r["engine"], r["name"]) for key in keys for r in key["ratios"]))
    for engine, name in names:
        cells = []
        for key in keys:
            found = [r for r in key["ratios"] if (r["engine"], r["name"]) == (engine, name)]
            cells.append(_paired(found[0]) if found else "")
        table.add_row(engine, name, *cells)
    console.print(readable(table))


def print_mixed_step(console, mixed: dict) -> None:
    table = Table(title=f"OverFill's mixed steps on vLLM: {mixed['decoding']} requests decoding beside a {mixed['chunk']}-token "
                        f"prompt chunk; median of {mixed['routes']['split']['steps']} steps per route", header_style="bold")
    for column in ("route", "engine step (ms)", "model forward (ms)"):
        table.add_column(column, justify="left" if column == "route" else "right")
    for route, row in mixed["routes"].items():
        table.add_row(f"mixed step, {route}", f"{row['step_ms']:.1f}", f"{row['forward_ms']:.1f}")
    for kind, row in mixed.get("in_turn", {}).items():
        table.add_row(f"in turn: {kind} step", f"{row['step_ms']:.1f}", f"{row['forward_ms']:.1f}")
    console.print(readable(table))
    console.print(f"eager / split: {mixed['eager_over_split_step']:.2f}x per engine step, "
                  f"{mixed['eager_over_split_forward']:.2f}x per forward")
    if "in_turn" in mixed:
        console.print(f"split mixed step / steps in turn (OverFill's default): the chunk's request waits "
                      f"{mixed['split_over_prompt_step']:.2f}x for its step; a decoding request's next token, across "
                      f"the chunk (a prompt step, then a decode step): {mixed['split_over_turn_pair']:.2f}x")
    split = mixed["routes"]["split"]
    if "full_part_ms" in split:
        console.print(f"split forward, median parts: decoder stage on the {mixed['decoding']} decoding requests "
                      f"{split['decoder_part_ms']:.1f} ms, full stage on the {mixed['chunk']}-token chunk "
                      f"{split['full_part_ms']:.1f} ms; the decodes alone (before the chunk arrives) "
                      f"{mixed['decodes_alone_forward_ms']:.1f} ms a forward")
        sizing = disaggregated_sizing(mixed, prompt_len=mixed.get("prompt_len"), new_tokens=mixed.get("new_tokens"))
        if sizing:
            console.print(f"sizing, prefill and decode on separate instances of equal cores: the full model reads "
                          f"{sizing['prefill_tokens_per_s']:.0f} prompt tokens/s, the decoder writes "
                          f"{sizing['decode_tokens_per_s']:.0f} tokens/s at batch {mixed['decoding']}: a "
                          f"{sizing['prompt_len']}-token prompt and a {sizing['new_tokens']}-token reply need "
                          f"{sizing['prefill_per_decode']:.2f} prefill instances per decode instance")


def disaggregated_sizing(mixed: dict, *, prompt_len: int, new_tokens: int | None) -> dict | None:
    """Prefill instances per decode instance for a workload, from the mixed step's two measured parts: the full
    model's prompt throughput (its chunk) and the decoder's decode throughput (its decoding batch). Per request a
    prefill instance spends prompt_len / prefill rate, a decode instance new_tokens / decode rate (at that batch)."""
    split = mixed["routes"]["split"]
    if not new_tokens or not prompt_len or "full_part_ms" not in split:
        return None
    prefill = mixed["chunk"] / (split["full_part_ms"] / 1e3)
    decode = mixed["decoding"] / (mixed["decodes_alone_forward_ms"] / 1e3)
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "prefill_tokens_per_s": prefill,
            "decode_tokens_per_s": decode, "prefill_per_decode": (prompt_len / prefill) / (new_tokens / decode)}
