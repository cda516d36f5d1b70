"""`overfill bench`: prefill and decode latency of each mode, split as in the paper's Figures 3-5.

Every mode runs through the one generation loop (`generation.generate_ids`), so the three rows
differ only in which model prefills and which decodes (docs/design.md, "Modes"):

    overfill  full prefill + first token, decoder decodes   (paper §3)
    full      the full model does everything                (the latency to beat)
    pruned    the decoder does everything                   (the paper's baseline)

Reference rows run Hugging Face `generate` the same way: the full model alone, and assisted
generation with the decoder as the assistant (it keeps its own cache; docs/design.md, "Traps in transformers 5.x").

What is measured (all fp32, `torch.inference_mode`, greedy, EOS disabled so every run has the
asked length; modes interleaved in rotating order within each repeat so that machine drift hits
them alike and ratios are paired per repeat):

- key point: one prompt length, batch and reply length (default: a 128-token chat prompt,
  batch 1, 256 new tokens), every mode and the reference rows side by side;
- new tokens sweep (paper Fig. 3): read off the same runs. A loop run of N_max tokens passes
  through exactly the states of a run of N < N_max tokens, so its first N steps *are* that run;
- prompt length sweep (paper Fig. 4) and batch sweep (paper Fig. 5), each at a fixed reply length;
- loop overhead: the loop's decode steps vs the same decoder forwards called by hand on the same
  inputs, paired step by step.

Prompts are synthetic but real text: the bundled calibration chats, concatenated and cut to an
exact token count inside the tokenizer's chat template, so runs are reproducible.
Outputs in --out: bench.json (config, environment, every sample) and PNG plots (plots.py); the
tables go to the terminal (report.py). How one run is timed is in timing.py.
"""

from __future__ import annotations

import copy
import gc
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from overfill import speculative
from overfill.atomic import check_writable
from overfill.bench.config import BenchConfig
from overfill.bench.plots import write_plots
from overfill.bench.prompts import PromptSource
from overfill.bench.report import print_bench
from overfill.bench.results import describe, environment, publish, summarize
from overfill.bench.timing import REFERENCES, loop_overhead, measure_point
from overfill.configuration import Configuration, parse
from overfill.decode_step import compile_seconds
from overfill.devices import model_device
from overfill.errors import OverfillError
from overfill.interleaved import paired_ratio
from overfill.modeling import MODES
from overfill.tensors import pad_id_of

# The paper's two claims first (OverFill decodes faster than the full model, and costs about
# what the pruned model costs end to end), then the ratios that explain them: (name, a, b, metric).
RATIOS = (
    ("overfill decode tok/s / full", "overfill", "full", "decode_tokens_per_s"),
    ("overfill end-to-end / pruned end-to-end", "overfill", "pruned", "e2e_s"),
    ("overfill decode tok/s / pruned", "overfill", "pruned", "decode_tokens_per_s"),
    ("overfill end-to-end / full end-to-end", "overfill", "full", "e2e_s"),
    ("overfill prefill / full prefill", "overfill", "full", "prefill_s"),
    ("pruned prefill / full prefill", "pruned", "full", "prefill_s"),
    ("loop full end-to-end / HF generate", "full", "hf_generate", "e2e_s"),
    ("overfill end-to-end / HF generate", "overfill", "hf_generate", "e2e_s"),
    ("overfill end-to-end / HF assisted", "overfill", "hf_assisted", "e2e_s"),
)


def decoder_variants(model, dtypes: tuple[str, ...]) -> dict:
    """Row overfill@DTYPE -> the same full model with a copy of the decoder in DTYPE (float32 is the overfill row)."""
    from overfill.modeling import OverFillModel
    from overfill.precision import decoder_dtype, set_decoder_dtype

    variants = {}
    for dtype in dtypes:
        if dtype == decoder_dtype(model.decoder):
            continue
        decoder = set_decoder_dtype(copy.deepcopy(model.decoder), dtype)
        variants[Configuration("overfill", decoder_dtype=dtype).name] = OverFillModel(model.full, decoder, model.tokenizer, full_source=model.full_source)
    return variants


def key_ratios(rows: dict) -> list[dict]:
    """The paper's ratios among eager rows, the same among compiled rows (each side on its engine's default,
    the compiled step), what compiling gains per mode, and what the refresh and dtype rows cost."""
    def compiled(mode: str) -> str:
        return Configuration(mode, compiled=True).name

    found = []
    on_compiled = [(" ".join(compiled(word) if word in MODES else word for word in name.split()), compiled(a), compiled(b),
                    metric) for name, a, b, metric in RATIOS if b not in REFERENCES]
    gains = [(f"{compiled(mode)} decode tok/s / {mode}", compiled(mode), mode, "decode_tokens_per_s") for mode in MODES]
    variants = []
    for row in rows:
        if row in REFERENCES:
            continue
        configuration = parse(row)
        overfill, full = (Configuration(mode, compiled=configuration.compiled).name for mode in ("overfill", "full"))
        if configuration.refresh_every or configuration.decoder_dtype:
            variants.append((f"{row} decode ms/token / {overfill}", row, overfill, "decode_ms_per_token"))
        if configuration.decoder_dtype:
            variants.append((f"{row} decode tok/s / {full}", row, full, "decode_tokens_per_s"))
        if configuration.draft_tokens:  # lossless: what matters is its speed against the full model's, eager and compiled
            variants += [(f"{row} decode tok/s / {other}", row, other, "decode_tokens_per_s")
                         for other in dict.fromkeys((full, "full", compiled("full")))]
    for name, a, b, metric in (*RATIOS, *on_compiled, *gains, *variants):
        if a in rows and b in rows:
            ratio = paired_ratio(rows[a], rows[b], metric)
            if ratio is not None:
                found.append({"name": name, "a": a, "b": b, "metric": metric, **ratio})
    return found


