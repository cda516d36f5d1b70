"""The engine worker's pipes (vllm/worker.py) without vLLM: a stand-in child speaking the same framing
(multiprocessing.connection, JSON bytes) answers, sees the end of input when the parent is done, and a child that
dies mid-request is one error line naming its log."""

import sys
from pathlib import Path

import pytest

from overfill.errors import OverfillError
from overfill.vllm import worker as worker_module
from overfill.vllm.export import EngineModel
from overfill.vllm.worker import EngineWorker

# The stand-in engine: answers `ready`, then each generate with the prompts reversed, until the parent's end of
# input, which it reports in its log; with `die`, it exits on the first request instead.
STAND_IN = """
import json, sys
from multiprocessing.connection import Connection
inbox, outbox = Connection(int(sys.argv[-2]), writable=False), Connection(int(sys.argv[-1]), readable=False)
setup = json.loads(inbox.recv_bytes())
outbox.send_bytes(json.dumps({"ready": {"mode": setup["model"]["mode"], "engine": setup["engine"]}}).encode())
while True:
    try:
        message = json.loads(inbox.recv_bytes())
    except EOFError:
        print("end of input", flush=True)
        break
    if DIE:
        print("ValueError: the engine fell over", flush=True)
        sys.exit(3)
    outbox.send_bytes(json.dumps({"replies": [p[::-1] for p in message["prompts"]], "seconds": 0.5}).encode())
"""


def stand_in(monkeypatch, die: bool = False):
    real_start = worker_module.start

    def start(argv, log, env, pass_fds=()):
        assert argv[1:3] == ["-m", "overfill.vllm.worker"]
        return real_start([sys.executable, "-c", f"DIE = {die}\n{STAND_IN}", *argv[-2:]], log, env, pass_fds)

    monkeypatch.setattr(worker_module, "start", start)


def model(tmp_path) -> EngineModel:
    return EngineModel(path=tmp_path, name="tiny", mode="overfill", dtype="float32")


def test_messages_round_trip_and_closing_is_the_end_of_input(tmp_path, monkeypatch):
    stand_in(monkeypatch)
    log = tmp_path / "worker.log"
    prompts = [list(range(200_000)), [1, 2, 3]]  # one message larger than a pipe's buffer: framed, not cut
    with EngineWorker(model(tmp_path), log, engine={"max_model_len": 64}, env={}) as worker:
        assert worker.info == {"mode": "overfill", "engine": {"max_model_len": 64}}
        replies, seconds = worker.generate(prompts, temperature=0.0)
        assert replies == [p[::-1] for p in prompts] and seconds == 0.5
        proc = worker.proc
    assert proc.returncode == 0 and "end of input" in Path(log).read_text()


def test_a_child_that_dies_mid_request_is_one_line_naming_its_log(tmp_path, monkeypatch):
    stand_in(monkeypatch, die=True)
    log = tmp_path / "worker.log"
    with EngineWorker(model(tmp_path), log, env={}, what="vLLM (tiny)") as worker:
        with pytest.raises(OverfillError) as err:
            worker.generate([[1, 2]])
    message = str(err.value)
    assert "\n" not in message and "vLLM (tiny) failed (exit code 3)" in message
    assert "the engine fell over" in message and str(log) in message
