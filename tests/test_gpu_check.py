"""The GPU check's small preset on the CPU: every section runs, records its result and writes its files.

On a machine without a GPU the check compares the CPU with itself; what it is for runs on a GPU
(`overfill gpu-check`, docs/gpu-check.md). The compiled step's graph is captured as everywhere
else but run by PyTorch's own kernels here (no C++ build per shape: the suite stays fast).
"""

import json
from pathlib import Path

import pytest
import torch

from overfill import decode_step
from overfill.bench.gpu_check import GpuCheckConfig, run_check
from overfill.cli import main
from overfill.errors import OverfillError


def suite(folder, body: str):
    """A stand-in for tests/test_on_device.py: one `gpu` case with this body (the real cases run on a device; on a CPU
    they would compare the CPU with itself, at a minute's cost)."""
    folder.mkdir()
    (folder / "test_on_device.py").write_text(f"import pytest\n\n@pytest.mark.gpu\ndef test_training_step():\n    {body}\n")
    return folder


def test_small_preset_runs_every_section(tmp_path, monkeypatch, capsys):
    import overfill.bench.gpu_check as gpu_check

    monkeypatch.setattr(decode_step, "BACKEND", "aot_eager")
    monkeypatch.setattr(gpu_check, "TESTS", suite(tmp_path / "suite", "assert True"))
    measured = []  # the memory phases themselves: test_memory.py's (the same measure, on a tiny pair)
    monkeypatch.setattr("overfill.bench.memory.measure", lambda folder, dtype, device, **kw: measured.append(device) or
                        {"weight_bytes": 1, "phases": {name: {"over_weights": 1.0} for name in "abcde"}})
    result = run_check(GpuCheckConfig(out=str(tmp_path), preset="small", device="cpu"))
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["ok"] and result["ok"], [s for s in saved["sanity"] if not s["ok"]] or saved["sections"]
    sections = saved["sections"]
    tested = sections["device tests"]  # the suite's own device cases, run by pytest on the check's device
    assert tested["ok"] and tested["tests"] == 1 and tested["failures"] == tested["errors"] == 0, tested
    assert (tmp_path / "device_tests.xml").is_file()
    assert len(sections["memory"]["phases"]) == 5 and measured == [torch.device("cpu")]  # on the check's device
    figures = saved["figures"]
    assert set(figures["key_point"]["rows"]) == {"overfill+compiled", "full+compiled", "pruned+compiled"}
    assert set(figures["sweeps"]) == {"new_tokens", "batch", "prompt_len"}
    assert set(saved["roofline"]["rows"]) == {"overfill+compiled", "full+compiled", "pruned+compiled"}
    assert {"eager_beside_compiled", "compile_seconds"} <= set(figures)
    for name in ("gpu_check.log", "breakdown.png", "new_tokens.png", "prompt_len.png", "batch.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "all checks passed" in capsys.readouterr().out


def test_a_failing_section_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    import overfill.bench.gpu_check as gpu_check

    monkeypatch.setattr(decode_step, "BACKEND", "aot_eager")
    monkeypatch.setattr(gpu_check, "device_tests", lambda device, out, select: 1 / 0)
    monkeypatch.setattr(gpu_check, "paper_figures", lambda check, config, preset: None)
    result = run_check(GpuCheckConfig(out=str(tmp_path), preset="small", device="cpu"))
    assert not result["ok"] and "ZeroDivisionError" in result["sections"]["device tests"]["error"]
    assert result["sections"]["memory"]["phases"]  # the section after it ran


def test_a_failing_device_case_fails_the_check(tmp_path, monkeypatch):
    """What pytest reports is what the check records: a device case that fails makes the check fail."""
    import overfill.bench.gpu_check as gpu_check

    monkeypatch.setattr(gpu_check, "paper_figures", lambda check, config, preset: None)
    monkeypatch.setattr(gpu_check, "memory_phases", lambda preset, device: {"phases": {"load": {"over_weights": 1.0}}})
    monkeypatch.setattr(gpu_check, "TESTS", suite(tmp_path / "suite", "assert False, 'broken on purpose'"))
    result = run_check(GpuCheckConfig(out=str(tmp_path / "run"), preset="small", device="cpu"))
    tested = result["sections"]["device tests"]
    assert not result["ok"] and tested["failed"] == ["test_training_step"] and tested["failures"] == 1, (result, tested)


def test_bad_arguments_are_one_line(capsys, tmp_path):
    with pytest.raises(OverfillError, match="--preset"):
        GpuCheckConfig(preset="huge")
    for budget in (0.0, float("nan"), float("inf")):
        with pytest.raises(OverfillError, match="--budget"):
            GpuCheckConfig(budget=budget, out=str(tmp_path / "run"))
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file" / "run", Path("/proc/overfill-run")):  # under a file; a place that refuses folders
        with pytest.raises(OverfillError, match="--out .* cannot be written"):
            GpuCheckConfig(out=str(out))
    with pytest.raises(SystemExit) as stopped:
        main(["gpu-check", "--preset", "huge", "--out", str(tmp_path / "run")])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --preset got 'huge': pick paper, small or auto"), lines
