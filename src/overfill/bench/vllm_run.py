"""`overfill bench --engine vllm`: the paper's Figures 3-5 with every mode served by vLLM, and our loop beside it.

Each mode is served the same way: the folder `overfill.vllm.export.engine_model(source, mode)`
(the exported OverFill pair, or the full model's / decoder's own folder) in vLLM's offline engine,
greedy, ignore_eos (exactly max_tokens tokens per row), no detokenisation (our loop does not
detokenise either). Every engine runs at vLLM's defaults, as users run it: compiled (CPU: one Dynamo
trace, Inductor; GPU: piecewise CUDA graphs for OverFill, vLLM's own choice for the plain models),
prefix caching on, its cache emptied before each run so that every run reads its whole prompt.
With --eager-rows (default) each mode is timed again at the key points with --enforce-eager: extra
rows labelled "vllm eager", for what compilation buys each model. With --draft-tokens K,...
the plain full model is timed at the key points beside vLLM's own draft-model speculative decoding
(the pruned decoder drafting K tokens on a cache of its own, the full model verifying them; the output
is the full model's own): rows overfill+specK/pruned, as our loop names the same configuration, under
the engine "vllm speculative", with vLLM's acceptance rate and tokens per target pass. The prompts
are those of the torch bench (bench/prompts.py: real text cut to an exact token count in the chat
template), given to vLLM as token ids, identical for every mode and engine.

Every mode's engine stays alive in a process of its own (overfill.vllm.worker) while the runs
are interleaved: round r times every point still owed a repeat (in an order rotated by r), and
each point in every mode back to back (the mode order rotated too), with a short pause before each
run so that the previous engine's threads are idle. Slow drift of the machine then hits all modes
alike, and the modes' repeats of one round can be paired, as the torch bench pairs its rows.

vLLM hands back whole requests, not steps, so a point (prompt length P, batch B, N new tokens)
is two kinds of runs of the same rows:
    prefill             = T_1, a run with max_tokens = 1 (prompt read, first token picked)
    decode per token    = (T_N - T_1) / (N - 1)  (one step of all B rows)
    end-to-end          = T_N
Per point and mode: the *best* (from the minimum T_1 and T_N over repeats: what the machine adds
to a run only ever makes it slower) and the median. Ratios between modes: of the best values, of
the medians, and *paired*: the median over rounds of the ratio within a round (each round's T_1
and T_N of both modes, run minutes apart at most), the least sensitive to drift.

Points: the key point at every --key-batches size (default batch 1 and 8; 128-token prompt, 256
new tokens); the new-tokens sweep (Fig. 3) at the key prompt and --batch-size; the prompt-length
sweep (Fig. 4) with its prefill/decode split; the batch sweep (Fig. 5). A point shared by several
(the key point is on every sweep) is timed once. Our own PyTorch loop is timed at the key points
too (bench/timing.measure_point, the torch bench's own measurement), on the same prompts.
With --load-test, bench/load.py then load-tests `overfill serve`.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import asdict

from overfill.atomic import check_writable
from overfill.bench.config import DISAGGREGATED, BenchConfig
from overfill.bench.prompts import PromptSource
from overfill.bench.vllm_timing import prompt_key, time_lanes
from overfill.configuration import Configuration
from overfill.errors import OverfillError
from overfill.interleaved import round_ratios

METRICS = ("prefill_s", "decode_s", "e2e_s", "decode_ms_per_token", "decode_tokens_per_s", "tokens_per_s")

# (name, a, b, metric): a/b within one engine. The paper's claims first (OverFill decodes faster than
# the full model, and costs about what the pruned model costs end to end), then what explains them.
RATIOS = (
    ("overfill decode tok/s / full", "overfill", "full", "decode_tokens_per_s"),
    ("overfill end-to-end / pruned", "overfill", "pruned", "e2e_s"),
    ("overfill end-to-end / full", "overfill", "full", "e2e_s"),
    ("overfill decode tok/s / pruned", "overfill", "pruned", "decode_tokens_per_s"),
    ("overfill prefill / full prefill", "overfill", "full", "prefill_s"),
    ("pruned prefill / full prefill", "pruned", "full", "prefill_s"),
    ("pruned decode tok/s / full", "pruned", "full", "decode_tokens_per_s"),
)
SWEEP_RATIOS = (("overfill / pruned", "overfill", "pruned"), ("overfill / full", "overfill", "full"))


# ---------------------------------------------------------------- what to time (no engine)


def plan_points(config: BenchConfig) -> list[dict]:
    """Every distinct run (prompt_len, batch, max_tokens) the figures need, with its repeats, sorted."""
    repeats: dict[tuple[int, int, int], int] = {}

    def need(prompt_len: int, batch: int, new_tokens: int, n_repeats: int) -> None:
        for max_tokens in {1, new_tokens}:
            key = (prompt_len, batch, max_tokens)
            repeats[key] = max(repeats.get(key, 0), n_repeats)

    for batch in config.key_batches:
        need(config.prompt_len, batch, config.new_tokens, config.repeats)
    for n in config.new_tokens_sweep:
        need(config.prompt_len, config.batch_size, n, config.sweep_repeats)
    for length in config.prompt_len_sweep:
        need(length, config.batch_size, config.sweep_new_tokens, config.sweep_repeats)
    for batch in config.batch_sweep:
        need(config.prompt_len, batch, config.sweep_new_tokens, config.sweep_repeats)
    return [{"prompt_len": p, "batch": b, "max_tokens": n, "repeats": r} for (p, b, n), r in sorted(repeats.items())]


def planned_tokens(points: list[dict]) -> int:
    """Generated tokens per row, summed over every timed run of one mode (a cost estimate)."""
    return sum(p["max_tokens"] * p["repeats"] for p in points)


# ---------------------------------------------------------------- summary math (no engine)


def _metrics(prefill_s: float, e2e_s: float, new_tokens: int, batch: int) -> dict:
    decode_s = e2e_s - prefill_s
    steps = new_tokens - 1
    return {"prefill_s": prefill_s, "decode_s": decode_s, "e2e_s": e2e_s,
            "decode_ms_per_token": 1e3 * decode_s / steps,
            # Throughputs count every row; None when noise made T_N no slower than T_1.
            "decode_tokens_per_s": batch * steps / decode_s if decode_s > 0 else None,
            "tokens_per_s": batch * new_tokens / e2e_s}


def point_summary(prompt_len: int, batch: int, new_tokens: int, t1: list[float], tn: list[float]) -> dict:
    """One point from its 1-token runs (t1) and N-token runs (tn): each metric's best (from minima) and median."""
    if new_tokens < 2 or not t1 or not tn:
        raise OverfillError(f"a point needs 1-token and {new_tokens}-token runs, and at least 2 new tokens")
    best = _metrics(min(t1), min(tn), new_tokens, batch)
    median = _metrics(statistics.median(t1), statistics.median(tn), new_tokens, batch)
    return {"prompt_len": prompt_len, "batch": batch, "new_tokens": new_tokens,
            **{m: {"best": best[m], "median": median[m]} for m in METRICS},
            "samples": {"t1_s": list(t1), "tn_s": list(tn)}}


