"""`overfill gpu-check`: the PyTorch engine checked on a GPU, and the paper's Figures 3-5 at the paper's scale.

One prepared run, nothing downloaded (every model is built from a config with random weights):

(a) correctness: the test suite's device cases (`pytest -m gpu`, tests/test_on_device.py) on this device:
    greedy tokens of tiny models of every architecture equal the CPU's, eager and compiled, in every
    mode, and a training step runs there; the run records what passed (from a checkout: the package
    does not ship its tests);
(b) speed at the paper's scale (gpu_paper_scale.py): a Llama-3.2-3B-shaped full model and its 0.45 decoder (synthetic.py;
    a decode step's time depends on shapes and bytes, not on weight values) in bfloat16 on the
    compiled engine: Fig. 3 (new tokens), Fig. 4 (prompt length, prefill/decode split) and Fig. 5
    (batch 1..32) for full / pruned / overfill, the eager engine beside it at batch 1, and each
    model's decode step against the HBM roofline (its weight bytes over the measured copy bandwidth).

It stays inside `--budget` seconds: the sweeps run longest last and stop at a point that would not
fit; it writes gpu_check.json after every section (a run cut short keeps what it measured), the
figures as soon as there are some, and gpu_check.log; a sub-check that fails is recorded in the
JSON with its error and the run goes on. `sanity` lists the checks the run made of its own
figures. The small preset (`--preset small`, what `auto` picks without a GPU) runs the same code on
small shapes in about a minute on a CPU (of the device cases, the training step only): the test suite runs it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.etree import ElementTree

import torch

from overfill.atomic import atomic_write_text, check_writable
from overfill.bench.gpu_paper_scale import paper_figures
from overfill.devices import clock, resolve_device
from overfill.errors import OverfillError

PRESETS = {
    # Sized for one H200 and a few minutes: two compiled graphs per model (batch 1, and any batch above 1 with
    # symbolic sizes), every other shape one CUDA graph capture.
    "paper": dict(scale=None, dtype="bfloat16", prompt_len=256, new_tokens=512, new_tokens_sweep=(32, 64, 128, 256, 512),
                  prompt_len_sweep=(128, 256, 512, 1024, 2048), batch_sweep=(1, 2, 4, 8, 16, 32), sweep_new_tokens=64,
                  repeats=3, sweep_repeats=2, eager_tokens=64),
    # The same code on shapes a CPU runs in about a minute: a check of the wiring, not a figure.
    "small": dict(scale=dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=24, vocab_size=512, bos_token_id=1, eos_token_id=2),
                  dtype="float32", prompt_len=24, new_tokens=8, new_tokens_sweep=(4, 8), prompt_len_sweep=(24, 40),
                  batch_sweep=(1, 2), sweep_new_tokens=4, repeats=1, sweep_repeats=1, eager_tokens=4),
}


@dataclass
class GpuCheckConfig:
    out: str = "runs/gpu-check"
    """Folder for gpu_check.json, gpu_check.log and the figures (new_tokens.png, prompt_len.png, batch.png, breakdown.png)."""
    preset: str = "auto"
    """paper (the paper's shapes, bfloat16), small (small shapes, float32: a wiring check) or auto (paper on a GPU, small elsewhere)."""
    device: str = "auto"
    """Where to run: auto (CUDA when available, else CPU), cuda, cuda:N, cpu or mps."""
    budget: float = 330.0
    """Seconds the whole check may take; what would not fit is skipped and recorded as skipped."""

    def __post_init__(self):
        self.device = str(resolve_device(self.device))
        if self.preset == "auto":
            self.preset = "paper" if torch.device(self.device).type == "cuda" else "small"
        if self.preset not in PRESETS:
            raise OverfillError(f"--preset got '{self.preset}': pick paper, small or auto")
        if not 0 < self.budget < math.inf:  # a range, so NaN is refused too
            raise OverfillError(f"--budget is seconds for the whole check, more than 0, got {self.budget}")
        check_writable(self.out, "--out")  # the run writes there after every section: probe it before the first


class Check:
    """The run's record: every section's result or error, written out after each section, and its log."""

    def __init__(self, config: GpuCheckConfig):
        self.config, self.started = config, time.perf_counter()
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = (self.out / "gpu_check.log").open("w", encoding="utf-8")
        self.result: dict = {"config": asdict(config), "preset": dict(PRESETS[config.preset]), "sections": {}, "sanity": [],
                             "skipped": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def time_left(self) -> float:
        return self.config.budget - self.elapsed()

    def say(self, text: str) -> None:
        line = f"[{self.elapsed():5.0f} s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def section(self, name: str, run, *, needs: float = 0.0):
        """Run one section: its result under sections[name], or its error; skipped when under `needs` seconds are left."""
        if self.time_left() < needs:
            self.result["skipped"][name] = f"{self.time_left():.0f} s left, it needs about {needs:.0f}"
            self.say(f"{name}: skipped ({self.result['skipped'][name]})")
            return None
        started = time.perf_counter()
        self.say(f"{name} ...")
        try:
            value = run()
            self.result["sections"][name] = value
            self.say(f"{name}: done in {time.perf_counter() - started:.0f} s")
            return value
        except Exception as error:  # noqa: BLE001 - one failed sub-check must not end the run
            self.result["sections"][name] = {"error": f"{type(error).__name__}: {error}",
                                             "traceback": traceback.format_exc()[-3000:]}
            self.say(f"{name}: FAILED: {type(error).__name__}: {str(error)[:300]}")
            return None
        finally:
            self.save()

    def sane(self, name: str, ok: bool, detail: str, judged: bool = True) -> None:
        """Record a check of the run's own figures; one not `judged` (timings of the small preset's
        microsecond steps) is reported but does not fail the run."""
        self.result["sanity"].append({"check": name, "ok": bool(ok), "detail": detail, "judged": judged})
        self.say(f"sanity {('ok  ' if ok else 'FAIL') if judged else 'info'} {name}: {detail}")

    def save(self) -> None:
        self.result["seconds"] = round(self.elapsed(), 1)
        atomic_write_text(self.out / "gpu_check.json", json.dumps(self.result, indent=1, default=str) + "\n")


# ---------------------------------------------------------------- the machine


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Device memory bandwidth in GB/s, read + write, of copying a buffer larger than any cache (best of 5)."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    best = math.inf
    for _ in range(5):
        started = clock(device)
        target.copy_(source)
        best = min(best, clock(device) - started)
    return 2 * source.numel() / best / 1e9


def environment(device: torch.device, megabytes: int) -> dict:
    import transformers

    from overfill.bench.results import environment as bench_environment

    env = bench_environment(default_dtype_name(device), device)
    env["transformers"] = transformers.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                      "capability": f"{props.major}.{props.minor}"}
    env["copy_bandwidth_gb_s"] = round(copy_bandwidth(device, megabytes), 1)
    return env


def default_dtype_name(device: torch.device) -> str:
    from overfill.devices import default_dtype

    return default_dtype(device)


# ---------------------------------------------------------------- (a) correctness: the test suite's device cases


TESTS = Path(__file__).resolve().parents[3] / "tests"  # a checkout's test suite (src layout)


def device_tests(device: torch.device, out: Path, select: str | None = None) -> dict:
    """The test suite's device cases (`-m gpu`) on `device`, in a pytest process of their own; what passed."""
    if not (TESTS / "test_on_device.py").is_file():
        return {"not_run": f"no test suite at {TESTS}: run the check from a checkout"}
    report = out / "device_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={report}",
               str(TESTS / "test_on_device.py"), *(["-k", select] if select else [])]
    done = subprocess.run(command, cwd=TESTS.parent, capture_output=True, text=True,
                          env=dict(os.environ, OVERFILL_TEST_DEVICES=str(device)))
    suite = ElementTree.parse(report).getroot().find("testsuite") if report.is_file() else None
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")} if suite is not None else {}
    failed = [case.get("name") for case in (suite.iter("testcase") if suite is not None else [])
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "failed": failed, "exit_code": done.returncode, "tail": done.stdout.strip().splitlines()[-3:],
            "ok": done.returncode == 0 and counts.get("tests", 0) > counts.get("skipped", 0)}


