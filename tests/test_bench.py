"""`overfill bench` on tiny random models: the JSON has every section and the plots are written (no timing checks)."""

import json

import pytest
from rich.console import Console

from overfill.bench import BenchConfig, run_bench
from overfill.bench.prompts import PromptSource
from overfill.configuration import parse
from overfill.errors import OverfillError
from overfill.modeling import OverFillModel
from overfill.prune import PruneConfig, prune_model
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def pair():
    full, tok = tiny_model(), tiny_tokenizer()
    decoder = prune_model(full, tok, PruneConfig(ratio=0.5), progress=False).model
    return OverFillModel(full, decoder, tok)


def test_bench_writes_json_and_plots(pair, tmp_path):
    config = BenchConfig(out=str(tmp_path), prompt_len=24, new_tokens=6, new_tokens_sweep=(3, 6), prompt_len_sweep=(20, 30),
                         batch_sweep=(1, 2), sweep_new_tokens=4, repeats=2, sweep_repeats=1, warmup=1, overhead_steps=4, threads=1,
                         decode_steps="eager")
    result = run_bench(config, Console(file=open(tmp_path / "console.txt", "w"), width=200), model=pair)

    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(saved) >= {"config", "environment", "models", "key_point", "sweeps", "overhead", "files"}
    key = saved["key_point"]
    assert set(key["rows"]) == {"overfill", "full", "pruned", "hf_generate", "hf_assisted"}
    for row in key["rows"].values():
        assert row["new_tokens"] == 6 and len(row["samples"]["e2e_s"]) == 2
        assert {"median", "q1", "q3", "min", "max"} <= set(row["decode_tokens_per_s"])
    names = {r["name"] for r in key["ratios"]}
    assert {"overfill decode tok/s / full", "overfill end-to-end / pruned end-to-end", "overfill end-to-end / HF assisted"} <= names
    assert [p["new_tokens"] for p in saved["sweeps"]["new_tokens"]["rows"]["overfill"]] == [3, 6]
    assert saved["sweeps"]["prompt_len"]["values"] == [20, 30]
    assert [p["batch"] for p in saved["sweeps"]["batch"]["rows"]["pruned"]] == [1, 2]
    assert saved["overhead"]["steps"] == 4 and saved["overhead"]["overhead_in_loop_ms_per_step"]["n"] == 8
    for name in ("breakdown.png", "new_tokens.png", "prompt_len.png", "batch.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
        assert name in result["files"]
    assert "ratios measured in this run" in (tmp_path / "console.txt").read_text()


def test_bench_times_refresh_rows_beside_the_modes(pair, tmp_path):
    config = BenchConfig(out=str(tmp_path), prompt_len=24, new_tokens=9, new_tokens_sweep=0, prompt_len_sweep=0, batch_sweep=0,
                         repeats=2, warmup=0, overhead_steps=0, threads=1, references=False, refresh_every=(4, 2),
                         decode_steps="eager")
    run_bench(config, Console(file=open(tmp_path / "console.txt", "w"), width=200), model=pair)
    key = json.loads((tmp_path / "bench.json").read_text())["key_point"]
    assert set(key["rows"]) == {"overfill", "full", "pruned", "overfill+refresh2", "overfill+refresh4"}
    ratios = {r["name"]: r for r in key["ratios"]}
    assert ratios["overfill+refresh2 decode ms/token / overfill"]["n"] == 2


def test_bench_times_decoder_dtypes_beside_the_modes(pair, tmp_path, monkeypatch):
    from overfill.precision import decoder_dtype

    # what each dtype computes in follows from the machine's capability, said beside the rows that time it
    monkeypatch.setattr("overfill.devices.native_bfloat16", lambda device: True)
    config = BenchConfig(out=str(tmp_path), prompt_len=24, new_tokens=6, new_tokens_sweep=0, prompt_len_sweep=0, batch_sweep=(1, 2),
                         sweep_new_tokens=4, repeats=2, sweep_repeats=1, warmup=0, overhead_steps=0, threads=1,
                         references=False, decoder_dtypes=("float32", "bfloat16", "int8"), modes=("overfill", "full"), decode_steps="eager")
    run_bench(config, Console(file=open(tmp_path / "console.txt", "w"), width=200), model=pair)
    result = json.loads((tmp_path / "bench.json").read_text())
    key = result["key_point"]
    # The batch sweep times the dtype rows too (whether a dtype pays can flip with the batch size).
    batch = result["sweeps"]["batch"]["rows"]
    assert set(batch) == set(key["rows"]) and all(len(points) == 2 for points in batch.values())
    assert "decode ms/token" in (tmp_path / "console.txt").read_text()
    assert result["decoder_precision"] in (tmp_path / "console.txt").read_text()
    assert result["decoder_precision"].endswith("int8 decoder: PyTorch's int8 kernel with bfloat16 activations")
    assert set(key["rows"]) == {"overfill", "full", "overfill@bfloat16", "overfill@int8"}  # float32 is the overfill row
    names = {r["name"] for r in key["ratios"]}
    assert {"overfill@int8 decode ms/token / overfill", "overfill@int8 decode tok/s / full"} <= names
    assert decoder_dtype(pair.decoder) == "float32"  # the bench converted copies, not the model it was given


def test_bench_times_compiled_rows_beside_the_eager_ones(pair, tmp_path):
    # Batch 4: the shapes tests/test_decode_step.py compiles too, so one compiled step serves both.
    config = BenchConfig(out=str(tmp_path), prompt_len=24, new_tokens=6, batch_size=4, new_tokens_sweep=0, prompt_len_sweep=0,
                         batch_sweep=0, repeats=2, warmup=1, overhead_steps=0, threads=1, references=False, modes=("overfill", "full"))
    run_bench(config, Console(file=open(tmp_path / "console.txt", "w"), width=200), model=pair)
    result = json.loads((tmp_path / "bench.json").read_text())
    key = result["key_point"]
    assert set(key["rows"]) == {"overfill", "full", "overfill+compiled", "full+compiled"}
    names = {r["name"] for r in key["ratios"]}
    # Each engine's OverFill against that engine's full model, and what compiling gains per mode.
    assert {"overfill decode tok/s / full", "overfill+compiled decode tok/s / full+compiled",
            "overfill+compiled decode tok/s / overfill", "full+compiled decode tok/s / full"} <= names
    # Compiled in the warm-up (same shapes as the timed runs), so the timed runs pay no compile.
    assert set(result["compile_seconds"]["full"]) == {"cpu 4x128"} and set(result["compile_seconds"]["decoder"]) == {"cpu 4x128"}
    assert "compiled step, first call of each shape" in (tmp_path / "console.txt").read_text()


def test_bench_times_speculative_rows_with_either_drafter(pair, tmp_path):
    config = BenchConfig(out=str(tmp_path), prompt_len=24, new_tokens=9, new_tokens_sweep=0, prompt_len_sweep=0, batch_sweep=0,
                         repeats=2, warmup=0, overhead_steps=0, threads=1, references=False, modes=("overfill", "full"),
                         decode_steps="eager", draft_tokens=(4, 2), drafters=("overfill", "pruned"))
    run_bench(config, Console(file=open(tmp_path / "console.txt", "w"), width=200), model=pair)
    key = json.loads((tmp_path / "bench.json").read_text())["key_point"]
    spec_rows = {"overfill+spec2", "overfill+spec4", "overfill+spec2/pruned", "overfill+spec4/pruned"}
    assert set(key["rows"]) == {"overfill", "full"} | spec_rows
    for row in spec_rows:
        counters, k = key["rows"][row]["speculation"], parse(row).draft_tokens
        assert counters["runs"] == 2 and 0 <= counters["accepted"] <= counters["drafted"]
        # each pass of the full model yields its own token plus the drafts it kept: 1..k+1 tokens
        assert 1 <= counters["tokens_per_full_pass"] <= k + 1
    names = {r["name"] for r in key["ratios"]}
    assert "overfill+spec4/pruned decode tok/s / full" in names
    assert "draft tokens accepted" in (tmp_path / "console.txt").read_text()


def test_speculative_rows_verify_once_per_round(pair):
    """A speculative row runs the full model once for the prompt and once per round of drafts."""
    import torch

    from overfill.bench.timing import row_generation, time_loop

    config = row_generation("overfill+spec3/pruned")
    assert (config.mode, config.draft_tokens, config.drafter, config.compile) == ("speculative", 3, "pruned", False)
    assert row_generation("overfill+spec3+compiled").compile is True
    calls = []
    handle = pair.full.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        ids, mask = PromptSource.from_tokenizer(pair.tokenizer).batch(20, 1)
        with torch.inference_mode():
            run = time_loop(pair, "overfill+spec3", ids, mask, 10, 0)
    finally:
        handle.remove()
    assert len(run.times) == 10 and len(calls) == 1 + run.speculation["rounds"]
    assert run.speculation["rounds"] >= 3  # 9 tokens after the first, at most 4 per round


def test_refresh_rows_run_the_refresh_schedule(pair, monkeypatch):
    """A refresh row calls the full model once per block after the prompt; plain OverFill only for the prompt."""
    import torch

    from overfill.bench.timing import time_loop

    calls = []
    handle = pair.full.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        ids, mask = PromptSource.from_tokenizer(pair.tokenizer).batch(20, 1)
        with torch.inference_mode():
            for row in ("overfill", "overfill+refresh3"):
                calls.clear()
                run = time_loop(pair, row, ids, mask, 10, 0)
                assert len(run.times) == 10
                assert len(calls) == {"overfill": 1, "overfill+refresh3": 1 + 3}[row]  # refreshes after y3, y6, y9
    finally:
        handle.remove()


def test_prompts_have_the_exact_length(pair):
    ids, mask = PromptSource.from_tokenizer(pair.tokenizer).batch(40, 3)
    assert ids.shape == (3, 40) and bool(mask.all())
    assert not bool((ids[0] == ids[1]).all())  # rows read different text


@pytest.mark.parametrize("kwargs, message", [
    (dict(modes=("overfill", "fast")), "--modes"),
    (dict(batch_sweep=(1, "two")), "--batch-sweep"),
    (dict(repeats=0), "--repeats"),
    (dict(refresh_every=8, modes=("full", "pruned")), "--refresh-every"),
    (dict(refresh_every=8, engine="vllm"), "--refresh-every"),
    (dict(refresh_every=-8), "--refresh-every"),
    (dict(decoder_dtypes="int4"), "--decoder-dtypes"),
    (dict(draft_tokens=2, drafters="small"), "--drafters"),
    (dict(draft_tokens=(0, 2)), "--draft-tokens"),
])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(OverfillError, match=message):
        BenchConfig(**kwargs)


def test_sweeps_parse_and_skip():
    config = BenchConfig(quick=True, batch_sweep=0, prompt_len_sweep=(256, 64), modes=["overfill", "full"])
    assert config.batch_sweep == () and config.prompt_len_sweep == (64, 256) and config.modes == ("overfill", "full")
    assert config.new_tokens_sweep == (16, 32, 64) and config.key_run_tokens == 64  # the rest comes from the preset


def test_sweep_tables_pair_each_step_with_its_own_kind(tmp_path):
    """The sweep table sets OverFill beside the pruned and full rows of the same step, eager and compiled."""
    from overfill.bench.report import print_bench
    from overfill.bench.results import summarize

    def row(scale):
        return [summarize([{"prefill_s": 0.1, "decode_s": scale, "e2e_s": 0.1 + scale, "new_tokens": 9, "decode_tokens": 8,
                            "steps": 9}], 1)]

    rows = {name: row(scale) for name, scale in (("overfill", 1.0), ("pruned", 0.8), ("overfill+compiled", 0.5),
                                                 ("pruned+compiled", 0.25), ("full+compiled", 1.0))}
    result = {"config": {"repeats": 1}, "key_point": {"batch": 1, "prompt_len": 8, "new_tokens": 9, "rows": {}, "ratios": []},
              "sweeps": {"batch": {"values": [1], "rows": rows}}, "seconds": 1.0, "files": [],
              "environment": {"cpu": {"name": "cpu", "instruction_sets": []}, "torch_threads": 1, "load_average": None,
                              "dtype": "float32"}}
    path = tmp_path / "console.txt"
    print_bench(Console(file=open(path, "w"), width=300), result, tmp_path)
    text = path.read_text()
    for column in ("overfill / pruned", "overfill+compiled / pruned+compiled", "full+compiled / overfill+compiled"):
        assert column in text
    assert "overfill / pruned+compiled" not in text
