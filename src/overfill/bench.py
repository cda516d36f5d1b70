"""`overfill bench`: prefill and decode latency of each mode, split as in the paper's Figures 3-5.

Every mode runs through the one generation loop (`generation.generate_ids`), so the three rows
differ only in which model prefills and which decodes (DESIGN §2 "Modes"):

    overfill  full prefill + first token, decoder decodes   (paper §3)
    full      the full model does everything                (the latency to beat)
    pruned    the decoder does everything                   (the paper's baseline)

Reference rows run Hugging Face `generate` the same way: the full model alone, and assisted
generation with the decoder as the assistant (it keeps its own cache; DESIGN §4).

What is measured (all fp32, `torch.inference_mode`, greedy, EOS disabled so every run has the
asked length; modes interleaved in rotating order within each repeat so that machine drift hits
them alike and ratios are paired per repeat):

- key point: one prompt length, batch and reply length (default: the issue's 128-token chat
  prompt, batch 1, 256 new tokens), every mode and the reference rows side by side;
- new tokens sweep (paper Fig. 3): read off the same runs. A loop run of N_max tokens passes
  through exactly the states of a run of N < N_max tokens, so its first N steps *are* that run;
- prompt length sweep (paper Fig. 4) and batch sweep (paper Fig. 5), each at a fixed reply length;
- loop overhead: the loop's decode steps vs the same decoder forwards called by hand on the same
  inputs, paired step by step.

Prompts are synthetic but real text: the bundled calibration chats, concatenated and cut to an
exact token count inside the tokenizer's chat template, so runs are reproducible.
Outputs in --out: bench.json (config, environment, every sample) and PNG plots.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from overfill.errors import OverfillError
from overfill.generation import MODES, GenerationConfig, eos_ids_of, generate_ids, pad_id_of
from overfill.zoo import DEFAULT_MODEL

REFERENCES = ("hf_generate", "hf_assisted")
SENTINEL = "<<<overfill-bench-prompt>>>"

PRESETS = {
    # The key point (batch 1, ~128-token chat prompt, 256 new tokens) plus full sweeps.
    "default": dict(prompt_len=128, new_tokens=256, batch_size=1, new_tokens_sweep=(32, 64, 128, 256, 512),
                    prompt_len_sweep=(64, 128, 256, 512, 1024), batch_sweep=(1, 2, 4, 8, 16), sweep_new_tokens=64,
                    repeats=5, sweep_repeats=3, warmup=1, overhead_steps=64),
    # A couple of minutes on a laptop CPU: checks the wiring, not a figure to quote.
    "quick": dict(prompt_len=128, new_tokens=64, batch_size=1, new_tokens_sweep=(16, 32, 64),
                  prompt_len_sweep=(64, 256), batch_sweep=(1, 4), sweep_new_tokens=16,
                  repeats=2, sweep_repeats=2, warmup=1, overhead_steps=32),
}


@dataclass
class BenchConfig:
    checkpoint: str | None = None
    """OverFill checkpoint folder (overfill.json + decoder/); or use --model with --decoder."""
    model: str | None = DEFAULT_MODEL
    """Full model: a zoo name, a local HF folder or a hub id."""
    decoder: str | None = None
    """Pruned decoder folder (from `overfill prune` or `overfill train`), used with --model."""
    out: str = "runs/bench"
    """Output folder for bench.json and the PNG plots."""
    quick: bool = False
    """Small preset (a couple of minutes): checks the wiring; the default preset makes the figures."""
    modes: tuple[str, ...] = MODES
    """Modes to time: overfill, full, pruned (repeat the flag or separate with commas)."""
    references: bool = True
    """Also time HF `generate` of the full model and HF assisted generation (decoder as assistant)."""
    prompt_len: int | None = None
    """Key point: prompt tokens per row, chat template included (preset: 128)."""
    new_tokens: int | None = None
    """Key point: new tokens per row, the full model's first token included (preset: 256; quick 64)."""
    batch_size: int | None = None
    """Key point: rows per batch (preset: 1)."""
    new_tokens_sweep: tuple[int, ...] | None = None
    """Reply lengths to report (Fig. 3; preset 32..512), read off the key-point runs. 0 = skip."""
    prompt_len_sweep: tuple[int, ...] | None = None
    """Prompt lengths to time (Fig. 4; preset 64..1024). 0 = skip."""
    batch_sweep: tuple[int, ...] | None = None
    """Batch sizes to time (Fig. 5; preset 1..16). 0 = skip."""
    sweep_new_tokens: int | None = None
    """New tokens per row in the prompt-length and batch sweeps (preset: 64)."""
    repeats: int | None = None
    """Timed repeats at the key point (preset: 5)."""
    sweep_repeats: int | None = None
    """Timed repeats per prompt-length and batch point (preset: 3)."""
    warmup: int | None = None
    """Untimed warm-up runs per point and mode (preset: 1)."""
    overhead_steps: int | None = None
    """Decode steps in the loop-overhead check (0 = skip; preset: 64)."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    trust_remote_code: bool = False
    """Allow custom model code from the model folder (off unless you trust it)."""

    def __post_init__(self):
        preset = PRESETS["quick" if self.quick else "default"]
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.modes = _names(self.modes)
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise OverfillError(f"--modes got {','.join(unknown) or 'nothing'}: pick from {', '.join(MODES)}")
        for name in ("new_tokens_sweep", "prompt_len_sweep", "batch_sweep"):
            setattr(self, name, _ints(getattr(self, name), name))
        for name in ("prompt_len", "new_tokens", "batch_size", "sweep_new_tokens", "repeats", "sweep_repeats"):
            if int(getattr(self, name)) < 1:
                raise OverfillError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "overhead_steps", "threads"):
            if int(getattr(self, name)) < 0:
                raise OverfillError(f"--{_flag(name)} must be 0 or more, got {getattr(self, name)}")

    @property
    def key_run_tokens(self) -> int:
        """Length of the key-point loop runs: the new-tokens sweep is read off their first steps."""
        return max((self.new_tokens, *self.new_tokens_sweep))


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _names(value) -> tuple[str, ...]:
    """'a,b' or ['a', 'b'] or ['a,b'] -> ('a', 'b')."""
    items = [value] if isinstance(value, (str, int)) else list(value or ())
    return tuple(part.strip() for item in items for part in str(item).split(",") if part.strip())


def _ints(value, name: str) -> tuple[int, ...]:
    """A sweep: whole numbers >= 1, sorted; (0,) or nothing = skip the sweep."""
    try:
        numbers = sorted({int(v) for v in _names(value)})
    except ValueError:
        raise OverfillError(f"--{_flag(name)} takes whole numbers (or 0 to skip the sweep), got '{value}'") from None
    if numbers == [0]:
        return ()
    if any(n < 1 for n in numbers):
        raise OverfillError(f"--{_flag(name)} values must be at least 1 (or just 0 to skip the sweep), got {value}")
    return tuple(numbers)


# ---------------------------------------------------------------- prompts


@dataclass
class PromptSource:
    """Chat-template frame around a long real text; `batch` cuts it to an exact token count."""

    head: list[int]  # template tokens before the user's text
    body: list[int]  # the bundled calibration chats, tokenized once
    tail: list[int]  # end of the user turn + generation prompt

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "PromptSource":
        from overfill.data import record_to_messages
        from overfill.prune import bundled_calibration_records

        texts = [m["content"] for r in bundled_calibration_records() for m in (record_to_messages(r) or [])]
        body = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
        head, tail = [], []
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}],
                                                     add_generation_prompt=True, tokenize=False)
            head_text, tail_text = rendered.split(SENTINEL)
            head = tokenizer(head_text, add_special_tokens=False)["input_ids"]
            tail = tokenizer(tail_text, add_special_tokens=False)["input_ids"]
        return cls(head, body, tail)

    def batch(self, length: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[rows, length] ids and mask; rows start at different places in the text (no padding)."""
        n = length - len(self.head) - len(self.tail)
        if n < 1:
            raise OverfillError(f"prompt length {length} is too short: this chat template alone takes "
                                f"{len(self.head) + len(self.tail)} tokens, ask for more")
        stride = max(len(self.body) // max(rows, 1), 1)
        ids = []
        for row in range(rows):
            start = row * stride
            text = [self.body[(start + i) % len(self.body)] for i in range(n)]
            ids.append(self.head + text + self.tail)
        ids = torch.tensor(ids, dtype=torch.long)
        return ids, torch.ones_like(ids)


# ---------------------------------------------------------------- one timed run


@dataclass
class Run:
    """When each emission of new tokens happened (seconds since the call began) and how many rows' tokens it held."""

    times: list[float]  # cumulative seconds at each emission; times[0] = prefill + first token
    counts: list[int]  # new tokens per row in each emission (1, except for assisted generation)

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


def time_loop(model, mode: str, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, pad_id: int) -> Run:
    """One run of the generation loop; EOS is disabled so it always makes `new_tokens` tokens."""
    config = GenerationConfig(mode=mode, max_new_tokens=new_tokens)
    times, total = [], 0.0
    for step in generate_ids(model, ids, mask, config, eos_ids=set(), pad_id=pad_id):
        total += step.seconds
        times.append(total)
    return Run(times, [1] * len(times))


class _Clock:
    """A `generate` streamer that only records when tokens come out (the first put is the prompt)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.times, self.counts, self._prompt_seen = [], [], False

    def put(self, value):
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


def time_row(model, row: str, ids, mask, new_tokens: int, pad_id: int) -> Run:
    if row in REFERENCES:
        return time_hf(model, row, ids, mask, new_tokens, pad_id)
    return time_loop(model, row, ids, mask, new_tokens, pad_id)


# ---------------------------------------------------------------- statistics


def spread(values: list[float]) -> dict:
    """Median, interquartile range and extremes of repeated measurements."""
    t = torch.tensor(values, dtype=torch.float64)
    q1, median, q3 = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"median": median, "q1": q1, "q3": q3, "min": float(t.min()), "max": float(t.max()), "n": len(values)}


def summarize(splits: list[dict], batch: int) -> dict:
    """Per-repeat splits -> spreads of latency and throughput, plus the raw samples."""
    samples = {
        "prefill_s": [s["prefill_s"] for s in splits],
        "decode_s": [s["decode_s"] for s in splits],
        "e2e_s": [s["e2e_s"] for s in splits],
        # Throughputs count every row: batch x tokens per second.
        "decode_tokens_per_s": [batch * s["decode_tokens"] / s["decode_s"] if s["decode_s"] > 0 else 0.0 for s in splits],
        "tokens_per_s": [batch * s["new_tokens"] / s["e2e_s"] for s in splits],
        "decode_ms_per_token": [1e3 * s["decode_s"] / max(s["decode_tokens"], 1) for s in splits],
        "new_tokens_per_step": [s["new_tokens"] / s["steps"] for s in splits],
    }
    return {"new_tokens": splits[0]["new_tokens"], "batch": batch,
            **{name: spread(values) for name, values in samples.items()}, "samples": samples}


def paired_ratio(a: dict, b: dict, metric: str) -> dict | None:
    """a/b per repeat (the rows ran side by side in each repeat), as a spread."""
    x, y = a["samples"][metric], b["samples"][metric]
    n = min(len(x), len(y))
    if n == 0 or any(v == 0 for v in y[:n]):
        return None
    return spread([x[i] / y[i] for i in range(n)])


# The ratios the issue asks for, then the ones that explain them: (name, a, b, metric, target).
RATIOS = (
    ("overfill decode tok/s / full", "overfill", "full", "decode_tokens_per_s", ">= 1.7"),
    ("overfill end-to-end / pruned end-to-end", "overfill", "pruned", "e2e_s", "<= 1.05"),
    ("overfill decode tok/s / pruned", "overfill", "pruned", "decode_tokens_per_s", None),
    ("overfill end-to-end / full end-to-end", "overfill", "full", "e2e_s", None),
    ("overfill prefill / full prefill", "overfill", "full", "prefill_s", None),
    ("pruned prefill / full prefill", "pruned", "full", "prefill_s", None),
    ("loop full end-to-end / HF generate", "full", "hf_generate", "e2e_s", None),
    ("overfill end-to-end / HF generate", "overfill", "hf_generate", "e2e_s", None),
    ("overfill end-to-end / HF assisted", "overfill", "hf_assisted", "e2e_s", None),
)


def key_ratios(rows: dict) -> list[dict]:
    found = []
    for name, a, b, metric, target in RATIOS:
        if a in rows and b in rows:
            ratio = paired_ratio(rows[a], rows[b], metric)
            if ratio is not None:
                met = None
                if target:
                    op, bound = target.split()
                    met = ratio["median"] >= float(bound) if op == ">=" else ratio["median"] <= float(bound)
                found.append({"name": name, "a": a, "b": b, "metric": metric, "target": target, "met": met, **ratio})
    return found


# ---------------------------------------------------------------- the measurements


def _rotated(rows: tuple[str, ...], repeat: int) -> tuple[str, ...]:
    k = repeat % len(rows)
    return rows[k:] + rows[:k]


def measure_point(model, rows: tuple[str, ...], ids, mask, new_tokens: dict[str, int], pad_id: int, repeats: int,
                  warmup: int, report=None) -> dict[str, list[Run]]:
    """Warm every row up, then time `repeats` rounds with the rows interleaved in rotating order."""
    for _ in range(warmup):
        for row in rows:
            time_row(model, row, ids, mask, min(new_tokens[row], 16), pad_id)
    runs = {row: [] for row in rows}
    for repeat in range(repeats):
        for row in _rotated(rows, repeat):
            if report:
                report(f"{row} {repeat + 1}/{repeats}")
            runs[row].append(time_row(model, row, ids, mask, new_tokens[row], pad_id))
    return runs


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
    from overfill.generation import prefill

    config = GenerationConfig(mode="overfill", max_new_tokens=steps + 1)
    rows, length = ids.shape[0], mask.sum(-1, keepdim=True)  # [B, 1] real prompt tokens
    masks = [torch.cat([mask, torch.ones(rows, s, dtype=mask.dtype)], dim=1) for s in range(1, steps + 1)]
    positions = [length + s - 1 for s in range(1, steps + 1)]  # token s-1 sits right after the prompt
    forward_s: list[float] = []
    entered = [0.0]

    def before(*_):
        entered[0] = time.perf_counter()

    def after(*_):
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
            started = time.perf_counter()
            model.decoder(input_ids=tokens[s], attention_mask=masks[s], position_ids=positions[s],
                          past_key_values=cache, use_cache=True, logits_to_keep=1)
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


def environment() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "dtype": "float32",
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def describe(model) -> dict:
    def one(m):
        c = m.config
        return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                "layers": c.num_hidden_layers, "parameters": sum(p.numel() for p in m.parameters())}

    return {"full": {"source": getattr(model, "full_source", None), **one(model.full)}, "decoder": one(model.decoder)}


def run_bench(config: BenchConfig, console, model=None) -> dict:
    """Time the modes and reference rows, write bench.json and plots to config.out, print the tables.

    `model` (an OverFillModel) skips loading from config.checkpoint / config.model + config.decoder.
    """
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run_bench(config, console, model)
    finally:
        torch.set_num_threads(threads)


def _run_bench(config: BenchConfig, console, model) -> dict:
    if model is None:
        from overfill.modeling import load_overfill

        model = load_overfill(config.checkpoint, model=config.model, decoder=config.decoder,
                              trust_remote_code=config.trust_remote_code)
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
    result = {"config": asdict(config), "environment": environment(), "models": describe(model)}
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
    result["files"] = write_plots(result, out)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    result["files"] = ["bench.json", *result["files"]]
    print_bench(console, result, out)
    return result


def _measure(model, config: BenchConfig, console, prompts: PromptSource, pad_id: int, result: dict, started: float) -> None:
    with torch.inference_mode(), console.status("benchmarking") as status:
        def report(text):
            status.update(f"benchmarking: {text}")

        # Key point + new-tokens sweep: loop runs of key_run_tokens; HF rows exactly new_tokens long.
        batch, length = config.batch_size, config.prompt_len
        ids, mask = prompts.batch(length, batch)
        rows = config.modes
        skipped = {}
        if config.references:
            rows = rows + ("hf_generate",)
            if batch == 1:
                rows = rows + ("hf_assisted",)
            else:
                skipped["hf_assisted"] = "HF assisted generation runs batch 1 only"
        lengths = {row: config.new_tokens if row in REFERENCES else config.key_run_tokens for row in rows}
        runs = measure_point(model, rows, ids, mask, lengths, pad_id, config.repeats, config.warmup,
                             lambda t: report(f"key point, {t}"))
        key_rows = {row: summarize([r.split(config.new_tokens) for r in runs[row]], batch) for row in rows}
        result["key_point"] = {"prompt_len": length, "batch": batch, "new_tokens": config.new_tokens,
                               "rows": key_rows, "ratios": key_ratios(key_rows), "skipped": skipped}
        console.print(f"key point timed ({time.perf_counter() - started:.0f} s)")

        sweeps = {}
        if config.new_tokens_sweep:
            sweeps["new_tokens"] = {
                "x": "new_tokens", "values": list(config.new_tokens_sweep), "prompt_len": length, "batch": batch,
                "note": f"read off the first N steps of the key point's {config.key_run_tokens}-token loop runs",
                "rows": {mode: [summarize([r.split(n) for r in runs[mode]], batch) for n in config.new_tokens_sweep]
                         for mode in config.modes},
            }
        n = config.sweep_new_tokens
        lengths = {mode: n for mode in config.modes}
        for name, values, point in (("prompt_len", config.prompt_len_sweep, lambda v: (v, batch)),
                                    ("batch", config.batch_sweep, lambda v: (length, v))):
            if not values:
                continue
            sweep = {"x": name, "values": list(values), "new_tokens": n,
                     **({"batch": batch} if name == "prompt_len" else {"prompt_len": length}),
                     "rows": {mode: [] for mode in config.modes}}
            for value in values:
                p_len, p_batch = point(value)
                p_ids, p_mask = prompts.batch(p_len, p_batch)
                point_runs = measure_point(model, config.modes, p_ids, p_mask, lengths, pad_id, config.sweep_repeats,
                                           config.warmup, lambda t: report(f"{name} {value}, {t}"))
                for mode in config.modes:
                    sweep["rows"][mode].append(summarize([r.split() for r in point_runs[mode]], p_batch))
            sweeps[name] = sweep
            console.print(f"{name} sweep timed ({time.perf_counter() - started:.0f} s)")
        result["sweeps"] = sweeps

        if config.overhead_steps:
            report("loop overhead")
            result["overhead"] = loop_overhead(model, ids, mask, config.overhead_steps, config.repeats, pad_id)


# ---------------------------------------------------------------- plots and tables


COLORS = {"overfill": "tab:green", "full": "tab:blue", "pruned": "tab:orange", "hf_generate": "tab:gray",
          "hf_assisted": "tab:purple"}


def write_plots(result: dict, out: Path) -> list[str]:
    """PNG figures (matplotlib Agg): the key point's prefill/decode bars, then one figure per sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files.append(name)

    key = result["key_point"]
    rows = key["rows"]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    names = list(rows)
    prefill_s = [rows[r]["prefill_s"]["median"] for r in names]
    decode_s = [rows[r]["decode_s"]["median"] for r in names]
    e2e = [rows[r]["e2e_s"] for r in names]
    ax.bar(names, prefill_s, color="tab:red", label="prefill + first token")
    ax.bar(names, decode_s, bottom=prefill_s, color=[COLORS.get(r, "tab:gray") for r in names], label="decode")
    ax.errorbar(names, [e["median"] for e in e2e], fmt="none", ecolor="black", capsize=4,
                yerr=[[e["median"] - e["q1"] for e in e2e], [e["q3"] - e["median"] for e in e2e]])
    for i, e in enumerate(e2e):
        ax.annotate(f"{e['median']:.2f}s", (i, e["q3"]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds (median, IQR bars)")
    ax.set_title(f"batch {key['batch']}, prompt {key['prompt_len']}, {key['new_tokens']} new tokens")
    ax.legend(fontsize=8)
    save(fig, "breakdown.png")

    panels = {
        "new_tokens": (("e2e_s", "end-to-end latency (s)"), ("decode_tokens_per_s", "decode tokens/s")),
        "prompt_len": (("prefill_s", "prefill + first token (s)"), ("e2e_s", "end-to-end latency (s)")),
        "batch": (("tokens_per_s", "throughput, all rows (tokens/s)"), ("decode_ms_per_token", "decode step (ms)")),
    }
    labels = {"new_tokens": "new tokens", "prompt_len": "prompt tokens", "batch": "batch size"}
    for name, sweep in result["sweeps"].items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, (metric, ylabel) in zip(axes, panels[name]):
            for mode, points in sweep["rows"].items():
                med = [p[metric]["median"] for p in points]
                ax.plot(sweep["values"], med, marker="o", color=COLORS.get(mode), label=mode)
                ax.fill_between(sweep["values"], [p[metric]["q1"] for p in points], [p[metric]["q3"] for p in points],
                                color=COLORS.get(mode), alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sweep["values"], [str(v) for v in sweep["values"]])
            ax.set_xlabel(labels[name])
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fixed = ", ".join(f"{k.replace('_', ' ')} {sweep[k]}" for k in ("prompt_len", "batch", "new_tokens") if k in sweep)
        fig.suptitle(f"{labels[name]} sweep ({fixed}; median, IQR band)")
        save(fig, f"{name}.png")
    return files


def _range(s: dict, fmt: str) -> str:
    return f"{s['median']:{fmt}} \\[{s['min']:{fmt}}-{s['max']:{fmt}}]"


def print_bench(console, result: dict, out: Path) -> None:
    from rich.table import Table

    key = result["key_point"]
    repeats = result["config"]["repeats"]
    table = Table(title=f"overfill bench: batch {key['batch']}, prompt {key['prompt_len']} tokens, "
                        f"{key['new_tokens']} new tokens, median \\[min-max] of {repeats}", header_style="bold")
    for column in ("row", "prefill + 1st (ms)", "decode (ms/token)", "decode tok/s", "end-to-end (s)", "tokens/step"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for row, s in key["rows"].items():
        table.add_row(row, _range({k: 1e3 * v for k, v in s["prefill_s"].items()}, ".0f"),
                      _range(s["decode_ms_per_token"], ".1f"), _range(s["decode_tokens_per_s"], ".1f"),
                      _range(s["e2e_s"], ".2f"), f"{s['new_tokens_per_step']['median']:.2f}")
    console.print(table)

    table = Table(title="ratios measured in this run (paired per repeat: median \\[min-max])", header_style="bold")
    for column in ("ratio", "value", "issue target"):
        table.add_column(column, justify="left" if column == "ratio" else "right")
    for r in key["ratios"]:
        mark = "" if r["met"] is None else (" [green]met[/]" if r["met"] else " [red]not met[/]")
        table.add_row(r["name"], _range(r, ".3f"), (r["target"] or "") + mark)
    console.print(table)

    for name, sweep in result["sweeps"].items():
        table = Table(title=f"{name.replace('_', ' ')} sweep: end-to-end s (median)", header_style="bold")
        table.add_column(name.replace("_", " "), justify="right")
        modes = list(sweep["rows"])
        for mode in modes:
            table.add_column(mode, justify="right")
        both = "overfill" in modes and "pruned" in modes
        if both:
            table.add_column("overfill / pruned", justify="right")
        for i, value in enumerate(sweep["values"]):
            cells = [f"{sweep['rows'][m][i]['e2e_s']['median']:.2f}" for m in modes]
            if both:
                ratio = paired_ratio(sweep["rows"]["overfill"][i], sweep["rows"]["pruned"][i], "e2e_s")
                cells.append(f"{ratio['median']:.3f}" if ratio else "")
            table.add_row(str(value), *cells)
        console.print(table)

    if "overhead" in result:
        o = result["overhead"]
        hand, inner = o["overhead_vs_by_hand_ms_per_step"], o["overhead_in_loop_ms_per_step"]
        console.print(
            f"loop overhead ({o['steps']} overfill decode steps x {o['repeats']}): loop step "
            f"{o['loop_ms_per_step']['median']:.2f} ms, decoder forward by hand {o['by_hand_forward_ms_per_step']['median']:.2f} ms "
            f"-> {hand['median']:+.3f} ms/step ({o['overhead_vs_by_hand_percent']:+.2f}%, IQR {hand['q1']:+.2f}..{hand['q3']:+.2f}); "
            f"outside the decoder forward inside the loop: {inner['median']:+.3f} ms/step ({o['overhead_in_loop_percent']:+.2f}%)"
        )
    env = result["environment"]
    console.print(f"{env['torch_threads']} threads, load average {env['load_average'][0] if env['load_average'] else '?'} "
                  f"at start; {result['seconds']:.0f} s; wrote {', '.join(result['files'])} to [bold]{out}[/]")