# ---------------------------------------------------------------- the run


def memory_phases(preset: dict, device: torch.device) -> dict:
    """`overfill bench --memory`'s phases on the device: the paper's pair (the small preset: its tiny shape)."""
    from overfill.bench import memory, synthetic

    dtype = getattr(torch, preset["dtype"])
    full = synthetic.LLAMA_3B if preset["scale"] is None else dict(synthetic.LLAMA_3B, **preset["scale"])
    with tempfile.TemporaryDirectory() as folder:
        memory.write_pair(full, synthetic.DECODER_045, dtype, Path(folder))
        return memory.measure(Path(folder), dtype, device, prompt_len=preset["prompt_len"], new_tokens=preset["new_tokens"])


def run_check(config: GpuCheckConfig) -> dict:
    preset = PRESETS[config.preset]
    device = torch.device(config.device)
    check = Check(config)
    check.say(f"overfill GPU check: preset {config.preset} on {device}, budget {config.budget:.0f} s, out {check.out}")
    env = check.section("environment", lambda: environment(device, 1024 if device.type == "cuda" else 128))
    if env:
        check.say(f"torch {env['torch']}, transformers {env['transformers']}, {env.get('gpu') or env['device']}, "
                  f"copy bandwidth {env['copy_bandwidth_gb_s']} GB/s")
    # Correctness gets at most a third of the budget; the paper-scale figures need the rest. The small preset (a CPU,
    # the test suite) runs only the training step: the token cases compile a step per model, minutes there.
    select = "training_step" if config.preset == "small" else None
    tested = check.section("device tests", lambda: device_tests(device, check.out, select), needs=20)
    if tested is not None and "not_run" not in tested:
        check.sane(f"the test suite's device cases pass on {device}", tested["ok"],
                   f"{tested.get('tests', 0)} run, failed: {', '.join(tested['failed']) or 'none'}")
    memory = check.section("memory", lambda: memory_phases(preset, device), needs=60)
    if memory is not None:
        worst = max(row["over_weights"] for row in memory["phases"].values())
        check.sane("peak memory less KV at most 1.15x the weights", worst <= 1.15, f"{worst:.2f}x",
                   judged=config.preset == "paper")
    paper_figures(check, config, preset)
    failed = [name for name, value in check.result["sections"].items() if isinstance(value, dict) and "error" in value]
    insane = [s["check"] for s in check.result["sanity"] if s["judged"] and not s["ok"]]
    check.result["ok"] = not failed and not insane
    check.save()
    check.say(f"done in {check.elapsed():.0f} s: {'all checks passed' if check.result['ok'] else 'FAILED: ' + ', '.join(failed + insane)}; "
              f"{check.out / 'gpu_check.json'}")
    check.log.close()
    return check.result

