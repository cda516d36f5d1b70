"""The GPU check's small preset on the CPU: every section runs, records its result and writes its files.

On a machine without a GPU the check compares the CPU with itself; what it is for runs on a GPU
(`python -m overfill.bench.gpu_check`, README). The compiled step's graph is captured as everywhere
else but run by PyTorch's own kernels here (no C++ build per shape: the suite stays fast).
"""

import json
from pathlib import Path

import pytest

from overfill import decode_step
from overfill.bench.gpu_check import GpuCheckConfig, main, run_check
from overfill.errors import OverfillError


def test_small_preset_runs_every_section(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(decode_step, "BACKEND", "aot_eager")
    result = run_check(GpuCheckConfig(out=str(tmp_path), preset="small", device="cpu", kinds=("llama", "qwen3")))
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["ok"] and result["ok"], [s for s in saved["sanity"] if not s["ok"]] or saved["sections"]
    sections = saved["sections"]
    assert set(sections["tiny models"]) == {"llama", "qwen3"}
    cases = sections["tiny models"]["llama"]
    assert {"overfill, padded batch", "full, padded batch", "pruned, padded batch", "overfill, refresh every 4",
            "overfill, 3 candidates"} <= set(cases)
    assert all(engines[e]["equal"] for engines in cases.values() for e in ("eager", "compiled"))
    assert sections["training step"]["ok"]
    assert len(sections["memory"]["phases"]) == 5 and sections["memory"]["weight_bytes"] > 0
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
    monkeypatch.setattr(gpu_check, "training_step", lambda device: 1 / 0)
    monkeypatch.setattr(gpu_check, "paper_figures", lambda check, config, preset: None)
    result = run_check(GpuCheckConfig(out=str(tmp_path), preset="small", device="cpu", kinds=("mistral",)))
    assert not result["ok"] and "ZeroDivisionError" in result["sections"]["training step"]["error"]
    assert result["sections"]["tiny models"]["mistral"]  # the sections before and after it ran


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
    with pytest.raises(SystemExit, match="error: --preset"):
        main(["--preset", "huge"])