# ---------------------------------------------------------------- the measurements


def run_bench(config: BenchConfig, console, model=None) -> dict:
    """Time the modes and reference rows, write bench.json and plots to config.out, print the tables.

    `model` (an OverFillModel) skips loading from config.checkpoint / config.model + config.decoder.
    With --engine vllm the modes are served by vLLM instead (bench/vllm_run.py).
    """
    if config.engine == "vllm":
        from overfill.bench.vllm_run import run_vllm_bench

        return run_vllm_bench(config, console, model)
    if config.memory:
        return _run_memory(config, console)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run_bench(config, console, model)
    finally:
        torch.set_num_threads(threads)


def _run_memory(config: BenchConfig, console) -> dict:
    from overfill.bench.memory import run_memory

    check_writable(config.out, "--out")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"config": asdict(config), "memory": run_memory(config, console, out)}
    result["seconds"] = round(time.perf_counter() - started, 1)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    console.print(f"{result['memory']['cpu']['name']}; {result['seconds']:.0f} s; wrote bench.json to {out}")
    return result


def _run_bench(config: BenchConfig, console, model) -> dict:
    check_writable(config.out, "--out")  # before minutes of timing, not after
    if model is None:
        model = config.load()
    model.full.eval()
    model.decoder.eval()
    limit = getattr(model.full.config, "max_position_embeddings", None)
    longest = max((config.prompt_len, *config.prompt_len_sweep)) + max(config.key_run_tokens, config.sweep_new_tokens)
    if limit and longest > limit:
        raise OverfillError(f"prompt + new tokens reach {longest} positions, the model has {limit}: shorten the sweeps")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    pad_id = pad_id_of(model.tokenizer)
    prompts = PromptSource.from_tokenizer(model.tokenizer)
    result = {"config": asdict(config), "environment": environment(config.dtype, model_device(model.full)),
              "models": describe(model)}
    if config.decoder_dtypes:
        from overfill.precision import precision_summary

        # what each decoder dtype computes in here (decided by capability), beside this run's own rows timing it
        result["decoder_precision"] = precision_summary(tuple(config.decoder_dtypes), model_device(model.full))
    started = time.perf_counter()
    # A full collection takes ~0.2 s here, as long as a few decode steps: freeze what exists now so
    # that the collector's occasional runs during timing only scan the few objects the runs create.
    gc.collect()
    gc.freeze()
    try:
        _measure(model, config, console, prompts, pad_id, result, started)
    finally:
        gc.unfreeze()
    result["seconds"] = time.perf_counter() - started
    return publish(result, out, console, write_plots, print_bench)


def _measure(model, config: BenchConfig, console, prompts: PromptSource, pad_id: int, result: dict, started: float) -> None:
    with torch.inference_mode(), console.status("benchmarking") as status:
        def report(text):
            status.update(f"benchmarking: {text}")

        rows, variants, skipped = bench_rows(model, config)
        result["key_point"], runs = measure_key_point(model, config, prompts, pad_id, rows, variants, skipped, report)
        console.print(f"key point timed ({time.perf_counter() - started:.0f} s)")
        # Every sweep shows every loop row (refresh and decoder-dtype rows too: whether bfloat16 or
        # int8 pays can flip between batch 1 and batch 8).
        loop_rows = tuple(row for row in rows if row not in REFERENCES)
        sweeps = {}
        if config.new_tokens_sweep:
            sweeps["new_tokens"] = new_tokens_sweep(config, runs, loop_rows)
        for name in ("prompt_len", "batch"):
            if getattr(config, f"{name}_sweep"):
                sweeps[name] = measure_sweep(model, config, name, prompts, pad_id, loop_rows, variants, report)
                console.print(f"{name} sweep timed ({time.perf_counter() - started:.0f} s)")
        result["sweeps"] = sweeps

        if config.overhead_steps:
            report("loop overhead")
            ids, mask = prompts.batch(config.prompt_len, config.batch_size)
            result["overhead"] = loop_overhead(model, ids, mask, config.overhead_steps, config.repeats, pad_id)
        result["compile_seconds"] = compile_report(model, variants)


