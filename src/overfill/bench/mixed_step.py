"""`overfill bench --engine vllm --mixed-step`: a busy OverFill engine's steps, mixed (eager, split) and in turn.

On a busy server most steps carry a new prompt chunk beside the running requests' decode tokens. One
OverFill engine (vLLM's defaults, but a step budget of exactly --mixed-decoding + --mixed-chunk
tokens) holds --mixed-decoding requests decoding while prompts of --mixed-steps chunks arrive, one at a
time; their steps are timed as mixed steps, with the split route (each stage compiled on its own
requests) and with the eager route, and under OverFill's default schedule, a prompt step and a decode
step in turn, rotating by round (overfill.vllm.mixed_step runs inside the engine).
"""

from __future__ import annotations

from pathlib import Path

MIXED_STEPS = 8  # timed mixed steps per prompt (its length: this many chunks)
CONTEXT_MARGIN = 16


def mixed_step_settings(config) -> dict:
    rounds = 2 if config.quick else 4
    return {"decoding": config.mixed_decoding, "chunk": config.mixed_chunk, "prompt_len": config.prompt_len,
            "steps": MIXED_STEPS, "rounds": rounds}


def run_mixed_step(config, console, out: Path) -> dict:
    """Time the mixed steps; the worker's summary plus the engine's settings."""
    from overfill.vllm.export import engine_model
    from overfill.vllm.worker import EngineWorker

    settings = mixed_step_settings(config)
    decoders_last = settings["prompt_len"] + settings["rounds"] * 2 * (MIXED_STEPS + 2) + 64
    engine = {"max_model_len": max(settings["chunk"] * MIXED_STEPS, decoders_last) + CONTEXT_MARGIN,
              "max_num_batched_tokens": settings["decoding"] + settings["chunk"], "max_num_seqs": settings["decoding"] + 1}
    worker = EngineWorker(engine_model(config, "overfill", dtype=config.engine_dtype), out / "logs" / "mixed_step.log", engine=engine,
                          what="vLLM (OverFill, mixed steps)")
    with console.status("mixed steps: starting the OverFill engine") as status:
        try:
            worker.start(lambda text: status.update(f"mixed steps: {text}"))
            status.update(f"mixed steps: {settings['decoding']} decoding + a {settings['chunk']}-token chunk, "
                          f"{settings['rounds']} rounds per route")
            result = worker.mixed_step(**settings)
        finally:
            worker.close()
    return {**result, "engine": engine, "dtype": worker.info.get("dtype"), "new_tokens": config.new_tokens}