def torch_summary(summary: dict) -> dict:
    """A torch-bench row (run.summarize) in the same shape: best = fastest repeat of each metric."""
    fastest = {m: ("max" if m.endswith("_per_s") else "min") for m in METRICS}
    return {"prompt_len": summary.get("prompt_len"), "batch": summary["batch"], "new_tokens": summary["new_tokens"],
            **{m: {"best": summary[m][fastest[m]], "median": summary[m]["median"]} for m in METRICS},
            "samples": summary["samples"]}


def ratio(a: dict | None, b: dict | None, metric: str) -> dict | None:
    """a/b of one metric: of the best values, of the medians, and paired (median over rounds of the
    ratio within a round; only for two vLLM points, whose repeats ran round by round). None when a
    value is missing or zero."""
    if not a or not b:
        return None
    out = {}
    for stat in ("best", "median"):
        x, y = a[metric][stat], b[metric][stat]
        out[stat] = x / y if x is not None and y else None
    if out["best"] is None:
        return None
    out["paired"] = _paired(a, b, metric)
    return out


def _paired(a: dict, b: dict, metric: str) -> float | None:
    sa, sb = a.get("samples", {}), b.get("samples", {})
    if "t1_s" not in sa or "t1_s" not in sb:
        return None
    x = [_metrics(t1, tn, a["new_tokens"], a["batch"])[metric] for t1, tn in zip(sa["t1_s"], sa["tn_s"])]
    y = [_metrics(t1, tn, b["new_tokens"], b["batch"])[metric] for t1, tn in zip(sb["t1_s"], sb["tn_s"])]
    per_round = round_ratios(x, y)
    return statistics.median(per_round) if per_round else None


