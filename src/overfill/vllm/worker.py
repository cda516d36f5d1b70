"""One offline vLLM engine in a child process of its own, driven by JSON messages over two pipes.

vLLM engines do not share a process well (each keeps its KV cache, threads and state until the
interpreter exits), so `bench --engine vllm` and `eval --engine vllm` run each engine in a child
`python -m overfill.vllm.worker IN_FD OUT_FD` and talk to it:

    parent -> child   {"model": EngineModel.as_json(), "engine": {LLM keyword arguments}}   (once)
    child -> parent   {"ready": {"vllm", "dtype", "engine_start_s", "scheduler": {...}}}
    parent -> child   {"op": "generate", "prompts": [[ids]], "params": {SamplingParams fields}, "seeds": [int] (optional)}
    child -> parent   {"replies": [[ids]], "seconds": wall time of the generate call}
    parent -> child   {"op": "stats", "reset": bool}   -> {"stats": OverFill's counters, or null}
    parent -> child   {"op": "speculation"}            -> {"speculation": vLLM's speculative-decoding
                                                           counters so far, or null without speculation}
    parent -> child   {"op": "mixed_step", "settings": {...}} -> {"mixed_step": mixed_step.time_mixed_steps(...)}
    parent -> child   end of input                     -> the child exits

Each message is one JSON document, framed by `multiprocessing.connection` (`send_bytes`/`recv_bytes`: its
length-prefixed framing, polling with a timeout, and EOFError when the other end is gone). JSON only: the
connections' pickling `send`/`recv` are not used, nothing is pickled either way. The engine runs inside the child
(VLLM_ENABLE_V1_MULTIPROCESSING=0): the child is the isolation already, and it saves two more
processes importing torch and vLLM (18 s vs 45 s per engine start here). That also lets the
OverFill counters be read straight from the model, without vLLM's pickled RPC.

Several workers can stay alive side by side, so that a benchmark interleaves its modes run by run
rather than timing them minutes apart. vLLM's own output goes to the worker's log; a worker that
dies is one error line naming its log.
"""

from __future__ import annotations

import json
import sys
import time
from multiprocessing.connection import Connection, Pipe
from pathlib import Path

from overfill.errors import OverfillError
from overfill.processes import PROGRESS, failure, last_line, say, start, stop
from overfill.vllm.export import EngineModel

POLL_S = 2.0


def worker_env() -> dict[str, str]:
    """The environment of an engine child: vLLM's CPU settings, local folders only, the engine in-process."""
    from overfill.vllm.runtime import child_env

    env = child_env()
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return env


class EngineWorker:
    """The parent's handle on one engine child. Use as a context manager: leaving it stops the child."""

    def __init__(self, model: EngineModel, log: Path, *, engine: dict | None = None, env: dict[str, str] | None = None,
                 what: str = ""):
        self.model, self.log, self.what = model, Path(log), what or f"vLLM ({model.mode})"
        self.engine, self.env = dict(engine or {}), env
        self.proc = None
        self.info: dict = {}

    def __enter__(self) -> EngineWorker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, report=None) -> EngineWorker:
        """Start the child and wait until its engine is built (`report(text)` gets its progress lines)."""
        env = dict(self.env if self.env is not None else worker_env())
        child_in, self._to_child = Pipe(duplex=False)
        self._from_child, child_out = Pipe(duplex=False)
        fds = (child_in.fileno(), child_out.fileno())
        self.proc = start([sys.executable, "-m", "overfill.vllm.worker", *map(str, fds)], self.log, env, pass_fds=fds)
        child_in.close()  # the child's ends: theirs now, so that its exit reads as EOF here
        child_out.close()
        self._send({"model": self.model.as_json(), "engine": self.engine})
        self.info = self._receive(report)["ready"]
        return self

    def generate(self, prompts: list[list[int]], *, seeds: list[int] | None = None, **params) -> tuple[list[list[int]], float]:
        """Token ids of each prompt's first reply, in order, and the generate call's seconds.

        `seeds` (one per prompt) seeds each request's sampling on its own: a reply then does not depend
        on the other requests in the engine."""
        self._send({"op": "generate", "prompts": prompts, "params": params, **({"seeds": seeds} if seeds is not None else {})})
        reply = self._receive()
        return reply["replies"], reply["seconds"]

    def stats(self, *, reset: bool = False) -> dict | None:
        """OverFill's counters (tokens through the full model / the decoder); None for a plain model."""
        self._send({"op": "stats", "reset": reset})
        return self._receive()["stats"]

    def speculation(self) -> dict | None:
        """vLLM's speculative-decoding counters since the engine started (drafts, draft_tokens, accepted_tokens)."""
        self._send({"op": "speculation"})
        return self._receive()["speculation"]

    def mixed_step(self, **settings) -> dict:
        """An OverFill engine's mixed steps timed by route (overfill.vllm.mixed_step.time_mixed_steps)."""
        self._send({"op": "mixed_step", "settings": settings})
        return self._receive()["mixed_step"]

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self._to_child.close()  # end of input: the child exits on its own
            self.proc.wait(timeout=30)
        except Exception:
            pass
        finally:
            stop(self.proc, grace_s=10.0)
            self._from_child.close()
            self.proc = None

    # ---------------------------------------------------------------- the pipes

    def _send(self, message: dict) -> None:
        try:
            self._to_child.send_bytes(json.dumps(message).encode())
        except OSError:  # BrokenPipeError: the child is gone
            raise self._failed() from None

    def _receive(self, report=None) -> dict:
        # poll is also true at EOF (a child that died): recv_bytes then raises EOFError
        while not self._from_child.poll(POLL_S):
            if self.proc.poll() is not None:
                raise self._failed()
            if report:
                line = last_line(self.log, PROGRESS)
                if line:
                    report(line[len(PROGRESS):])
        try:
            message = json.loads(self._from_child.recv_bytes())
        except (EOFError, OSError):
            raise self._failed() from None
        if "error" in message:
            raise OverfillError(f"{self.what} failed: {message['error']}; its whole log is {self.log}")
        return message

    def _failed(self) -> OverfillError:
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=10)
            except Exception:
                pass
        return failure(self.what, code, self.log)


