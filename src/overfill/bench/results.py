"""What both bench engines (and the frontier and the GPU check) record the same way: the spread of a row's
repeats, the machine it ran on, the models' shapes, and the files a run leaves (bench.json + plots + the tables)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from overfill.atomic import atomic_write_text
from overfill.devices import cpu_info
from overfill.devices import describe as describe_device
from overfill.interleaved import spread


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


def environment(dtype: str = "float32", device: torch.device | None = None) -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu": cpu_info(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "dtype": dtype,
            "device": describe_device(device or torch.device("cpu")),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def describe(model) -> dict:
    def one(m):
        c = m.config
        return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                "layers": c.num_hidden_layers, "parameters": sum(p.numel() for p in m.parameters())}

    return {"full": {"source": getattr(model, "full_source", None), **one(model.full)}, "decoder": one(model.decoder)}


def publish(result: dict, out: Path, console, plot, report) -> dict:
    """Either engine's last step: the PNG plots, bench.json (naming them) and the terminal report."""
    result["files"] = plot(result, out)
    atomic_write_text(out / "bench.json", json.dumps(result, indent=1) + "\n")
    result["files"] = ["bench.json", *result["files"]]
    report(console, result, out)
    return result