def key_ratios(rows: dict[str, dict[str, dict]]) -> list[dict]:
    """`rows[engine][mode]` -> the RATIOS within each engine, then each mode's torch/vLLM end-to-end."""
    found = []
    for engine, modes in rows.items():
        for name, a, b, metric in RATIOS:
            r = ratio(modes.get(a), modes.get(b), metric)
            if r:
                found.append({"engine": engine, "name": name, "a": a, "b": b, "metric": metric, **r})
        for lane in (m for m in modes if "+spec" in m):  # vLLM's speculative decoding, against its target
            for what, metric in (("decode tok/s", "decode_tokens_per_s"), ("end-to-end", "e2e_s")):
                r = ratio(modes[lane], modes.get("full"), metric)
                if r:
                    found.append({"engine": engine, "name": f"{lane} {what} / full", "a": lane, "b": "full",
                                  "metric": metric, **r})
    for mode in rows.get("vllm", {}):
        r = ratio(rows.get("torch", {}).get(mode), rows["vllm"][mode], "e2e_s")
        if r:
            found.append({"engine": "torch/vllm", "name": f"{mode}: our loop end-to-end / vLLM", "a": mode, "b": mode,
                          "metric": "e2e_s", **r})
    return found


def key_point_plan(config: BenchConfig) -> list[dict]:
    """The key points alone (what the eager rows time)."""
    return [p for p in plan_points(config) if p["prompt_len"] == config.prompt_len and p["batch"] in config.key_batches
            and p["max_tokens"] in (1, config.new_tokens)]


def assemble(config: BenchConfig, seconds: dict[str, dict[tuple[int, int, int], list[float]]],
             torch_rows: dict[int, dict[str, dict]] | None = None,
             extra: dict[str, dict[str, dict[tuple[int, int, int], list[float]]]] | None = None,
             speculation: dict[str, dict] | None = None) -> dict:
    """Key points and sweeps from every mode's run times, `seconds[mode][(prompt_len, batch, max_tokens)]`
    (vLLM at its defaults). `extra[engine]` holds further lanes timed at the key points only, each phase
    side by side within itself ("vllm eager": the modes with --enforce-eager; "vllm speculative": the full
    model beside vLLM's draft-model speculative decoding); `speculation[lane]` their acceptance counters."""
    def point(mode, prompt_len, batch, n, runs_of=seconds):
        runs = runs_of[mode]
        return point_summary(prompt_len, batch, n, runs[(prompt_len, batch, 1)], runs[(prompt_len, batch, n)])

    modes = list(seconds)
    key_points = []
    for batch in config.key_batches:
        rows = {"vllm": {m: point(m, config.prompt_len, batch, config.new_tokens) for m in modes}}
        for engine, lanes in (extra or {}).items():
            rows[engine] = {n: point(n, config.prompt_len, batch, config.new_tokens, lanes) for n in lanes}
        if torch_rows and batch in torch_rows:
            rows["torch"] = torch_rows[batch]
        for name, counters in (speculation or {}).items():
            rows["vllm speculative"][name]["speculation"] = counters
        key_points.append({"prompt_len": config.prompt_len, "batch": batch, "new_tokens": config.new_tokens,
                           "rows": rows, "ratios": key_ratios(rows)})
    sweeps = {}
    for name, values, at in (
            ("new_tokens", config.new_tokens_sweep, lambda v: (config.prompt_len, config.batch_size, v)),
            ("prompt_len", config.prompt_len_sweep, lambda v: (v, config.batch_size, config.sweep_new_tokens)),
            ("batch", config.batch_sweep, lambda v: (config.prompt_len, v, config.sweep_new_tokens))):
        if not values:
            continue
        fixed = {"new_tokens": {"prompt_len": config.prompt_len, "batch": config.batch_size},
                 "prompt_len": {"batch": config.batch_size, "new_tokens": config.sweep_new_tokens},
                 "batch": {"prompt_len": config.prompt_len, "new_tokens": config.sweep_new_tokens}}[name]
        rows = {m: [point(m, *at(v)) for v in values] for m in modes}
        ratios = {}
        for label, a, b in SWEEP_RATIOS:
            if a in rows and b in rows:
                ratios[label] = [ratio(pa, pb, "e2e_s") for pa, pb in zip(rows[a], rows[b])]
        sweeps[name] = {"x": name, "values": list(values), **fixed, "rows": rows, "ratios_e2e": ratios}
    return {"key_points": key_points, "sweeps": sweeps}


