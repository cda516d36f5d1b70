"""Timing a busy OverFill engine's steps: decoding requests beside one prompt chunk, by route and by step policy.

A busy server's typical moment: `decoding` requests each decode one token while a new prompt is read in
chunks of `chunk` tokens (the engine's step budget is exactly decoding + chunk, so a step can hold both).
Timed in the engine process itself, round by round in rotating order:
  * mixed steps (the "mixed" step policy, vLLM's way), with the model's split route (each stage compiled
    on its own requests) and with the eager route it replaced (both stages' layers row by row);
  * OverFill's default policy, prompt steps and decode steps in turn (scheduler.py): the same work as a
    prompt step (the chunk alone) and a decode step (the decodes alone).
Reported per route: the whole engine step (scheduling, model, sampling: what a request waits for) and the
model's forward alone; for the split route also its two parts (each sub-batch's context and compiled
stage), and a step of the decodes alone, before the chunk arrives: where a mixed step's time goes.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

ROUTES = ("eager", "split", "alternate")  # the first two in mixed steps


def _use_route(route: str):
    def set_route(model) -> None:
        model.split_mixed_steps = route != "eager"

    return set_route


def _install_timer(model) -> None:
    """Time every forward, and in a split step the moment each sub-batch's context is built (its stage runs next)."""
    forward, context = type(model).forward.__get__(model), model.sub_batches.context
    model.forward_seconds, model.split_parts = [], []

    def timed(*args, **kwargs):
        model.marks = [time.perf_counter()]
        out = forward(*args, **kwargs)
        end = time.perf_counter()
        model.forward_seconds.append(end - model.marks[0])
        if len(model.marks) == 3:  # forward start, decoder sub-batch, full sub-batch
            model.split_parts.append((model.marks[2] - model.marks[1], end - model.marks[2]))
        return out

    def marked(*args, **kwargs):
        model.marks.append(time.perf_counter())
        return context(*args, **kwargs)

    model.forward, model.sub_batches.context = timed, marked


def _take_forward_seconds(model) -> list[float]:
    seconds, model.forward_seconds = model.forward_seconds, []
    return seconds


def _take_split_parts(model) -> list[tuple[float, float]]:
    parts, model.split_parts = model.split_parts, []
    return parts


def _remove_timer(model) -> None:
    del model.forward
    del model.sub_batches.context
    model.split_mixed_steps = True


def _step_counts(model) -> dict:
    return dict(model.stats)


def time_mixed_steps(llm, *, decoding: int, chunk: int, prompt_len: int, steps: int, rounds: int, seed: int = 0) -> dict:
    """Median ms per step and per forward, for each route (see the module's docstring)."""
    from vllm import SamplingParams

    from overfill.vllm.plugin.scheduler import engine_scheduler, set_step_policy

    engine = llm.llm_engine
    budget = engine.vllm_config.scheduler_config.max_num_batched_tokens
    if budget != decoding + chunk:
        raise ValueError(f"the engine's step budget is {budget} tokens, not decoding + chunk = {decoding + chunk}")
    rng = np.random.default_rng(seed)
    vocab = engine.vllm_config.model_config.hf_config.vocab_size

    def ids(n: int) -> list[int]:
        return rng.integers(100, vocab, n).tolist()

    lasting = SamplingParams(temperature=0.0, max_tokens=rounds * len(ROUTES) * (2 * steps + 2) + 64, ignore_eos=True)
    for i in range(decoding):
        engine.add_request(f"decode-{i}", {"prompt_token_ids": ids(prompt_len)}, lasting)
    scheduler = engine_scheduler(llm)
    while len(scheduler.waiting) or any(r.num_computed_tokens <= r.num_prompt_tokens for r in scheduler.running):
        engine.step()  # their prompts, then each one's first decode step
    llm.apply_model(_install_timer)
    timings = {route: {"step_s": [], "forward_s": []} for route in ROUTES}
    turns = {"prompt": {"step_s": [], "forward_s": []}, "decode": {"step_s": [], "forward_s": []}}
    decodes_alone = []
    try:
        llm.apply_model(_take_forward_seconds)
        for _ in range(steps):
            engine.step()
        decodes_alone = llm.apply_model(_take_forward_seconds)[0]
        llm.apply_model(_take_split_parts)
        for r in range(rounds):
            for route in ROUTES[r % len(ROUTES):] + ROUTES[:r % len(ROUTES)]:
                llm.apply_model(_use_route(route))
                set_step_policy(llm, "alternate" if route == "alternate" else "mixed")
                llm.apply_model(_take_forward_seconds)
                engine.add_request(f"chunked-{r}-{route}", {"prompt_token_ids": ids(chunk * steps)},
                                   SamplingParams(temperature=0.0, max_tokens=1))
                for _ in range(2 * steps if route == "alternate" else steps):
                    before = llm.apply_model(_step_counts)[0]
                    t0 = time.perf_counter()
                    engine.step()
                    seconds = time.perf_counter() - t0
                    forward = llm.apply_model(_take_forward_seconds)[0]
                    ran = {k: v - before[k] for k, v in llm.apply_model(_step_counts)[0].items() if k in ("full", "decoder", "split", "eager")}
                    if route == "alternate":
                        kind = "prompt" if ran["full"] else "decode"
                        if ran[{"prompt": "full", "decode": "decoder"}[kind]] != 1 or sum(ran.values()) != 1:
                            raise RuntimeError(f"a step in turn ran {ran}, not one stage")
                        turns[kind]["step_s"].append(seconds)
                        turns[kind]["forward_s"] += forward
                    elif ran["split"] != 1:  # a mixed step (counted as one the split route could take)
                        raise RuntimeError(f"a timed step ran {ran}, not one mixed step")
                    timings[route]["step_s"].append(seconds)
                    timings[route]["forward_s"] += forward
        parts = llm.apply_model(_take_split_parts)[0]
    finally:
        set_step_policy(llm, "alternate")
        llm.apply_model(_remove_timer)
        for i in range(decoding):
            engine.abort_request([f"decode-{i}"])
    ms = lambda seconds: 1000 * statistics.median(seconds)  # noqa: E731
    summary = {route: {"step_ms": ms(t["step_s"]), "forward_ms": ms(t["forward_s"]), "steps": len(t["step_s"])}
               for route, t in timings.items() if route != "alternate"}
    summary["split"]["decoder_part_ms"] = ms([p[0] for p in parts])
    summary["split"]["full_part_ms"] = ms([p[1] for p in parts])
    in_turn = {kind: {"step_ms": ms(t["step_s"]), "forward_ms": ms(t["forward_s"]), "steps": len(t["step_s"])}
               for kind, t in turns.items()}
    split_step = summary["split"]["step_ms"]
    return {"decoding": decoding, "chunk": chunk, "prompt_len": prompt_len, "rounds": rounds, "routes": summary,
            "in_turn": in_turn, "decodes_alone_forward_ms": ms(decodes_alone),
            "eager_over_split_step": summary["eager"]["step_ms"] / split_step,
            "eager_over_split_forward": summary["eager"]["forward_ms"] / summary["split"]["forward_ms"],
            # what the chunk's request waits for its step, and what a decoding request waits across the chunk
            "split_over_prompt_step": split_step / in_turn["prompt"]["step_ms"],
            "split_over_turn_pair": split_step / (in_turn["prompt"]["step_ms"] + in_turn["decode"]["step_ms"])}