# -------------------------------------------------------------------- the child


def _serve(llm, model: EngineModel, receive, send) -> None:
    from vllm import SamplingParams

    counters = None
    if model.mode == "overfill":
        from overfill.vllm.plugin.model import get_stats, reset_stats

        counters = lambda reset: llm.apply_model(reset_stats if reset else get_stats)[0]  # noqa: E731
    for message in receive:
        op = message.get("op")
        if op == "generate":
            seeds = message.get("seeds")
            params = (SamplingParams(**message["params"]) if seeds is None
                      else [SamplingParams(**message["params"], seed=seed) for seed in seeds])
            prompts = [{"prompt_token_ids": ids} for ids in message["prompts"]]
            llm.reset_prefix_cache()
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - t0
            send({"replies": [list(o.outputs[0].token_ids) for o in outputs], "seconds": seconds})
        elif op == "stats":
            send({"stats": counters(message.get("reset", False)) if counters else None})
        elif op == "speculation":
            send({"speculation": speculation_counters(llm)})
        elif op == "mixed_step":
            from overfill.vllm.mixed_step import time_mixed_steps

            send({"mixed_step": time_mixed_steps(llm, **message["settings"])})
        else:
            send({"error": f"unknown request {op!r}"})


SPECULATION_METRICS = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
                       "vllm:spec_decode_num_accepted_tokens": "accepted_tokens"}


def speculation_counters(llm) -> dict | None:
    """vLLM's cumulative speculative-decoding counters (its Prometheus metrics), or None without speculation."""
    if llm.llm_engine.vllm_config.speculative_config is None:
        return None
    found = {SPECULATION_METRICS[m.name]: m.value for m in llm.get_metrics() if m.name in SPECULATION_METRICS}
    return {key: found.get(key, 0) for key in SPECULATION_METRICS.values()}


def _messages(inbox: Connection):
    """The parent's messages until it closes its end (EOF)."""
    while True:
        try:
            data = inbox.recv_bytes()
        except EOFError:
            return
        yield json.loads(data)


def main(argv: list[str] | None = None) -> None:
    in_fd, out_fd = (int(a) for a in (argv if argv is not None else sys.argv[1:]))
    receive = _messages(Connection(in_fd, writable=False))
    outbox = Connection(out_fd, readable=False)

    def send(message: dict) -> None:
        outbox.send_bytes(json.dumps(message).encode())

    try:
        setup = next(receive)
        model = EngineModel.from_json(setup["model"])
        from overfill.vllm.runtime import offline_engine, vllm_version

        say(f"starting vLLM for {model.mode}")
        started = time.perf_counter()
        llm = offline_engine(model, **setup["engine"])
        config = llm.llm_engine.vllm_config
        send({"ready": {"vllm": vllm_version(), "mode": model.mode, "path": str(model.path),
                        "dtype": str(config.model_config.dtype).removeprefix("torch."),
                        "engine_start_s": time.perf_counter() - started,
                        "scheduler": {"max_num_seqs": config.scheduler_config.max_num_seqs,
                                      "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
                                      "enable_prefix_caching": bool(config.cache_config.enable_prefix_caching),
                                      "enforce_eager": bool(config.model_config.enforce_eager)}}})
        say("ready")
        _serve(llm, model, receive, send)
    except Exception as error:
        # One line for the parent's error; the traceback stays in the log.
        import traceback

        traceback.print_exc()
        try:
            send({"error": f"{type(error).__name__}: {error}".splitlines()[0][:300]})
        except OSError:
            pass
        raise SystemExit(1) from None


if __name__ == "__main__":  # a spawned engine process (if multiprocessing is turned back on) imports this module again
    main()
