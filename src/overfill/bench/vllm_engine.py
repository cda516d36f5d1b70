"""The engine side of `overfill bench --engine vllm`: one mode's vLLM engine times a list of points, then exits.

`python -m overfill.bench.vllm_engine PLAN RESULT` (started by bench/vllm_run.py, one process per
mode, one engine at a time: vLLM keeps its KV cache, threads and engine process until the
interpreter ends). PLAN (JSON) names the folder vLLM loads, the prompts (exact token ids, one list
per row, as `bench/prompts.py` cut them) and the points, each (prompt_len, batch, max_tokens) with
its number of repeats. A run is one `LLM.generate` call on the point's rows: greedy,
ignore_eos=True so it makes exactly max_tokens tokens per row, no detokenisation (our own loop
does not detokenise either), prefix cache reset before each run (and off in every mode, so the
baselines are served as OverFill is). Timed is the call's wall time.

Order: one warm-up run per prompt shape (2 tokens: the first call on a shape pays one-time
costs), then rounds; round r times every point still owed a repeat, in an order rotated by r,
so slow drift of the machine spreads over all points rather than hitting one.

RESULT (JSON): vLLM's version, the engine's start time and scheduler limits, every run's seconds,
and for OverFill the plugin's counters (tokens run by the full model and by the decoder), which
show the decoder did the decoding.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

WARMUP_TOKENS = 2


def prompt_key(prompt_len: int, batch: int) -> str:
    return f"{prompt_len}x{batch}"


def rounds(points: list[dict]) -> list[list[dict]]:
    """The timed runs, round by round: every point with repeats left, in an order rotated by the round."""
    out = []
    for r in range(max((p["repeats"] for p in points), default=0)):
        k = r % len(points)
        out.append([p for p in points[k:] + points[:k] if p["repeats"] > r])
    return out


def _say(text: str) -> None:
    print(f"overfill-bench: {text}", file=sys.stderr, flush=True)  # the parent shows the last such line


def main(argv: list[str] | None = None) -> None:
    plan_path, result_path = argv if argv is not None else sys.argv[1:]
    plan = json.loads(Path(plan_path).read_text())
    from vllm import SamplingParams

    from overfill.vllm.export import EngineModel
    from overfill.vllm.runtime import offline_engine, vllm_version

    model = EngineModel.from_json(plan["model"])
    _say(f"starting vLLM for {model.mode}")
    started = time.perf_counter()
    llm = offline_engine(model, max_model_len=plan["max_model_len"], enable_prefix_caching=False)
    engine_start_s = time.perf_counter() - started
    prompts = {key: [{"prompt_token_ids": ids} for ids in rows] for key, rows in plan["prompts"].items()}

    def run(point: dict, max_tokens: int) -> float:
        rows = prompts[prompt_key(point["prompt_len"], point["batch"])]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outputs = llm.generate(rows, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        made = {len(o.outputs[0].token_ids) for o in outputs}
        if made != {max_tokens} or len(outputs) != len(rows):
            raise RuntimeError(f"asked {len(rows)} rows of {max_tokens} tokens, got {len(outputs)} rows of {sorted(made)}")
        return seconds

    points = plan["points"]
    shapes = list(dict.fromkeys((p["prompt_len"], p["batch"]) for p in points))
    for i in range(plan["warmup"]):
        for prompt_len, batch in shapes:
            _say(f"warm-up {i + 1}/{plan['warmup']}: prompt {prompt_len} x batch {batch}")
            run({"prompt_len": prompt_len, "batch": batch}, WARMUP_TOKENS)
    stats = _stats(llm, model.mode, reset=True)
    seconds = {_key(p): [] for p in points}
    plan_rounds = rounds(points)
    for r, round_points in enumerate(plan_rounds):
        for j, p in enumerate(round_points):
            _say(f"round {r + 1}/{len(plan_rounds)}, run {j + 1}/{len(round_points)}: prompt {p['prompt_len']} x batch "
                 f"{p['batch']}, {p['max_tokens']} tokens")
            seconds[_key(p)].append(run(p, p["max_tokens"]))
    if stats is not None:
        stats = _stats(llm, model.mode)
    config = llm.llm_engine.vllm_config
    result = {
        "vllm": vllm_version(), "mode": model.mode, "path": str(model.path), "engine_start_s": engine_start_s,
        "scheduler": {"max_num_seqs": config.scheduler_config.max_num_seqs,
                      "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
                      "enable_prefix_caching": bool(config.cache_config.enable_prefix_caching),
                      "enforce_eager": bool(config.model_config.enforce_eager)},
        "points": [{**{k: p[k] for k in ("prompt_len", "batch", "max_tokens")}, "seconds": seconds[_key(p)]} for p in points],
        "overfill_stats": stats,
    }
    Path(result_path).write_text(json.dumps(result))


def _key(p: dict) -> tuple[int, int, int]:
    return p["prompt_len"], p["batch"], p["max_tokens"]


def _stats(llm, mode: str, *, reset: bool = False) -> dict | None:
    """OverFill's counters in the worker (tokens through the full model / the decoder); None for plain models.

    LLM.apply_model pickles the function, which vLLM allows only with VLLM_ALLOW_INSECURE_SERIALIZATION=1
    (set by the parent for this local engine); without it the counters are left out.
    """
    if mode != "overfill":
        return None
    from overfill.vllm.model import get_stats, reset_stats

    try:
        return llm.apply_model(reset_stats if reset else get_stats)[0]
    except Exception as error:  # the counters are a check, not the measurement
        return {"error": f"{type(error).__name__}: {error}"[:300]}


if __name__ == "__main__":  # vLLM starts its engine in a process of its own, which imports this module again
    main()
