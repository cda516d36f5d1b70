"""One configuration, one name: every configuration's name reads back as it, and a bad name gets one error line."""

import itertools

import pytest

from overfill.configuration import Configuration, parse
from overfill.errors import OverfillError


def grid():
    """Every valid combination of the dials, over a few values each."""
    for mode, dtype, refresh, draft, drafter, compiled, checkpoint in itertools.product(
            ("overfill", "full", "pruned"), (None, "float32", "bfloat16", "int8"), (0, 1, 32), (0, 2, 8),
            ("overfill", "pruned"), (False, True), (None, "runs/ckpt", "runs/lr=2e-4", "/abs/a+b@c")):
        try:
            yield Configuration(mode, decoder_dtype=dtype, refresh_every=refresh, draft_tokens=draft, drafter=drafter,
                                compiled=compiled, checkpoint=checkpoint)
        except OverfillError:  # a combination the type refuses (e.g. full@int8, refresh with drafts): not a name
            continue


def test_every_name_reads_back_as_its_configuration():
    configurations = list(grid())
    assert len(configurations) == 240  # the grid is not empty by accident
    for configuration in configurations:
        assert parse(configuration.name) == configuration, configuration.name
    names = [c.name for c in configurations]
    assert len(set(names)) == len(names)  # one name each: no two configurations share one


@pytest.mark.parametrize("name, written", [
    ("overfill", "overfill"),
    ("full+compiled", "full+compiled"),
    ("overfill@int8+spec4/pruned", "overfill@int8+spec4/pruned"),
    ("overfill+compiled+spec4/pruned@x", None),  # '@' belongs to the mode part
    ("overfill+compiled+spec4/pruned", "overfill+spec4/pruned+compiled"),  # dials in any order, written in one
    (" overfill+refresh16:runs/r ", "overfill+refresh16:runs/r"),
    ("overfill@bfloat16+spec2:runs/a:b", "overfill@bfloat16+spec2:runs/a:b"),  # the first ':' starts the checkpoint
])
def test_names_as_written(name, written):
    if written is None:
        with pytest.raises(OverfillError):
            parse(name)
    else:
        assert parse(name).name == written


def test_what_the_runs_read_of_a_configuration():
    spec = parse("overfill@int8+spec3/pruned+compiled:runs/a")
    assert (spec.generation_mode, spec.scoring_mode, spec.label, spec.dials) == (
        "speculative", "full", "overfill@int8+spec3/pruned+compiled", "@int8+spec3/pruned+compiled")
    generation = spec.generation(max_new_tokens=7, compile=False)  # +compiled wins over the command's choice
    assert (generation.mode, generation.draft_tokens, generation.drafter, generation.compile) == ("speculative", 3, "pruned", True)
    assert parse("overfill+refresh8").generation(5, compile=None).compile is None  # no +compiled: the command decides
    assert parse("pruned").plain and not parse("pruned+compiled").plain


@pytest.mark.parametrize("bad, hint", [
    ("fast", "unknown mode"),
    ("speculative", "unknown mode"),
    ("pruned@int8", "write overfill@int8"),
    ("full+spec2", "write overfill+spec2"),
    ("overfill@int4", "float32, bfloat16, int8"),
    ("overfill@", "needs a dtype"),
    ("overfill+spec2/big", "unknown drafter"),
    ("overfill+spec0", "at least 1"),
    ("overfill+refresh0", "at least 1"),
    ("overfill+refreshX", "unknown dial"),
    ("overfill+fast", "unknown dial"),
    ("overfill+spec2+spec4", "twice"),
    ("overfill+refresh8+spec2", "drop +refreshK or +specK"),
    ("overfill:", "without a checkpoint"),
    # the bench's names before it shared the grammar: the error gives the new spelling
    ("speculative4", "write overfill+spec4"),
    ("speculative4/pruned:compiled", "write overfill+spec4/pruned+compiled"),
    ("overfill@int8:compiled", "write overfill@int8+compiled"),
    ("full:compiled", "./compiled"),
])
def test_a_bad_name_gets_one_error_line_that_says_what_to_write(bad, hint):
    with pytest.raises(OverfillError) as err:
        parse(bad)
    message = str(err.value)
    assert "\n" not in message and hint in message and bad.strip() in message


def test_the_type_refuses_what_the_parser_refuses():
    for kwargs in (dict(mode="fast"), dict(mode="full", draft_tokens=2), dict(mode="overfill", drafter="pruned"),
                   dict(mode="overfill", refresh_every=8, draft_tokens=2), dict(mode="overfill", decoder_dtype="int4"),
                   dict(mode="overfill", refresh_every=-1)):
        with pytest.raises(OverfillError):
            Configuration(**kwargs)


def run_cli(monkeypatch, capsys, *args):
    import sys

    from overfill import cli

    monkeypatch.setattr(sys, "argv", ["overfill", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_an_old_bench_name_given_to_eval_is_one_error_line_with_the_new_spelling(monkeypatch, capsys, tmp_path):
    (tmp_path / "x.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    line = run_cli(monkeypatch, capsys, "eval", "--data", str(tmp_path / "x.jsonl"), "--checkpoint", "c",
                   "--entries", "full,speculative4/pruned")
    assert "write overfill+spec4/pruned" in line


def test_bench_takes_draft_tokens_and_its_old_name(monkeypatch, capsys):
    """--draft-tokens, as every other command spells it; --speculative-tokens, its old name, still works."""
    from overfill.bench import BenchConfig

    seen = []

    def caught(config):
        seen.append(config.draft_tokens)
        raise OverfillError("stop here")

    monkeypatch.setattr(BenchConfig, "__post_init__", caught)
    for name in ("--draft-tokens", "--speculative-tokens"):
        assert "stop here" in run_cli(monkeypatch, capsys, "bench", name, "2,4")
    assert seen == [(2, 4), (2, 4)]
    line = run_cli(monkeypatch, capsys, "bench", "--draft-tokens", "2", "--speculative-tokens", "4")
    assert "--speculative-tokens is the old name of --draft-tokens" in line
