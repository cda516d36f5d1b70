"""Timing one generation run, split into prefill and decode, as `overfill bench` measures it (paper Figures 3-5).

`time_loop` times our generation loop (`generation.generate_ids`) in any mode, with the model's
own forward op by op (eager) or the compiled decode step (rows MODE+compiled, decode_step.py);
`time_hf` times the reference rows, Hugging Face `generate` of the full model and assisted
generation with the decoder as the assistant. A `Run` records when each emission of new tokens
happened (the device's work included), so one long run also yields every shorter one.
`measure_point` interleaves the rows in rotating order within each repeat (interleaved.py: machine drift
hits them alike); its warm-up runs have the timed runs' shapes, so a compiled row is compiled before it is
timed. `loop_overhead` measures what the loop adds to the decoder's own forward passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from overfill.configuration import parse
from overfill.devices import model_device, synchronize
from overfill.errors import OverfillError
from overfill.generation import GenerationConfig, eos_ids_of, generate_ids
from overfill.interleaved import spread, time_rounds
from overfill.modeling import prefill
from overfill.speculative import Speculation

REFERENCES = ("hf_generate", "hf_assisted")  # the rows that are not our loop's configurations


@dataclass
class Run:
    """When each emission of new tokens happened (seconds since the call began) and how many rows' tokens it held."""

    times: list[float]  # cumulative seconds at each emission; times[0] = prefill + first token
    counts: list[int]  # new tokens per row in each emission (1, except for assisted generation)
    speculation: dict | None = None  # speculative rows: what was drafted and kept (speculative.Speculation)

    def split(self, tokens: int | None = None) -> dict:
        """Prefill / decode seconds of the first `tokens` new tokens (all of them by default)."""
        k = len(self.times) if tokens is None else _emissions_for(self.counts, tokens)
        prefill_s, e2e_s = self.times[0], self.times[k - 1]
        new = sum(self.counts[:k])
        return {"prefill_s": prefill_s, "decode_s": e2e_s - prefill_s, "e2e_s": e2e_s, "new_tokens": new,
                "decode_tokens": new - self.counts[0], "steps": k}


def _emissions_for(counts: list[int], tokens: int) -> int:
    total = 0
    for k, c in enumerate(counts, start=1):
        total += c
        if total >= tokens:
            return k
    raise OverfillError(f"a run produced {total} tokens, fewer than the {tokens} asked")


def row_generation(row: str) -> GenerationConfig:
    """A loop row's generation settings: the row is a configuration's name (configuration.py), eager unless it says
    +compiled (a speculative row's drafts and its verifying pass alike); an @DTYPE row's decoder is its model
    (see measure_point)."""
    return parse(row).generation(max_new_tokens=GenerationConfig.max_new_tokens, compile=False)


def time_loop(model, row: str, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, pad_id: int,
              steps: int | None = None) -> Run:
    """One run of the generation loop; EOS is disabled so it always makes `new_tokens` tokens (or stops
    after `steps`, with the shapes of a `new_tokens` run: a warm-up)."""
    config = replace(row_generation(row), max_new_tokens=new_tokens)
    speculation = Speculation() if config.mode == "speculative" else None
    times, total = [], 0.0
    for step in generate_ids(model, ids, mask, config, eos_ids=set(), pad_id=pad_id, speculation=speculation):
        total += step.seconds
        times.append(total)
        if steps is not None and len(times) >= steps:
            break
    return Run(times, [1] * len(times), speculation.as_dict() if speculation else None)