# ---------------------------------------------------------------- the run


def run_vllm_bench(config: BenchConfig, console, model=None) -> dict:
    """Time every mode on vLLM (and our loop at the key points), write bench.json and plots, print the tables.

    `model` (an OverFillModel) is what our loop times; by default it is loaded from the config.
    """
    from overfill.vllm.export import engine_model
    from overfill.vllm.runtime import vllm_version
    from overfill.vllm.worker import worker_env

    version = vllm_version()  # one error line, before anything else, if vLLM is missing
    out = check_writable(config.out, "--out")
    points = plan_points(config)
    max_model_len = max(p["prompt_len"] + p["max_tokens"] for p in points)
    if config.load_test:
        from overfill.bench.load import load_context

        max_model_len = max(max_model_len, load_context(config))  # checked now, not after the offline runs
    started = time.perf_counter()
    # --disaggregated serves the plain full model and the decoder: their folders, checked here like the others'.
    loaded = tuple(m for mode in config.load_modes for m in (("full", "pruned") if mode == DISAGGREGATED else (mode,)))
    served = dict.fromkeys((*(config.modes if config.offline_runs else ()), *(loaded if config.load_test else ()),
                            *(("overfill",) if config.mixed_step else ()),
                            *(("full", "pruned") if config.draft_tokens else ())))
    with console.status("building the folders vLLM loads"):
        engines = {mode: engine_model(config, mode, dtype=config.engine_dtype) for mode in served}
    _check_context(engines, max_model_len)
    from transformers import AutoTokenizer

    # Every mode and both engines get these very ids (the pair shares one tokenizer: checked at export).
    prompts = PromptSource.from_tokenizer(AutoTokenizer.from_pretrained(str(next(iter(engines.values())).path)))
    rows = {prompt_key(p["prompt_len"], p["batch"]): prompts.batch(p["prompt_len"], p["batch"])[0].tolist() for p in points}
    out.mkdir(parents=True, exist_ok=True)

    from overfill.bench.results import environment

    env = environment(config.engine_dtype)  # "auto" until an engine says what vLLM chose
    env["vllm"] = version
    env["vllm_env"] = {k: v for k, v in worker_env().items() if k.startswith("VLLM_")}
    load = f"{env['load_average'][0]:.2f}" if env["load_average"] else "?"
    plan = (f"; per mode {len(points)} distinct runs, {sum(p['repeats'] for p in points)} timed, "
            f"{planned_tokens(points)} new tokens per row" if config.offline_runs else "")
    console.print(f"CPU: {env['cpu']['name']} ({', '.join(env['cpu']['instruction_sets']) or 'no AVX2'}), "
                  f"{env['cpu_count']} cores, load average {load}; {version}{plan}")
    result = {"config": asdict(config), "environment": env, "engine": "vllm",
              "engines": {m: {"path": str(e.path), "name": e.name} for m, e in engines.items()},
              "plan": points, "max_model_len": max_model_len}

    result.update(key_points=[], sweeps={}, workers={})
    if config.offline_runs:
        _time_offline(config, console, engines, points, rows, max_model_len, out, started, result, model)
    if config.load_test:
        from overfill.bench.load import run_load

        result["load"] = run_load(config, console, out)
    if config.mixed_step:
        from overfill.bench.mixed_step import run_mixed_step

        result["mixed_step"] = run_mixed_step(config, console, out)
    result["seconds"] = time.perf_counter() - started
    env["dtype"] = served_dtype(result) or env["dtype"]

    from overfill.bench.plots import write_vllm_plots
    from overfill.bench.report import print_vllm_bench
    from overfill.bench.results import publish

    return publish(result, out, console, write_vllm_plots, print_vllm_bench)


def served_dtype(result: dict) -> str | None:
    """The dtype vLLM ran the models in, as its engines reported it (every engine of a run resolves it alike)."""
    found = [w.get("dtype") for w in result.get("workers", {}).values()]
    found += [row.get("dtype") for run in result.get("load", []) for row in run["rows"].values()]
    found += [result.get("mixed_step", {}).get("dtype")]
    return next((dtype for dtype in found if dtype), None)


