"""`overfill bench --memory`: what an OverFill pair of a real model's shape holds in memory, phase by phase.

A random-weight pair of a real model's shape (Llama-3.2-3B with the paper's 1B decoder, or Llama-3.2-1B
with a 0.45 decoder for a quick run), built from its config alone and saved in its dtype, is loaded as
every command loads a pair (`OverFillModel.from_pair`) and then decodes: eagerly, compiled at batch 1
and 8, and speculatively (the decoder drafting on the full model's cache, the full model verifying,
both compiled). Per phase: wall time, the process's peak resident memory and, on a GPU, its peak
allocated device memory; beside them the pair's weight bytes and the KV cache the phase holds. The
target: at most 1.15x the weight bytes at load, and 1.15x plus the KV cache while decoding.

The measuring runs in a process of its own (the weights are written by another), so its resident
memory is the pair's and the runtime's only; a thread samples it every few milliseconds (a
transient allocation is resident only once written, and a multi-GB write takes longer than that).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from overfill.bench import synthetic

# name: (full model's config fields, decoder's widths as the paper's 3B-to-1B pair has them, scaled to the model)
SHAPES = {
    "llama-3.2-3b": (synthetic.LLAMA_3B, synthetic.DECODER_045),  # the paper's pair: 3B and its 1B (0.45) decoder
    "llama-3.2-1b": (synthetic.LLAMA_1B, synthetic.DECODER_045),  # the quick pair: 1B and its 0.45 decoder
}
TARGET = 1.15  # peak resident memory over weight bytes (+ KV cache while decoding)
PROMPT_LEN, NEW_TOKENS, DRAFT_TOKENS = 128, 32, 4
BATCHES = (1, 8)


class PeakResident:
    """The highest resident set size (bytes) of this process since the last `reset`, sampled by a thread."""

    def __init__(self, every_s: float = 0.005):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def now(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every_s)

    def reset(self) -> None:
        self.peak = self.now()

    @staticmethod
    def kinds() -> dict:
        """Resident bytes now, by kind: anonymous (the process's own) and file-backed (mapped weight files)."""
        found = {}
        with open("/proc/self/smaps_rollup") as rollup:
            for line in rollup:
                key, _, value = line.partition(":")
                if key in ("Rss_Anon", "Rss_File", "Pss_Anon", "Pss_File"):
                    found[key.split("_")[1].lower()] = int(value.split()[0]) * 1024
        return found

    def close(self) -> None:
        self._stop.set()
        self.thread.join()


def kv_bytes(config, rows: int, tokens: int, dtype: torch.dtype) -> int:
    """Keys and values of `rows` x `tokens` positions, every layer, at the static cache's capacity."""
    from overfill.arch import head_dim_of, kv_heads_of
    from overfill.kv_cache import capacity_for

    per_token = 2 * config.num_hidden_layers * kv_heads_of(config) * head_dim_of(config) * dtype.itemsize
    return rows * capacity_for(tokens) * per_token


# ---------------------------------------------------------------- the pair, written once


def write_pair(full_fields: dict, decoder_widths: dict, dtype: torch.dtype, folder: Path) -> dict:
    """Build a random pair from the full model's config fields (the decoder's widths scaled to it) and save it in
    `dtype` (safetensors), with the pruning record a `from_pair` load checks; returns the parameter counts."""
    from overfill.fingerprint import fingerprint

    tokenizer = synthetic.byte_tokenizer()
    counts = {}
    for part, widths in (("full", None), ("decoder", decoder_widths)):
        fields = dict(full_fields, **(synthetic.scaled_widths(widths, full_fields) if widths else {}))
        model = synthetic.config_model(fields, dtype)
        model.save_pretrained(folder / part)
        tokenizer.save_pretrained(folder / part)
        counts[part] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        if part == "full":
            source = fingerprint(model, stored=folder / "full")
        del model
    record = {"source_model": str(folder / "full"), "source_fingerprint": source, "synthetic": True}
    (folder / "decoder" / "pruning.json").write_text(json.dumps(record) + "\n")
    return counts


# ---------------------------------------------------------------- measured, in a process of its own


def measure(folder: Path, dtype: torch.dtype, device: torch.device, say=print, *, prompt_len: int | None = None,
            new_tokens: int | None = None) -> dict:
    """Load the pair in `folder` and decode phase by phase (prompts of `prompt_len` tokens, `new_tokens` each; default
    PROMPT_LEN and NEW_TOKENS); each phase's time and peak memory."""
    prompt_len, new_tokens = prompt_len or PROMPT_LEN, new_tokens or NEW_TOKENS
    from overfill.generation import GenerationConfig, generate_ids
    from overfill.modeling import OverFillModel
    from overfill.precision import weight_bytes

    sampler, phases = PeakResident(), {}
    cuda = device.type == "cuda"

    def phase(name: str, run, kv: int = 0) -> None:
        say(f"memory: {name}")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        sampler.reset()
        started = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        phases[name] = {"seconds": round(time.perf_counter() - started, 2), "peak_resident_bytes": sampler.peak,
                        "kv_bytes": kv, "resident_after": sampler.kinds(), **({"peak_device_bytes": torch.cuda.max_memory_allocated(device)} if cuda else {})}

    state = {"runtime_bytes": sampler.now()}

    def load() -> None:
        state["model"] = OverFillModel.from_pair(str(folder / "full"), str(folder / "decoder"), dtype=dtype, device=device)

    phase("load", load)
    model = state["model"]
    weights = weight_bytes(model.full) + weight_bytes(model.decoder)  # loaded, before any layout shares storage

    def decode(rows: int, **settings):
        ids = torch.randint(3, 250, (rows, prompt_len), generator=torch.Generator().manual_seed(rows), device="cpu").to(device)
        config = GenerationConfig(max_new_tokens=new_tokens, **settings)
        return lambda: list(generate_ids(model, ids, torch.ones_like(ids), config, eos_ids=set(), pad_id=0))

    tokens = prompt_len + new_tokens + DRAFT_TOKENS
    kv = lambda rows: kv_bytes(model.full.config, rows, tokens, dtype)  # noqa: E731
    phase("eager decode, batch 1", decode(1, compile=False), kv(1))
    for rows in BATCHES:
        phase(f"compiled decode, batch {rows}", decode(rows, compile=True), kv(rows))
    phase("speculative (compiled), batch 1", decode(1, mode="speculative", draft_tokens=DRAFT_TOKENS, compile=True), kv(1))
    sampler.close()
    for row in phases.values():
        row["over_weights"] = round((row["peak_resident_bytes"] - row["kv_bytes"]) / weights, 3)
    return {"weight_bytes": weights, "runtime_bytes_before_load": state["runtime_bytes"], "phases": phases}


def run_memory(config, console, out: Path) -> dict:
    """Write the pair (one process), measure it (another), and report; what `overfill bench --memory` runs."""
    from overfill.devices import cpu_info

    shape, dtype = config.memory_shape, config.memory_dtype
    folder = out / "memory_pair"
    if not (folder / "decoder" / "pruning.json").is_file():
        with console.status(f"memory: writing a random {shape}-shaped pair in {dtype}"):
            _child(["write", shape, dtype, str(folder)])
    with console.status("memory: loading and decoding") as status:
        result = _child(["measure", str(folder), dtype, config.device], status=status)
    result.update(shape=shape, dtype=dtype, device=config.device, cpu=cpu_info(), target=TARGET,
                  counts=json.loads((folder / "counts.json").read_text()))
    print_memory(console, result)
    return result


def _child(argv: list[str], status=None) -> dict:
    """Run this module in a fresh process; its progress lines go to the status, its last stdout line is JSON."""
    proc = subprocess.Popen([sys.executable, "-m", "overfill.bench.memory", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if status is not None and line.startswith("memory: "):
            status.update(line.strip())
    error = proc.stderr.read()
    if proc.wait() != 0:
        from overfill.errors import OverfillError

        raise OverfillError(f"the memory check's {argv[0]} step failed: {error.strip().splitlines()[-1] if error.strip() else proc.returncode}")
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}


def print_memory(console, result: dict) -> None:
    from rich.table import Table

    from overfill.terminal_tables import readable

    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    counts = result["counts"]
    table = Table(title=f"Memory, a random {result['shape']}-shaped pair ({counts['full'] / 1e9:.2f}B + "
                        f"{counts['decoder'] / 1e9:.2f}B parameters) in {result['dtype']} on {result['device']}: weights "
                        f"{gib(result['weight_bytes'])} GiB", header_style="bold")
    device = any("peak_device_bytes" in row for row in result["phases"].values())
    columns = ["phase", "s", "peak resident GiB", "KV GiB", "(peak - KV) / weights"] + (["peak device GiB"] if device else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "phase" else "right")
    for name, row in result["phases"].items():
        cells = [name, f"{row['seconds']:.1f}", gib(row["peak_resident_bytes"]), gib(row["kv_bytes"]),
                 f"{row['over_weights']:.2f}x"]
        table.add_row(*cells, *([gib(row["peak_device_bytes"])] if device else []))
    console.print(readable(table))
    worst = max(row["over_weights"] for row in result["phases"].values())
    console.print(f"largest (peak resident - KV) / weights: {worst:.2f}x (target at most {result['target']}x; the runtime "
                  f"held {gib(result['runtime_bytes_before_load'])} GiB before loading)")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    torch_dtype = getattr(torch, args[1])
    if command == "write":
        shape_name, _, target = args
        folder = Path(target)
        counts = write_pair(*SHAPES[shape_name], torch_dtype, folder)
        (folder / "counts.json").write_text(json.dumps(counts) + "\n")
        print(json.dumps(counts))
    else:
        folder, _, device_name = args
        print(json.dumps(measure(Path(folder), torch_dtype, torch.device(device_name),
                                 say=lambda line: print(line, flush=True))))