class _Clock:
    """A `generate` streamer that only records when tokens come out (the first put is the prompt)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.times, self.counts, self._prompt_seen = [], [], False

    def put(self, value):
        synchronize(value.device)  # the tokens exist once the device has made them
        now = time.perf_counter()
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(now - self.started)
        self.counts.append(value.shape[-1] if value.dim() > 1 else 1)  # [B] per step, [1, k] when assisted

    def end(self):
        pass


def time_hf(model, reference: str, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, pad_id: int) -> Run:
    """HF `generate` of the full model, greedy, exactly `new_tokens` long (min = max); optionally assisted."""
    from transformers import GenerationConfig as HFGenerationConfig

    device = model_device(model.full)
    ids, mask = ids.to(device), mask.to(device)
    eos = sorted(eos_ids_of(model.tokenizer, model.full)) or None
    config = HFGenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                eos_token_id=eos, pad_token_id=pad_id)
    extra = {"assistant_model": model.decoder} if reference == "hf_assisted" else {}
    clock = _Clock()
    out = model.full.generate(input_ids=ids, attention_mask=mask, generation_config=config, streamer=clock, **extra)
    produced = out.shape[1] - ids.shape[1]
    if produced != new_tokens or sum(clock.counts) != new_tokens:
        raise OverfillError(f"HF {reference} made {produced} tokens instead of {new_tokens}: a transformers change?")
    return Run(clock.times, clock.counts)


def time_row(model, row: str, ids, mask, new_tokens: int, pad_id: int, steps: int | None = None) -> Run:
    if row in REFERENCES:
        return time_hf(model, row, ids, mask, new_tokens if steps is None else min(new_tokens, steps), pad_id)
    return time_loop(model, row, ids, mask, new_tokens, pad_id, steps)


# ---------------------------------------------------------------- several rows, several repeats


def measure_point(model, rows: tuple[str, ...], ids, mask, new_tokens: dict[str, int], pad_id: int, repeats: int,
                  warmup: int, report=None, models: dict | None = None) -> dict[str, list[Run]]:
    """Warm every row up, then time `repeats` rounds with the rows interleaved in rotating order.

    `models` gives some rows a model of their own (overfill@int8: the same full model, another decoder;
    its overfill@int8+compiled twin too).
    """
    models = models or {}
    model_of = {row: model if row in REFERENCES else models.get(replace(parse(row), compiled=False).name, model)
                for row in rows}

    def run(row: str, repeat: int) -> Run:
        if report:
            report(f"{row} {repeat + 1}/{repeats}")
        return time_row(model_of[row], row, ids, mask, new_tokens[row], pad_id)

    return time_rounds(rows, run, repeats=repeats, warmup=warmup,
                       warm=lambda row: time_row(model_of[row], row, ids, mask, new_tokens[row], pad_id, steps=16))


def loop_overhead(model, ids: torch.Tensor, mask: torch.Tensor, steps: int, repeats: int, pad_id: int) -> dict:
    """What the loop adds to each decode step, measured two ways.

    - by hand: each repeat runs the loop in overfill mode and, alternately before or after it,
      the full model's prefill plus `steps` decoder forwards called directly on the loop's own
      tokens, with the masks and positions the loop builds (built before the clock starts);
      steps are paired by index (same cache length).
    - in the loop: hooks on the decoder time its forward inside each loop step; the rest of the
      step is the loop's own work (token choice, masks, stop checks). Same step, so machine
      noise between runs cancels.
    The first repeat is a warm-up.
    """
    config = GenerationConfig(mode="overfill", max_new_tokens=steps + 1, compile=False)
    device = model_device(model.full)
    ids, mask = ids.to(device), mask.to(device)
    rows, length = ids.shape[0], mask.sum(-1, keepdim=True)  # [B, 1] real prompt tokens
    masks = [torch.cat([mask, torch.ones(rows, s, dtype=mask.dtype, device=device)], dim=1) for s in range(1, steps + 1)]
    positions = [length + s - 1 for s in range(1, steps + 1)]  # token s-1 sits right after the prompt
    forward_s: list[float] = []
    entered = [0.0]

    def before(*_):
        synchronize(device)
        entered[0] = time.perf_counter()

    def after(*_):
        synchronize(device)
        forward_s.append(time.perf_counter() - entered[0])

    def run_loop():
        handles = [model.decoder.register_forward_pre_hook(before), model.decoder.register_forward_hook(after)]
        try:
            forward_s.clear()
            loop = list(generate_ids(model, ids, mask, config, eos_ids=set(), pad_id=pad_id))
        finally:
            for handle in handles:
                handle.remove()
        return [s.seconds for s in loop[1:]], list(forward_s), [s.tokens[:, None] for s in loop]  # tokens [B, 1]

    def run_by_hand(tokens):
        _, cache = prefill(model.full, ids, mask)
        seconds = []
        for s in range(steps):
            synchronize(device)
            started = time.perf_counter()
            model.decoder(input_ids=tokens[s], attention_mask=masks[s], position_ids=positions[s],
                          past_key_values=cache, use_cache=True, logits_to_keep=1)
            synchronize(device)
            seconds.append(time.perf_counter() - started)
        return seconds

    loop_ms, hand_ms, inner_ms = [], [], []
    tokens = run_loop()[2]
    for repeat in range(repeats + 1):
        if repeat % 2:
            hand = run_by_hand(tokens)
            loop, inner, tokens = run_loop()
        else:
            loop, inner, tokens = run_loop()
            hand = run_by_hand(tokens)
        if repeat > 0:
            loop_ms += [1e3 * t for t in loop]
            hand_ms += [1e3 * t for t in hand]
            inner_ms += [1e3 * t for t in inner]
    by_hand = spread([a - b for a, b in zip(loop_ms, hand_ms)])
    in_loop = spread([a - b for a, b in zip(loop_ms, inner_ms)])
    hand_s = spread(hand_ms)
    return {"steps": steps, "repeats": repeats, "batch": rows, "prompt_len": int(ids.shape[1]),
            "loop_ms_per_step": spread(loop_ms), "by_hand_forward_ms_per_step": hand_s,
            "overhead_vs_by_hand_ms_per_step": by_hand,
            "overhead_vs_by_hand_percent": 100 * by_hand["median"] / hand_s["median"] if hand_s["median"] else 0.0,
            "in_loop_forward_ms_per_step": spread(inner_ms), "overhead_in_loop_ms_per_step": in_loop,
            "overhead_in_loop_percent": 100 * in_loop["median"] / hand_s["median"] if hand_s["median"] else 0.0}