def _time_offline(config: BenchConfig, console, engines: dict, points: list[dict], rows: dict, max_model_len: int,
                  out, started: float, result: dict, model) -> None:
    """The offline engines' runs (and our loop's at the key points): key points, sweeps, extra lanes, into `result`."""
    torch_rows = None
    if config.torch_rows:
        torch_rows, result["models"] = _time_torch(config, console, rows, model)
        console.print(f"our PyTorch loop timed at batch {', '.join(map(str, config.key_batches))} "
                      f"({time.perf_counter() - started:.0f} s)")

    seconds, workers = time_lanes(config, {m: (engines[m], {}) for m in config.modes}, points, rows, max_model_len,
                                  out, console, started)
    result["workers"] = dict(workers)
    samples, extra, speculation = dict(seconds), {}, {}
    for engine, lanes in extra_lanes(config, engines).items():
        lane_seconds, lane_workers = time_lanes(config, lanes, key_point_plan(config), rows, max_model_len, out,
                                                console, started, label=engine.replace("vllm", "vLLM"))
        extra[engine] = lane_seconds
        for name, worker in lane_workers.items():
            result["workers"][f"{engine}: {name}"] = worker
            samples[f"{engine}: {name}"] = lane_seconds[name]
            if worker.get("speculation"):
                speculation[name] = worker["speculation"]
    result["samples"] = {m: [{"prompt_len": k[0], "batch": k[1], "max_tokens": k[2], "seconds": v} for k, v in s.items()]
                         for m, s in samples.items()}
    result.update(assemble(config, seconds, torch_rows, extra, speculation))


def extra_lanes(config: BenchConfig, engines: dict) -> dict[str, dict[str, tuple]]:
    """The key-point-only phases after the main one: engine label -> lane -> (EngineModel, vLLM settings)."""
    phases = {}
    if config.eager_rows:
        phases["vllm eager"] = {m: (engines[m], {"enforce_eager": True}) for m in config.modes}
    if config.draft_tokens:
        # vLLM's own draft-model speculative decoding: the plain full model verifies, the pruned decoder
        # (a model of its own, with its own KV cache) drafts, as our loop's overfill+specK/pruned; the full
        # model alone beside it for the ratio.
        draft = str(engines["pruned"].path)
        phases["vllm speculative"] = {"full": (engines["full"], {}), **{
            Configuration("overfill", draft_tokens=k, drafter="pruned").name: (engines["full"], {"speculative_config": {"method": "draft_model", "model": draft,
                                                                      "num_speculative_tokens": k},
                                                "disable_log_stats": False})  # its acceptance counters
            for k in config.draft_tokens}}
    return phases


def _check_context(engines: dict, max_model_len: int) -> None:
    for mode, engine in engines.items():
        limit = json.loads((engine.path / "config.json").read_text()).get("max_position_embeddings")
        if limit and max_model_len > limit:
            raise OverfillError(f"prompt + new tokens reach {max_model_len} positions, the {mode} model has {limit}: "
                                "shorten the sweeps")


def _time_torch(config: BenchConfig, console, prompt_rows: dict[str, list[list[int]]], model=None):
    """Our loop at each key batch (the torch bench's measure_point) on vLLM's prompt ids: rows per batch and mode."""
    import torch

    from overfill.bench.results import describe, summarize
    from overfill.bench.timing import measure_point
    from overfill.tensors import pad_id_of

    model = model if model is not None else config.load()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        model.full.eval()
        model.decoder.eval()
        pad_id = pad_id_of(model.tokenizer)
        rows = {}
        gc.collect()
        gc.freeze()  # as the torch bench does: keep the collector's scans short during timing
        with torch.inference_mode(), console.status("our PyTorch loop") as status:
            for batch in config.key_batches:
                ids = torch.tensor(prompt_rows[prompt_key(config.prompt_len, batch)], dtype=torch.long)  # [B, P], no padding
                mask = torch.ones_like(ids)
                runs = measure_point(model, config.modes, ids, mask, {m: config.new_tokens for m in config.modes}, pad_id,
                                     config.repeats, config.warmup,
                                     lambda text, b=batch: status.update(f"our PyTorch loop, batch {b}: {text}"))
                rows[batch] = {m: torch_summary({**summarize([r.split() for r in runs[m]], batch),
                                                 "prompt_len": config.prompt_len}) for m in config.modes}
        return rows, describe(model)
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
        del model  # the engines that follow get the memory
        gc.collect()
