"""Where models and tensors live: the one `--device` rule every command follows.

`auto` is CUDA when this machine has it, else the CPU (what Accelerate picks for training, so
training and every other command agree). `cuda`, `cuda:N`, `mps` and `cpu` are taken as given, and
refused at once, in one line, where this machine or this torch build lacks them. Each device has
its default weights dtype: bfloat16 on a GPU (tensor cores, half the bytes a decode step reads),
float32 on a CPU (most CPUs have no fast bfloat16 matrix product: `native_bfloat16` says which do).
`decide_compile` says, per device and workload, whether compiling the decode step pays.
"""

from __future__ import annotations

import functools
import platform
import re
import time
from typing import Literal

import torch

from overfill.errors import OverfillError

DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps"

Dtype = Literal["float32", "bfloat16", "float16"]  # --dtype: the weights of both models
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise OverfillError(f"unknown dtype '{name}': pick one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | torch.device | None = "auto", flag: str = "--device") -> torch.device:
    """`name` as a torch.device this machine has, or an OverfillError naming what is missing."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match:
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
            raise OverfillError(f"{flag} {name}: this machine has no CUDA device (torch {torch.__version__}, {build}): "
                                "pass --device cpu, or --device auto to use a GPU only where there is one")
        index = int(match.group(1) or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise OverfillError(f"{flag} {name}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                                f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''}): pick one of those")
        return torch.device("cuda", index)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise OverfillError(f"{flag} mps: this machine has no Apple GPU (MPS): pass --device cpu or auto")
        return torch.device("mps")
    raise OverfillError(f"{flag} got '{name}': pick {DEVICE_HELP}")


def default_dtype(device: torch.device) -> str:
    """The weights dtype a device gets unless one is asked for: bfloat16 on a GPU, float32 on a CPU."""
    return "float32" if device.type == "cpu" else "bfloat16"


def model_device(module: torch.nn.Module) -> torch.device:
    """Where a model's weights are (its first parameter's device; CPU for a model without any)."""
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read afterwards includes it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done: the time stamp a latency measurement needs."""
    synchronize(device)
    return time.perf_counter()


def describe(device: torch.device) -> str:
    """'cuda:0 (NVIDIA H200)', 'cpu (AMD EPYC, 2 threads)': what a report says the run used."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({cpu_info()['name']}, {torch.get_num_threads()} threads)"
    return str(device)


def cpu_info() -> dict:
    """The processor and the instruction sets that decide fp32/bf16 speed here (Linux /proc/cpuinfo)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"name": name, "instruction_sets": [f for f in wanted if f in flags]}


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively: a CPU with AVX512-BF16 or AMX, a CUDA GPU of compute capability
    8.0 (Ampere) or later. What the device can do, not how fast it ran once: the precision a decoder computes in
    (precision.py) follows from it, so its numbers never depend on the machine's load."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and _cpu_native_bfloat16()


@functools.lru_cache(maxsize=1)
def _cpu_native_bfloat16() -> bool:
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# ---------------------------------------------------------------- when compiling pays

# Measured on this project's 2-core CPU (AMD EPYC, fp32, SmolLM2-135M + its 0.45 decoder, batch 1):
# compiling both models' steps took 30-60 s (less once inductor's on-disk cache holds the kernels) and
# saved 8.6 ms per OverFill decode step (23.2 -> 14.6 ms) and 11.7 ms per full-model step: it pays
# back after a few thousand decoded tokens. On a GPU eager decoding is bound by kernel launches, so a
# compiled step (one CUDA graph) pays back within a reply or two of a long run.
CPU_PAYS_AFTER_TOKENS = 4096


def decide_compile(asked: bool | None, device: torch.device, decode_tokens: int | None = None) -> tuple[bool, str]:
    """Whether a command compiles its decode step, and the line that says why.

    `asked` is --compile / --no-compile (None: decide here); `decode_tokens` bounds the tokens the
    command will decode (rows x new tokens), None when unknown (chat).
    """
    if asked is not None:
        return asked, f"decode step: {'compiled' if asked else 'eager'} (--{'' if asked else 'no-'}compile)"
    if device.type == "cuda":
        return True, ("decode step: compiled, CUDA graphs (auto on a GPU: an eager step waits on one kernel launch "
                      "per operator; --no-compile to decode eagerly)")
    if device.type != "cpu":
        return False, f"decode step: eager (auto on {device.type}; --compile to try torch.compile there)"
    if decode_tokens is not None and decode_tokens >= CPU_PAYS_AFTER_TOKENS:
        return True, (f"decode step: compiled (auto on a CPU: up to {decode_tokens:,} tokens to decode; compiling "
                      f"takes about a minute and pays back after ~{CPU_PAYS_AFTER_TOKENS:,}; --no-compile to decode eagerly)")
    bound = "" if decode_tokens is None else f", this run decodes at most {decode_tokens:,}"
    return False, (f"decode step: eager (auto on a CPU: compiling takes about a minute and pays back after "
                   f"~{CPU_PAYS_AFTER_TOKENS:,} decoded tokens{bound}; --compile to compile anyway)")
