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
Outputs in --out: bench.json (config, environment, every sample) and PNG plots (plots.py); the
tables go to the terminal (report.py). How one run is timed is in timing.py.
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

from overfill.atomic import atomic_write_text
from overfill.errors import OverfillError
from overfill.generation import MODES, pad_id_of
from overfill.plots import write_plots
from overfill.report import print_bench
from overfill.timing import REFERENCES, loop_overhead, measure_point, paired_ratio, spread
from overfill.zoo import DEFAULT_MODEL

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
        from overfill.prune import bundled_calibration_records
        from overfill.records import record_to_messages

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


# ---------------------------------------------------------------- statistics


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
    atomic_write_text(out / "bench.json", json.dumps(result, indent=1) + "\n")
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
