"""The GPU check's second half: the paper's Figures 3-5 at the paper's scale (a Llama-3.2-3B-shaped full model and
its 0.45 decoder, random weights: a decode step's time depends on shapes and bytes, not on weight values), each
compiled row against the HBM roofline, and the checks the run makes of its own figures. `gpu_check.py` runs it.
"""

from __future__ import annotations

import gc
from dataclasses import asdict
from pathlib import Path

import torch


def paper_model(preset: dict, device: torch.device):
    from overfill.bench.synthetic import byte_tokenizer, paper_pair
    from overfill.devices import check_dtype
    from overfill.modeling import OverFillModel

    full, decoder = paper_pair(check_dtype(preset["dtype"]), device, scale=preset["scale"])
    # Byte tokens are valid ids of any vocabulary: the bench's prompts (chat text of exact lengths) serve as they are.
    return OverFillModel(full, decoder, byte_tokenizer())


def bench_config(config, preset: dict, out: Path):
    from overfill.bench.config import BenchConfig

    keep = ("prompt_len", "new_tokens", "new_tokens_sweep", "prompt_len_sweep", "batch_sweep", "sweep_new_tokens", "repeats",
            "sweep_repeats")
    return BenchConfig(out=str(out), device=config.device, dtype=preset["dtype"], batch_size=1, warmup=1, overhead_steps=0,
                       references=False, decode_steps=("compiled",), **{k: preset[k] for k in keep})


def weight_bytes(module) -> int:
    from overfill.precision import weight_bytes as count

    return count(module)


def roofline(model, key: dict, bandwidth_gb_s: float, capacity: int) -> dict:
    """Each compiled row's decode ms/token at batch 1 against its floor: the decode model's weight bytes (and the KV
    cache the step reads: the whole static cache) over the copy bandwidth."""
    from overfill.arch import head_dim_of, kv_heads_of

    config = model.full.config
    kv_bytes = (2 * config.num_hidden_layers * kv_heads_of(config) * head_dim_of(config) * capacity
                * model.full.get_input_embeddings().weight.element_size())
    out = {"bandwidth_gb_s": bandwidth_gb_s, "kv_cache_bytes_read_per_step": kv_bytes, "capacity": capacity, "rows": {}}
    for row, decode_model in (("full+compiled", model.full), ("overfill+compiled", model.decoder),
                              ("pruned+compiled", model.decoder)):
        if row not in key["rows"]:
            continue
        weights = weight_bytes(decode_model)
        floor_ms = 1e3 * weights / (bandwidth_gb_s * 1e9)
        measured = key["rows"][row]["decode_ms_per_token"]["median"]
        out["rows"][row] = {"weight_bytes": weights, "roofline_ms": round(floor_ms, 3),
                            "roofline_with_kv_ms": round(1e3 * (weights + kv_bytes) / (bandwidth_gb_s * 1e9), 3),
                            "measured_ms": round(measured, 3), "of_roofline": round(floor_ms / measured, 3)}
    return out


