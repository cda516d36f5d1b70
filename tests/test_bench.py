"""`overfill bench` on tiny random models: the JSON has every section and the plots are written (no timing checks)."""

import json

import pytest
from rich.console import Console

from overfill.bench import BenchConfig, run_bench
from overfill.bench.prompts import PromptSource
from overfill.errors import OverfillError
from overfill.modeling import OverFillModel
from overfill.prune import PruneConfig, prune_model
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def pair():
    full, tok = tiny_model(), tiny_tokenizer()
    decoder = prune_model(full, tok, PruneConfig(ratio=0.5), progress=False).model
    return OverFillModel(full, decoder, tok)


def test_bench_writes_json_and_plots(pair, tmp_path, monkeypatch):
    """The one whole eager run: every section and every kind of row (modes, references, refresh, decoder dtype,
    speculative); how rows are named and paired is unit-tested below, without a run."""
    from overfill.precision import decoder_dtype

    # what each dtype computes in follows from the machine's capability, said beside the rows that time it
    monkeypatch.setattr("overfill.devices.native_bfloat16", lambda device: True)
    config = BenchConfig(out=str(tmp_path), prompt_len=24, new_tokens=6, new_tokens_sweep=(3, 6), prompt_len_sweep=(20, 30),
                         batch_sweep=(1, 2), sweep_new_tokens=4, repeats=2, sweep_repeats=1, warmup=1, overhead_steps=4, threads=1,
                         decode_steps="eager", refresh_every=(2,), decoder_dtypes=("float32", "int8"), draft_tokens=(2,),
                         drafters=("overfill", "pruned"))
    result = run_bench(config, Console(file=open(tmp_path / "console.txt", "w"), width=200), model=pair)

    saved = json.loads((tmp_path / "bench.json").read_text())
    console = (tmp_path / "console.txt").read_text()
    assert set(saved) >= {"config", "environment", "models", "key_point", "sweeps", "overhead", "files"}
    key = saved["key_point"]
    spec_rows = {"overfill+spec2", "overfill+spec2/pruned"}
    assert set(key["rows"]) == {"overfill", "full", "pruned", "hf_generate", "hf_assisted", "overfill+refresh2",
                                "overfill@int8"} | spec_rows
    for row in key["rows"].values():
        assert row["new_tokens"] == 6 and len(row["samples"]["e2e_s"]) == 2
        assert {"median", "q1", "q3", "min", "max"} <= set(row["decode_tokens_per_s"])
    ratios = {r["name"]: r for r in key["ratios"]}
    assert {"overfill decode tok/s / full", "overfill end-to-end / pruned end-to-end", "overfill end-to-end / HF assisted",
            "overfill@int8 decode ms/token / overfill", "overfill@int8 decode tok/s / full",
            "overfill+spec2/pruned decode tok/s / full"} <= set(ratios)
    assert ratios["overfill+refresh2 decode ms/token / overfill"]["n"] == 2
    for row in spec_rows:
        counters = key["rows"][row]["speculation"]
        assert counters["runs"] == 2 and 0 <= counters["accepted"] <= counters["drafted"]
        assert 1 <= counters["tokens_per_full_pass"] <= 3  # each pass of the full model: its own token plus the kept drafts
    assert [p["new_tokens"] for p in saved["sweeps"]["new_tokens"]["rows"]["overfill"]] == [3, 6]
    assert saved["sweeps"]["prompt_len"]["values"] == [20, 30]
    batch = saved["sweeps"]["batch"]["rows"]  # the dtype rows too (whether a dtype pays can flip with the batch size)
    assert [p["batch"] for p in batch["pruned"]] == [1, 2] and [p["batch"] for p in batch["overfill@int8"]] == [1, 2]
    assert saved["overhead"]["steps"] == 4 and saved["overhead"]["overhead_in_loop_ms_per_step"]["n"] == 8
    for name in ("breakdown.png", "new_tokens.png", "prompt_len.png", "batch.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
        assert name in result["files"]
    assert "ratios measured in this run" in console and "decode ms/token" in console and "draft tokens accepted" in console
    assert saved["decoder_precision"] in console
    assert saved["decoder_precision"].endswith("int8 decoder: PyTorch's int8 kernel with bfloat16 activations")
    assert decoder_dtype(pair.decoder) == "float32"  # the bench converted copies, not the model it was given


def test_bench_rows_name_every_row(pair):
    """The key point's rows in order: modes, refresh, dtype and speculative rows, eager then compiled, then references."""
    from overfill.bench.run import bench_rows
    from overfill.precision import decoder_dtype

    config = BenchConfig(modes=("overfill", "full"), refresh_every=(4, 2), decoder_dtypes=("float32", "bfloat16"),
                         draft_tokens=(4, 2), drafters=("overfill", "pruned"), batch_size=2)
    rows, variants, skipped = bench_rows(pair, config)
    eager = ("overfill", "full", "overfill+refresh2", "overfill+refresh4", "overfill@bfloat16", "overfill+spec2",
             "overfill+spec2/pruned", "overfill+spec4", "overfill+spec4/pruned")  # the config sorts refresh and draft counts
    assert rows == eager + tuple(f"{row}+compiled" for row in eager) + ("hf_generate",)
    assert skipped == {"hf_assisted": "HF assisted generation runs batch 1 only"}
    assert list(variants) == ["overfill@bfloat16"] and decoder_dtype(variants["overfill@bfloat16"].decoder) == "bfloat16"
    assert variants["overfill@bfloat16"].full is pair.full and decoder_dtype(pair.decoder) == "float32"  # a copy converted
    rows, _, skipped = bench_rows(pair, BenchConfig(modes=("full", "pruned"), decode_steps="compiled", references=False))
    assert rows == ("full+compiled", "pruned+compiled") and skipped == {}


def summary(decode_s: list[float], prefill_s: float = 0.5) -> dict:
    """A row as the key point summarises it: 10 new tokens per repeat (9 decoded), these decode times."""
    from overfill.bench.results import summarize

    splits = [{"prefill_s": prefill_s, "decode_s": d, "e2e_s": prefill_s + d, "new_tokens": 10, "decode_tokens": 9, "steps": 10}
              for d in decode_s]
    return summarize(splits, batch=1)


def test_key_ratios_pair_rows_repeat_by_repeat():
    """Each ratio divides a row's sample by the other's of the same repeat; compiled rows pair with compiled ones."""
    from overfill.bench.run import key_ratios

    rows = {"overfill": summary([1.0, 2.0]), "full": summary([2.0, 2.0]), "pruned": summary([1.0, 1.0]),
            "overfill+compiled": summary([0.5, 0.5]), "full+compiled": summary([2.0, 1.0]),
            "overfill+refresh2": summary([3.0, 4.0]), "overfill@int8+compiled": summary([0.25, 0.25]),
            "overfill+spec3/pruned": summary([1.0, 4.0])}
    ratios = {r["name"]: r for r in key_ratios(rows)}
    assert ratios["overfill decode tok/s / full"]["median"] == 1.5  # 2/1 and 2/2 (tok/s: the inverse of the times)
    assert ratios["overfill end-to-end / pruned end-to-end"]["median"] == (1.5 / 1.5 + 2.5 / 1.5) / 2
    assert ratios["overfill+compiled decode tok/s / full+compiled"]["median"] == 3.0  # 4 and 2
    assert ratios["overfill+compiled decode tok/s / overfill"]["median"] == 3.0  # 2 and 4
    assert ratios["full+compiled decode tok/s / full"]["median"] == 1.5  # 1 and 2
    assert ratios["overfill+refresh2 decode ms/token / overfill"]["median"] == 2.5  # 3 and 2
    assert ratios["overfill@int8+compiled decode ms/token / overfill+compiled"]["median"] == 0.5
    assert ratios["overfill@int8+compiled decode tok/s / full+compiled"]["median"] == 6.0  # 8 and 4
    assert {"overfill+spec3/pruned decode tok/s / full", "overfill+spec3/pruned decode tok/s / full+compiled"} <= set(ratios)
    assert all(r["n"] == 2 for r in ratios.values())
    assert not any("hf_" in name or "pruned+compiled" in name for name in ratios)  # no row, no ratio


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
