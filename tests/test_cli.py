"""Bad input reaches the user as one `error:` line and exit code 2, never a traceback."""

import json
import sys

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from overfill import cli
from overfill.errors import OverfillError
from tiny import save_tiny, tiny_tokenizer, write_jsonl


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["overfill", *args])
    capsys.readouterr()  # drop what fixtures printed
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    save_tiny(folder, "llama")
    return folder


def assert_one_line_error(code, err, fragment):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert fragment in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("ratio", ["1.0", "-0.2", "1.5"])
def test_ratio_outside_range(monkeypatch, capsys, tiny_folder, tmp_path, ratio):
    code, _, err = run_cli(monkeypatch, capsys, "prune", "--model", str(tiny_folder), "--ratio", ratio, "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "must be in [0, 1)")


def test_width_larger_than_model(monkeypatch, capsys, tiny_folder, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "prune", "--model", str(tiny_folder), "--hidden-size", "4096", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "larger than the model's hidden size")


def test_unsupported_architecture(monkeypatch, capsys, tmp_path):
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    code, _, err = run_cli(monkeypatch, capsys, "prune", "--model", str(folder), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "unsupported architecture 'gpt2'")
    assert "llama" in err and "qwen2" in err


def test_empty_and_malformed_calibration(monkeypatch, capsys, tiny_folder, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run_cli(monkeypatch, capsys, "prune", "--model", str(tiny_folder), "--calib-data", str(empty), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "is empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n[1, 2\n")
    code, _, err = run_cli(monkeypatch, capsys, "prune", "--model", str(tiny_folder), "--calib-data", str(bad), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "no usable records")
    missing = tmp_path / "missing.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "prune", "--model", str(tiny_folder), "--calib-data", str(missing), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "does not exist")


def test_non_empty_output_needs_force(monkeypatch, capsys, tiny_folder, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli(monkeypatch, capsys, "prune", "--model", str(tiny_folder), "--out", str(out))
    assert_one_line_error(code, err, "--force")
    assert (out / "keep.txt").read_text() == "precious"  # nothing lost
    monkeypatch.setattr(sys, "argv", ["overfill", "prune", "--model", str(tiny_folder), "--out", str(out), "--force", "--ratio", "0.5"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code in (0, None)
    record = json.loads((out / "pruning.json").read_text())
    assert record["actual"]["hidden_size"] == 24 and not (out / "keep.txt").exists()


def test_prune_command_writes_a_loadable_folder(monkeypatch, capsys, tiny_folder, tmp_path):
    calib = write_jsonl(tmp_path / "c.jsonl", [{"text": "some calibration text"}, {"text": "and more"}])
    out = tmp_path / "pruned"
    monkeypatch.setattr(sys, "argv", ["overfill", "prune", "--model", str(tiny_folder), "--out", str(out),
                                      "--mlp-size", "50", "--multiple-of", "8", "--calib-data", str(calib)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code in (0, None)
    record = json.loads((out / "pruning.json").read_text())
    # llama: hidden rounds down to lcm(8, 4 heads) = 8 -> floor(0.55 * 48) = 26 -> 24; MLP 50 -> 48
    assert record["requested"] == {"hidden_size": 26, "intermediate_size": 50}
    assert record["actual"] == {"hidden_size": 24, "intermediate_size": 48}
    assert "hidden size" in capsys.readouterr().out


def test_number_lists_take_commas_or_repeated_flags(monkeypatch, capsys, tiny_folder, tmp_path):
    """`--refresh-every 8,16` and `--refresh-every 8 --refresh-every 16` are the same sweep; a bad number is one line."""
    import overfill.bench

    seen = []
    monkeypatch.setattr(overfill.bench, "run_bench", lambda config, console: seen.append(config))
    for args in (["--refresh-every", "8,16"], ["--refresh-every", "8", "--refresh-every", "16"]):
        code, _, err = run_cli(monkeypatch, capsys, "bench", "--model", str(tiny_folder), "--decoder", str(tiny_folder),
                               "--batch-sweep", "1,2", "--out", str(tmp_path / "b"), *args)
        assert code in (0, None), err
    assert [c.refresh_every for c in seen] == [(8, 16), (8, 16)] and seen[0].batch_sweep == (1, 2)
    code, _, err = run_cli(monkeypatch, capsys, "bench", "--model", str(tiny_folder), "--decoder", str(tiny_folder),
                           "--refresh-every", "8,x")
    assert_one_line_error(code, err, "--refresh-every")


def test_the_cli_splits_name_lists_but_never_free_text(monkeypatch, capsys, tiny_folder, tmp_path):
    """Comma splitting is the CLI's: `--modes a,b` is two modes, while a prompt or a stop string keeps its commas."""
    import overfill.bench
    import overfill.cli.commands

    seen = []
    monkeypatch.setattr(overfill.bench, "run_bench", lambda config, console: seen.append(config))
    code, _, err = run_cli(monkeypatch, capsys, "bench", "--model", str(tiny_folder), "--decoder", str(tiny_folder),
                           "--modes", "overfill,full", "--modes", "pruned", "--out", str(tmp_path / "b"))
    assert code in (0, None), err
    assert seen[0].modes == ("overfill", "full", "pruned")

    def caught(command):  # the command as the CLI built it; stop before any model loads
        seen.append(command)
        raise OverfillError("stop here")

    monkeypatch.setattr(overfill.cli.commands.GenerateCommand, "__post_init__", caught)
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", str(tiny_folder), "-p", "a, b", "--stop", "x,y")
    assert_one_line_error(code, err, "stop here")
    assert seen[-1].prompt == ("a, b",) and seen[-1].stop == ("x,y",)


def test_a_list_flag_replaces_its_default(monkeypatch, capsys, tiny_folder, tmp_path):
    """`--modes full` is that one mode, not the default modes and full; the same flag repeated adds to what was given."""
    import overfill.bench

    seen = []
    monkeypatch.setattr(overfill.bench, "run_bench", lambda config, console: seen.append(config))
    for given, expected in ((["--modes", "full"], ("full",)), (["--modes", "pruned", "--modes=full"], ("pruned", "full"))):
        code, _, err = run_cli(monkeypatch, capsys, "bench", "--model", str(tiny_folder), "--decoder", str(tiny_folder),
                               "--out", str(tmp_path / "b"), *given)
        assert code in (0, None), err
        assert seen[-1].modes == expected


def test_only_serve_takes_words_after_a_double_dash(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "prune", "--", "--max-num-seqs", "4")
    assert_one_line_error(code, err, "unexpected arguments after `--`: --max-num-seqs 4")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", [["generate", "-p", "hi"], ["eval", "--data", "x.jsonl"], ["prune"], ["bench"],
                                     ["train", "--data", "x.jsonl", "--decoder", "d"], ["demo"], ["distill", "--data", "x.jsonl"]])
def test_a_gpu_on_a_machine_without_one_is_one_line(monkeypatch, capsys, tmp_path, command):
    (tmp_path / "x.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, *command, "--device", "cuda")
    assert_one_line_error(code, err, "--device cuda: this machine has no CUDA device")


def test_train_takes_limit_and_its_old_name_hidden(monkeypatch, capsys, tmp_path):
    """--limit is the one name of "the first N usable examples"; --max-examples still works, and --help says it is the old name."""
    from overfill.train import TrainConfig

    seen = []

    def caught(config):
        seen.append(config)
        raise OverfillError("stop here")

    monkeypatch.setattr(TrainConfig, "__post_init__", caught)
    for name in ("--limit", "--max-examples"):
        code, _, err = run_cli(monkeypatch, capsys, "train", "--data", "x.jsonl", "--decoder", "d", name, "7")
        assert_one_line_error(code, err, "stop here")
    assert [c.limit for c in seen] == [7, 7]
    code, _, err = run_cli(monkeypatch, capsys, "train", "--data", "x.jsonl", "--limit", "3", "--max-examples", "7")
    assert_one_line_error(code, err, "--max-examples is the old name of --limit")
    monkeypatch.setattr(sys, "argv", ["overfill", "train", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    words = " ".join(capsys.readouterr().out.replace("│", " ").split())  # the help's words, whatever the width
    assert "--max-examples INT The old name of --limit" in words  # listed as what it is


def test_a_command_built_from_groups_runs_each_groups_checks(monkeypatch):
    """generate mixes ModelSource and GenerationConfig (itself Sampling plus more): every group' checks run, through super(), none by hand."""
    from overfill.cli.commands import GenerateCommand

    with pytest.raises(OverfillError, match="float8"):
        GenerateCommand(dtype="float8")
    with pytest.raises(OverfillError, match="top_p"):
        GenerateCommand(top_p=0.0)
    calls = []
    for group in GenerateCommand.__mro__[1:]:
        if "__post_init__" in vars(group):
            original = vars(group)["__post_init__"]
            monkeypatch.setattr(group, "__post_init__", lambda self, o=original, g=group: (calls.append(g.__name__), o(self)))
    GenerateCommand(prompt=("hi",))
    assert sorted(calls) == sorted(["GenerationConfig", "Sampling", "ModelSource", "FullModelSource", "Settings"])  # each once
