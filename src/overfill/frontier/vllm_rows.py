"""The configurations users would run on vLLM instead, on the same prompts (`overfill frontier --vllm`):
vLLM serving the full model, the pruned baseline and OverFill (our plugin), and vLLM's own draft-model
speculative decoding (the plain full model verifies; the pruned baseline's folder drafts, with a KV
cache of its own), all at vLLM's defaults (compiled, prefix caching on).

One engine at a time, each in a process of its own (vllm/worker.py): it makes greedy replies to the
quality prompts (their agreement with the full model's replies in our loop: token match, tokens
before the first divergence, exact match) and times the timing prompts one at a time. vLLM times
whole requests, so decode ms/token is (T_N - T_1) / (N - 1) per reply: T_1 a run of one token (the
prefill and first token), T_N the whole reply; the prefix cache is reset before every request.
A row's teacher-forced top-1 agreement is its model's in our loop (the same weights; the full model's
for speculative decoding, whose replies are the full model's).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from overfill.bench.vllm_timing import speculation_rates
from overfill.configuration import Configuration
from overfill.evaluation.agreement import greedy_agreement
from overfill.evaluation.config import ModelEntry
from overfill.interleaved import spread


def vllm_lanes(config, entries: list[ModelEntry], draft_tokens: tuple[int, ...]) -> list[dict]:
    """name, engine folder, engine settings and the our-loop entry whose teacher-forced quality it shares."""
    from overfill.vllm.export import engine_model

    plain = {}
    for entry in entries:
        if not (entry.refresh_every or entry.draft_tokens or entry.decoder_dtype):
            plain.setdefault(entry.mode, entry)
    lanes = [{"name": f"vllm {mode}", "model": engine_model(config.source_of(entry), mode), "engine": {},
              "like": entry.name, "kind": "vllm"} for mode, entry in plain.items()]
    if "full" in plain and "pruned" in plain:
        target = engine_model(config.source_of(plain["full"]), "full")
        draft = str(engine_model(config.source_of(plain["pruned"]), "pruned").path)
        lanes += [{"name": f"vllm {Configuration('overfill', draft_tokens=k, drafter='pruned').label}", "model": target, "like": plain["full"].name, "kind": "vllm speculative",
                   "engine": {"speculative_config": {"method": "draft_model", "model": draft, "num_speculative_tokens": k},
                              "disable_log_stats": False}} for k in draft_tokens]
    return lanes


def time_lane(worker, contexts: list[list[int]], params: dict, repeats: int) -> dict:
    """Decode ms/token per round over the timing prompts, each reply (T_N - T_1) / (N - 1)."""
    generate = worker.generate
    for context in contexts:  # warm-up: every prompt length once
        generate([context], **{**params, "max_tokens": 2})
    rounds = []
    for _ in range(repeats):
        decode_s, tokens = 0.0, 0
        for context in contexts:
            _, first_s = generate([context], **{**params, "max_tokens": 1})
            (reply,), whole_s = generate([context], **params)
            if len(reply) > 1:
                decode_s, tokens = decode_s + max(whole_s - first_s, 0.0), tokens + len(reply) - 1
        rounds.append(1e3 * decode_s / max(tokens, 1))
    return {"decode_ms_per_token": spread(rounds), "samples": {"decode_ms_per_token": rounds}, "decode_step": "vLLM defaults"}


def vllm_points(config, entries: list[ModelEntry], contexts: list[list[int]], reference: list[list[int]],
                stop_ids: set[int], console) -> dict[str, dict]:
    """Each lane: its decode timing, its greedy agreement with `reference` (the full model's replies in our loop),
    vLLM's acceptance counters for speculative lanes, and its engine start."""
    from overfill.vllm.runtime import vllm_version
    from overfill.vllm.worker import EngineWorker

    version = vllm_version()  # one error line if vLLM is missing, before any engine starts
    params = {"temperature": 0.0, "max_tokens": config.max_new_tokens, "stop_token_ids": sorted(stop_ids),
              "detokenize": False}
    timing_contexts = contexts[: config.timing_prompts]
    rows = {}
    for lane in vllm_lanes(config, entries, config.draft_tokens):
        fd, log = tempfile.mkstemp(prefix="overfill-vllm-", suffix=".log")
        os.close(fd)
        engine = {"max_model_len": max(map(len, contexts)) + config.max_new_tokens, **lane["engine"]}
        started = time.perf_counter()
        with console.status(f"{lane['name']}: starting the engine") as status:
            with EngineWorker(lane["model"], Path(log), engine=engine, what=lane["name"]) as worker:
                start_s = time.perf_counter() - started
                status.update(f"{lane['name']}: greedy replies to {len(contexts)} prompts")
                replies, _ = worker.generate(contexts, **params)
                status.update(f"{lane['name']}: timing {len(timing_contexts)} prompts x {config.repeats} rounds")
                row = time_lane(worker, timing_contexts, params, config.repeats)
                counters = worker.speculation()
        os.unlink(log)
        row.update(agreement=greedy_agreement(replies, reference), engine_start_s=round(start_s, 1), like=lane["like"],
                   kind=lane["kind"], vllm=version, replies=replies)
        if counters:
            row["speculation"] = speculation_rates(counters)
        console.print(f"{lane['name']}: {row['decode_ms_per_token']['median']:.1f} ms/token, token agreement with the "
                      f"full model {row['agreement']['token_match']:.0%} (engine start {start_s:.0f} s)")
        rows[lane["name"]] = row
    return rows
