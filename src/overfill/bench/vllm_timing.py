"""The vLLM side of `overfill bench --engine vllm`: every lane's engine alive at once, the runs interleaved.

Each lane (a mode, or a mode with extra vLLM settings)'s engine is an `overfill.vllm.worker.EngineWorker` (a process of its own, vLLM's engine
core inside it). Round r times every point still owed a repeat (in an order rotated by r: interleaved.rounds),
and each point in every mode back to back (the mode order rotated too), after a short pause so the engine
that ran last has let its threads go idle. A run is one generate call on the point's rows: greedy,
ignore_eos (exactly max_tokens tokens per row), no detokenisation, prefix cache reset before it (so
every run reads its whole prompt, while the engine keeps vLLM's default of caching prefixes).
"""

from __future__ import annotations

import time
from contextlib import ExitStack

from overfill.bench.config import BenchConfig
from overfill.errors import OverfillError
from overfill.interleaved import rotated, rounds


def prompt_key(prompt_len: int, batch: int) -> str:
    return f"{prompt_len}x{batch}"


PAUSE_S = 0.3  # before each timed run: the engine that ran last has let its threads go idle


def time_lanes(config: BenchConfig, lanes: dict[str, tuple], points: list[dict], rows: dict[str, list[list[int]]],
               max_model_len: int, out, console, started: float, *, label: str = "vLLM"):
    """Every lane's engine alive side by side, the points timed round by round, all lanes back to back.

    A lane is (EngineModel, vLLM keyword arguments beyond the model's own): `{}` is vLLM's defaults
    (compiled, prefix caching on), as users run it; the bench adds {"enforce_eager": True} for its eager
    rows and a `speculative_config` for vLLM's own speculative decoding. The prefix cache is emptied
    before every run, so each run reads its whole prompt.
    Returns seconds[lane][(prompt_len, batch, max_tokens)] (in round order) and each worker's details.
    """
    from overfill.vllm import COUNT_TOKENS_ENV
    from overfill.vllm.worker import EngineWorker, worker_env

    names = tuple(lanes)
    slug = label.lower().replace(" ", "_")
    shapes = list(dict.fromkeys((p["prompt_len"], p["batch"]) for p in points))
    seconds = {n: {_key(p): [] for p in points} for n in names}
    with ExitStack() as stack:
        workers, before = {}, {}
        for name in names:
            model, overrides = lanes[name]
            # the OverFill model counts each stage's tokens, for check_worker (a few host additions a step)
            worker = EngineWorker(model, out / "logs" / f"{slug}_{name.replace(' ', '_').replace('=', '')}.log",
                                  engine={"max_model_len": max_model_len, **overrides}, what=f"{label} ({name})",
                                  env={**worker_env(), COUNT_TOKENS_ENV: "1"})
            stack.callback(worker.close)
            with console.status(f"{label} {name}: starting") as status:
                worker.start(lambda text, n=name: status.update(f"{label} {n}: {text}"))
                for i in range(config.warmup):  # the first call on a shape pays one-time costs
                    for prompt_len, batch in shapes:
                        status.update(f"{label} {name}: warm-up {i + 1}/{config.warmup}, prompt {prompt_len} x batch {batch}")
                        _timed_run(worker, rows[prompt_key(prompt_len, batch)], WARMUP_TOKENS)
            worker.stats(reset=True)
            before[name] = worker.speculation()
            workers[name] = worker
            console.print(f"{label} {name} ready: engine start {worker.info['engine_start_s']:.0f} s "
                          f"({time.perf_counter() - started:.0f} s so far)")
        total = max((p["repeats"] for p in points), default=0)
        with console.status(f"{label} runs") as status:
            # the points interleaved round by round, and within each point every lane, in an order rotated again
            for r, j, p in rounds(points, lambda p: p["repeats"]):
                for name in rotated(names, r + j):
                    status.update(f"{label} round {r + 1}/{total}, run {j + 1}: prompt {p['prompt_len']} x batch "
                                  f"{p['batch']}, {p['max_tokens']} tokens, {name}")
                    time.sleep(PAUSE_S)
                    ids = rows[prompt_key(p["prompt_len"], p["batch"])]
                    seconds[name][_key(p)].append(_timed_run(workers[name], ids, p["max_tokens"]))
        details = {}
        for name, worker in workers.items():
            details[name] = {**worker.info, "overfill_stats": worker.stats(),
                             "speculation": speculation_between(before[name], worker.speculation())}
            check_worker({**details[name], "points": [{**p, "seconds": seconds[name][_key(p)]} for p in points]}, points)
    console.print(f"{label}: lanes timed, interleaved ({time.perf_counter() - started:.0f} s so far)")
    return seconds, details


def speculation_rates(counters: dict) -> dict:
    """vLLM's speculative-decoding counters (drafts, draft_tokens, accepted_tokens) with what they mean: the
    acceptance rate, and the tokens each pass of the full model (the target) keeps, under the names our loop
    reports them by (speculative.Speculation.as_dict)."""
    drafts, drafted, accepted = (counters[k] for k in ("drafts", "draft_tokens", "accepted_tokens"))
    return {**counters, "acceptance_rate": accepted / drafted if drafted else None,
            # each verification pass of the target keeps the accepted drafts plus one token of its own
            "tokens_per_full_pass": 1 + accepted / drafts if drafts else None}


def speculation_between(start: dict | None, end: dict | None) -> dict | None:
    """The counters' rates over the timed runs alone (the warm-up's drafts left out)."""
    if not start or not end:
        return None
    return speculation_rates({k: end[k] - start[k] for k in ("drafts", "draft_tokens", "accepted_tokens")})


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
                                "tokens must go to the full model and generated ones to the decoder (see overfill.vllm.plugin.tracker)")