def bench_rows(model, config: BenchConfig) -> tuple[tuple[str, ...], dict, dict]:
    """(the key point's rows, the models of the decoder-dtype rows, rows skipped and why): every mode, refresh,
    dtype and speculative row, eager and/or compiled, each named as configuration.py names it, then the HF
    reference rows."""
    configurations = [Configuration(mode) for mode in config.modes]
    if "overfill" in config.modes:
        configurations += [Configuration("overfill", refresh_every=k) for k in config.refresh_every]
    variants = decoder_variants(model, config.decoder_dtypes)
    configurations += [parse(row) for row in variants]
    configurations += [Configuration("overfill", draft_tokens=k, drafter=drafter) for k in config.draft_tokens
                       for drafter in config.drafters]
    steps = [compiled for compiled in (False, True) if ("compiled" if compiled else "eager") in config.decode_steps]
    rows = tuple(replace(c, compiled=compiled).name for compiled in steps for c in configurations)
    skipped = {}
    if config.references:
        rows = rows + ("hf_generate",)
        if config.batch_size == 1:
            rows = rows + ("hf_assisted",)
        else:
            skipped["hf_assisted"] = "HF assisted generation runs batch 1 only"
    return rows, variants, skipped


def measure_key_point(model, config: BenchConfig, prompts: PromptSource, pad_id: int, rows, variants: dict, skipped: dict,
                      report) -> tuple[dict, dict]:
    """The key point (every row side by side, with ratios) and its runs: loop runs of key_run_tokens, so the
    new-tokens sweep can be read off them; HF rows exactly new_tokens long."""
    batch = config.batch_size
    ids, mask = prompts.batch(config.prompt_len, batch)
    lengths = {row: config.new_tokens if row in REFERENCES else config.key_run_tokens for row in rows}
    runs = measure_point(model, rows, ids, mask, lengths, pad_id, config.repeats, config.warmup,
                         lambda t: report(f"key point, {t}"), models=variants)
    key_rows = {row: summarize([r.split(config.new_tokens) for r in runs[row]], batch) for row in rows}
    for row in rows:
        if runs[row][0].speculation is not None:  # counters over the whole timed runs (key_run_tokens long)
            key_rows[row]["speculation"] = speculative.total([r.speculation for r in runs[row]])
    key = {"prompt_len": config.prompt_len, "batch": batch, "new_tokens": config.new_tokens,
           "rows": key_rows, "ratios": key_ratios(key_rows), "skipped": skipped}
    return key, runs


def new_tokens_sweep(config: BenchConfig, runs: dict, loop_rows) -> dict:
    """Paper Fig. 3, read off the key point's runs: a loop run of N_max tokens passes through exactly the states of
    a run of N < N_max tokens, so its first N steps *are* that run."""
    return {"x": "new_tokens", "values": list(config.new_tokens_sweep), "prompt_len": config.prompt_len,
            "batch": config.batch_size,
            "note": f"read off the first N steps of the key point's {config.key_run_tokens}-token loop runs",
            "rows": {row: [summarize([r.split(n) for r in runs[row]], config.batch_size) for n in config.new_tokens_sweep]
                     for row in loop_rows}}


def measure_sweep(model, config: BenchConfig, name: str, prompts: PromptSource, pad_id: int, loop_rows, variants: dict,
                  report, time_left=None) -> dict:
    """Paper Fig. 4 (name prompt_len) or Fig. 5 (batch), each point timed at config.sweep_new_tokens new tokens.

    `time_left()` (seconds), when given, ends the sweep early once the next point may not fit: the values
    timed so far are kept, and `cut_short` says so.
    """
    values = getattr(config, f"{name}_sweep")
    n = config.sweep_new_tokens
    sweep = {"x": name, "values": [], "new_tokens": n,
             **({"batch": config.batch_size} if name == "prompt_len" else {"prompt_len": config.prompt_len}),
             "rows": {row: [] for row in loop_rows}}
    took = 0.0
    for value in values:
        if time_left is not None and time_left() < 2 * took:
            sweep["cut_short"] = f"stopped before {value}: out of time"
            break
        started = time.perf_counter()
        p_len, p_batch = (value, config.batch_size) if name == "prompt_len" else (config.prompt_len, value)
        p_ids, p_mask = prompts.batch(p_len, p_batch)
        point_runs = measure_point(model, loop_rows, p_ids, p_mask, {row: n for row in loop_rows}, pad_id,
                                   config.sweep_repeats, config.warmup, lambda t: report(f"{name} {value}, {t}"),
                                   models=variants)
        for row in loop_rows:
            sweep["rows"][row].append(summarize([r.split() for r in point_runs[row]], p_batch))
        sweep["values"].append(value)
        took = time.perf_counter() - started
    return sweep


def compile_report(model, variants: dict | None = None) -> dict:
    """First call of each compiled shape, per model: compiling (or capturing a CUDA graph), paid once per process."""
    return {"full": compile_seconds(model.full), "decoder": compile_seconds(model.decoder),
            **{row: compile_seconds(v.decoder) for row, v in (variants or {}).items()}}
