"""Compiling is reported apart from decoding: a command's decode seconds and tok/s leave out the steps that compiled
a new shape of the compiled step, and `compile_s` holds them. A slow compile is injected (a clock moved on by a
day during the first call of each compiled shape): no timing is asserted."""

import json
import time

import torch

from overfill import decode_step
from overfill.modeling import OverFillModel
from test_cli import run_cli
from test_generation import pruned_model
from tiny import save_tiny

DAY = 86400.0


def slow_compile(monkeypatch):
    """torch.compile whose product takes a day (on a moved clock) on each new shape: what compiling costs, made plain."""
    monkeypatch.setattr(decode_step, "BACKEND", "aot_eager")
    offset = [0.0]
    real_clock, real_compile = time.perf_counter, torch.compile
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + offset[0])

    def compile_(module, **options):
        compiled, seen = real_compile(module, **options), set()

        def call(tokens, *rest):
            if tuple(tokens.shape) not in seen:
                seen.add(tuple(tokens.shape))
                offset[0] += DAY
            return compiled(tokens, *rest)
        return call

    monkeypatch.setattr(torch, "compile", compile_)


def test_generate_reports_compiling_apart_from_decoding(tmp_path, monkeypatch, capsys):
    full, tok = save_tiny(tmp_path / "full")
    OverFillModel(full, pruned_model("llama").decoder, tok, full_source=str(tmp_path / "full")).save_pretrained(tmp_path / "ckpt")
    slow_compile(monkeypatch)
    args = ("generate", str(tmp_path / "ckpt"), "-p", "hello", "--max-new-tokens", "8", "--device", "cpu")
    code, out, err = run_cli(monkeypatch, capsys, *args, "--compile", "--json")
    assert code == 0, err
    reply = json.loads(out.strip().splitlines()[-1])
    assert reply["new_tokens"] == 8
    # one compiled shape, one day: in compile_s, not in decode_s, and decode tok/s is over the other steps' time
    assert DAY <= reply["compile_s"] < 2 * DAY and reply["decode_s"] < DAY and reply["prefill_s"] < DAY
    assert reply["decode_tokens_per_s"] > 8 / DAY
    code, _, err = run_cli(monkeypatch, capsys, *args, "--compile")  # the summary line says it apart too
    assert code == 0 and "compile " in err and "(not in decode)" in err
    code, out, err = run_cli(monkeypatch, capsys, *args, "--no-compile", "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["compile_s"] == 0  # eager: nothing compiled
