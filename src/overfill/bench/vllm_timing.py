"""The vLLM side of `overfill bench --engine vllm`: every mode's engine alive at once, the runs interleaved.

Each mode's engine is an `overfill.vllm.worker.EngineWorker` (a process of its own, vLLM's engine
core inside it). Round r times every point still owed a repeat (in an order rotated by r), and each
point in every mode back to back (the mode order rotated too), after a short pause so the engine
that ran last has let its threads go idle. A run is one generate call on the point's rows: greedy,
ignore_eos (exactly max_tokens tokens per row), no detokenisation, prefix cache reset before it (so
every run reads its whole prompt, while the engine keeps vLLM's default of caching prefixes).
"""

from __future__ import annotations

import time
from contextlib import ExitStack

from overfill.bench.config import BenchConfig
from overfill.errors import OverfillError


def rounds(points: list[dict]) -> list[list[dict]]:
    """The timed runs, round by round: every point with repeats left, in an order rotated by the round."""
    out = []
    for r in range(max((p["repeats"] for p in points), default=0)):
        k = r % len(points)
        out.append([p for p in points[k:] + points[:k] if p["repeats"] > r])
    return out


def rotated(items: tuple[str, ...], k: int) -> tuple[str, ...]:
    k %= len(items)
    return items[k:] + items[:k]


def prompt_key(prompt_len: int, batch: int) -> str:
    return f"{prompt_len}x{batch}"


PAUSE_S = 0.3  # before each timed run: the engine that ran last has let its threads go idle


def time_modes(config: BenchConfig, engines: dict, points: list[dict], rows: dict[str, list[list[int]]],
               max_model_len: int, out, console, started: float, *, eager: bool = False):
    """Every mode's engine alive side by side, the points timed round by round, all modes back to back.

    Each engine runs at vLLM's defaults (compiled, prefix caching on: the cache is emptied before each
    run), as users run it; `eager` adds vLLM's --enforce-eager to every mode (the extra, labelled rows).
    Returns seconds[mode][(prompt_len, batch, max_tokens)] (in round order) and each worker's details.
    """
    from overfill.vllm.worker import EngineWorker

    modes = tuple(config.modes)
    label = "vLLM eager" if eager else "vLLM"
    shapes = list(dict.fromkeys((p["prompt_len"], p["batch"]) for p in points))
    seconds = {m: {_key(p): [] for p in points} for m in modes}
    with ExitStack() as stack:
        workers = {}
        for mode in modes:
            worker = EngineWorker(engines[mode], out / "logs" / f"vllm_{mode}{'_eager' if eager else ''}.log",
                                  engine={"max_model_len": max_model_len, **({"enforce_eager": True} if eager else {})},
                                  what=f"{label} ({mode})")
            stack.callback(worker.close)
            with console.status(f"{label} {mode}: starting") as status:
                worker.start(lambda text, m=mode: status.update(f"{label} {m}: {text}"))
                for i in range(config.warmup):  # the first call on a shape pays one-time costs
                    for prompt_len, batch in shapes:
                        status.update(f"{label} {mode}: warm-up {i + 1}/{config.warmup}, prompt {prompt_len} x batch {batch}")
                        _timed_run(worker, rows[prompt_key(prompt_len, batch)], WARMUP_TOKENS)
            worker.stats(reset=True)
            workers[mode] = worker
            console.print(f"{label} {mode} ready: engine start {worker.info['engine_start_s']:.0f} s "
                          f"({time.perf_counter() - started:.0f} s so far)")
        plan = rounds(points)
        with console.status(f"{label} runs") as status:
            for r, round_points in enumerate(plan):
                for j, p in enumerate(round_points):
                    for mode in rotated(modes, r + j):
                        status.update(f"{label} round {r + 1}/{len(plan)}, run {j + 1}/{len(round_points)}: prompt "
                                      f"{p['prompt_len']} x batch {p['batch']}, {p['max_tokens']} tokens, {mode}")
                        time.sleep(PAUSE_S)
                        ids = rows[prompt_key(p["prompt_len"], p["batch"])]
                        seconds[mode][_key(p)].append(_timed_run(workers[mode], ids, p["max_tokens"]))
        details = {}
        for mode, worker in workers.items():
            details[mode] = {**worker.info, "overfill_stats": worker.stats()}
            check_worker({**details[mode], "points": [{**p, "seconds": seconds[mode][_key(p)]} for p in points]}, points)
    console.print(f"{label}: modes timed, interleaved ({time.perf_counter() - started:.0f} s so far)")
    return seconds, details


WARMUP_TOKENS = 2


def _key(p: dict) -> tuple[int, int, int]:
    return p["prompt_len"], p["batch"], p["max_tokens"]


def _timed_run(worker, ids: list[list[int]], max_tokens: int) -> float:
    """One generate call on the rows, exactly `max_tokens` tokens each; its seconds."""
    replies, seconds = worker.generate(ids, temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    made = {len(r) for r in replies}
    if made != {max_tokens} or len(replies) != len(ids):
        raise OverfillError(f"vLLM ({worker.model.mode}) was asked for {len(ids)} rows of {max_tokens} tokens and made "
                            f"{len(replies)} rows of {sorted(made)}")
    return seconds


def check_worker(worker: dict, points: list[dict]) -> None:
    got = {(p["prompt_len"], p["batch"], p["max_tokens"]): len(p["seconds"]) for p in worker["points"]}
    for p in points:
        if got.get((p["prompt_len"], p["batch"], p["max_tokens"])) != p["repeats"]:
            raise OverfillError(f"vLLM ({worker['mode']}) timed point {p} {got.get((p['prompt_len'], p['batch'], p['max_tokens']))} "
                                "times: the engine worker and the plan disagree")
    stats = worker.get("overfill_stats")
    if stats:
        # Over the timed runs, the full model reads every prompt token and the decoder every generated
        # token but the last (a run of N tokens feeds N - 1 of them back in).
        expected = {"full_tokens": sum(p["repeats"] * p["prompt_len"] * p["batch"] for p in points),
                    "decoder_tokens": sum(p["repeats"] * (p["max_tokens"] - 1) * p["batch"] for p in points)}
        got = {k: stats.get(k) for k in expected}
        if got != expected:
            raise OverfillError(f"vLLM's OverFill model ran {got} tokens through its two stages, not {expected}: prompt "
                                "tokens must go to the full model and generated ones to the decoder (see overfill.vllm.tracker)")