def paper_figures(check, config, preset: dict) -> None:
    """The paper-scale sections, each recorded as it finishes (`check`: the run's gpu_check.Check), figures redrawn
    after each; `config` is the run's GpuCheckConfig, `preset` one of its PRESETS."""
    from rich.console import Console

    from overfill.bench.plots import write_plots
    from overfill.bench.prompts import PromptSource
    from overfill.bench.report import print_bench
    from overfill.bench.results import describe, summarize
    from overfill.bench.run import bench_rows, compile_report, measure_key_point, measure_sweep, new_tokens_sweep
    from overfill.bench.timing import measure_point
    from overfill.tensors import pad_id_of

    device = torch.device(config.device)
    figures = {"key_point": None, "sweeps": {}}
    state: dict = {}

    def build():
        state["model"] = model = paper_model(preset, device)
        state["bench"] = bench = bench_config(config, preset, check.out)
        state["prompts"] = PromptSource.from_tokenizer(model.tokenizer)
        state["pad"] = pad_id_of(model.tokenizer)
        state["rows"], state["variants"], state["skipped"] = bench_rows(model, bench)
        return {"models": describe(model), "weight_bytes": {"full": weight_bytes(model.full),
                                                            "decoder": weight_bytes(model.decoder)},
                "dtype": preset["dtype"]}

    def publish():
        """bench.json's layout, so the bench's own figures and tables serve: the figures now, the tables at the end."""
        figures["compile_seconds"] = compile_report(state["model"])
        check.result["figures"] = {k: v for k, v in figures.items() if v}
        if figures["key_point"] is not None:
            try:
                check.result["files"] = write_plots(figures, check.out)
            except Exception as error:  # noqa: BLE001 - a figure that fails to draw leaves the numbers
                check.result["plot_error"] = f"{type(error).__name__}: {error}"

    def key_point():
        bench, model = state["bench"], state["model"]
        with torch.inference_mode():
            key, runs = measure_key_point(model, bench, state["prompts"], state["pad"], state["rows"], state["variants"],
                                          state["skipped"], lambda _: None)
        figures["key_point"] = key
        figures["sweeps"]["new_tokens"] = new_tokens_sweep(bench, runs, state["rows"])
        publish()
        return {row: {"decode_ms_per_token": s["decode_ms_per_token"]["median"], "prefill_ms": 1e3 * s["prefill_s"]["median"]}
                for row, s in key["rows"].items()} | {"ratios": {r["name"]: round(r["median"], 3) for r in key["ratios"]}}

    def sweep(name: str):
        def run():
            with torch.inference_mode():
                figures["sweeps"][name] = measure_sweep(state["model"], state["bench"], name, state["prompts"], state["pad"],
                                                        state["rows"], state["variants"], lambda _: None,
                                                        time_left=lambda: check.time_left() - 20)
            publish()
            points = figures["sweeps"][name]
            return {"values": points["values"], "cut_short": points.get("cut_short"),
                    "decode_ms_per_token": {row: [round(p["decode_ms_per_token"]["median"], 3) for p in ps]
                                            for row, ps in points["rows"].items()}}
        return run

    def eager_beside():
        """The eager engine beside the compiled one at batch 1 (shorter runs: an eager GPU step waits on launches)."""
        bench, model = state["bench"], state["model"]
        rows = ("full", "overfill", "full+compiled", "overfill+compiled")
        ids, mask = state["prompts"].batch(bench.prompt_len, 1)
        n = preset["eager_tokens"]
        with torch.inference_mode():
            runs = measure_point(model, rows, ids, mask, dict.fromkeys(rows, n), state["pad"], 2, 1, None)
        rows_out = {row: summarize([r.split() for r in runs[row]], 1) for row in rows}
        figures["eager_beside_compiled"] = {"new_tokens": n, "rows": rows_out}
        return {row: round(s["decode_ms_per_token"]["median"], 3) for row, s in rows_out.items()}

    if check.section("paper: models", build, needs=30) is None:
        return
    check.say(f"paper-scale pair: {check.result['sections']['paper: models']['models']}")
    check.section("paper: key point and Fig. 3 (new tokens)", key_point, needs=60)
    if figures["key_point"] is not None:
        check.section("paper: Fig. 5 (batch)", sweep("batch"), needs=40)
        check.section("paper: Fig. 4 (prompt length)", sweep("prompt_len"), needs=30)
        check.section("paper: eager beside compiled", eager_beside, needs=30)
        bandwidth = check.result["sections"].get("environment", {}).get("copy_bandwidth_gb_s")
        if bandwidth:
            check.result["roofline"] = roofline(state["model"], figures["key_point"], bandwidth, _capacity(state["bench"]))
        publish()
        paper_sanity(check, figures, state["model"])
        try:
            console = Console(record=True, width=150)
            print_bench(console, {**figures, "config": asdict(state["bench"]), "files": check.result.get("files", []),
                                  "environment": check.result["sections"].get("environment") or {}, "seconds": check.elapsed()},
                        check.out)
            check.log.write(console.export_text())
        except Exception as error:  # noqa: BLE001 - the tables are a convenience; the JSON has the numbers
            check.say(f"tables not printed: {type(error).__name__}: {error}")
    del state["model"]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _capacity(bench) -> int:
    """The key point's static cache: its prompt (exactly prompt_len tokens) and its longest reply."""
    from overfill.kv_cache import capacity_for

    return capacity_for(bench.prompt_len + bench.key_run_tokens)


def paper_sanity(check, figures: dict, model) -> None:
    """What the paper-scale figures must show if the timing is sound (judged at the paper's scale only)."""
    judged = check.config.preset == "paper"

    def sane(name: str, ok: bool, detail: str) -> None:
        check.sane(name, ok, detail, judged)

    rows = figures["key_point"]["rows"]
    ms = {row: s["decode_ms_per_token"]["median"] for row, s in rows.items()}
    if {"overfill+compiled", "full+compiled"} <= set(ms):
        ratio = ms["full+compiled"] / ms["overfill+compiled"]
        sane("OverFill decodes faster than the full model (compiled, batch 1)", ratio > 1,
                   f"full / overfill decode ms/token = {ratio:.2f} (weight bytes ratio "
                   f"{weight_bytes(model.full) / weight_bytes(model.decoder):.2f})")
        prefill = {row: rows[row]["prefill_s"]["median"] for row in ("overfill+compiled", "full+compiled")}
        same = abs(prefill["overfill+compiled"] / prefill["full+compiled"] - 1)
        sane("OverFill's prefill is the full model's", same < 0.25,
                   f"overfill / full prefill = {prefill['overfill+compiled'] / prefill['full+compiled']:.2f}")
    for row, r in check.result.get("roofline", {}).get("rows", {}).items():
        sane(f"{row} decode no faster than its weights can be read", r["of_roofline"] <= 1.05,
                   f"{r['measured_ms']:.3f} ms/token measured, roofline {r['roofline_ms']:.3f} ms ({r['of_roofline']:.0%})")
    prompt = figures["sweeps"].get("prompt_len")
    if prompt and len(prompt["values"]) > 1 and "full+compiled" in prompt["rows"]:
        prefill = [p["prefill_s"]["median"] for p in prompt["rows"]["full+compiled"]]
        sane("prefill grows with the prompt (Fig. 4)", prefill[-1] > prefill[0],
                   f"{1e3 * prefill[0]:.1f} ms at {prompt['values'][0]} tokens, {1e3 * prefill[-1]:.1f} ms at {prompt['values'][-1]}")
    batch = figures["sweeps"].get("batch")
    if batch and len(batch["values"]) > 1 and "overfill+compiled" in batch["rows"]:
        throughput = [p["tokens_per_s"]["median"] for p in batch["rows"]["overfill+compiled"]]
        sane("throughput grows with the batch (Fig. 5)", throughput[-1] > throughput[0],
                   f"{throughput[0]:.0f} tok/s at batch {batch['values'][0]}, {throughput[-1]:.0f} at {batch['values'][-1]}")
