"""Greedy replies from vLLM for `overfill eval --engine vllm`: one engine per entry, each in a process of its own.

vLLM engines do not share a process well (each keeps its KV cache, threads and engine process until
the interpreter exits), so every entry's engine runs in a child `python -m overfill.evaluation.vllm_replies
REQUEST RESULT` that exits once its replies are written: the next engine starts on a clean machine.

The replies are those our own loop (`generation.generate_ids`) would give, made by vLLM's batched,
continuously batched engine instead:
  * prompts are the exact context ids our loop gets (the chat-templated contexts of the data
    records), passed as prompt_token_ids: nothing is re-tokenised, no BOS is added;
  * greedy (temperature 0), at most max_new_tokens tokens;
  * a reply ends on any id of `generation.eos_ids_of` (the tokenizer's EOS / end-of-turn and every
    eos_token_id of both models' generation configs), which stays in the reply, as in our loop.
The model folder is `overfill.vllm.export.engine_model(source, mode)`, run by `runtime.offline_engine`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from overfill.errors import OverfillError
from overfill.modeling import ModelSource


def engine_request(source: ModelSource, mode: str, contexts: list[list[int]], *, max_new_tokens: int,
                   stop_ids: set[int]) -> dict:
    """What the child process gets: the folder vLLM loads (exported on first use), prompts and limits."""
    from overfill.vllm.export import engine_model

    model = engine_model(source, mode)
    return {
        "model": model.as_json(),
        "prompts": [list(map(int, c)) for c in contexts],
        "max_new_tokens": max_new_tokens,
        "stop_token_ids": sorted(stop_ids),
        # Room for the longest prompt and its whole reply, no more: vLLM sizes its KV cache by it
        # (and would stop a reply early if prompt + reply reached it).
        "max_model_len": max(len(c) for c in contexts) + max_new_tokens,
    }


def vllm_replies(source: ModelSource, mode: str, contexts: list[list[int]], *, max_new_tokens: int,
                 stop_ids: set[int], what: str = "") -> tuple[list[list[int]], dict]:
    """Reply token ids in input order, and seconds: "generate" (vLLM's one generate call) and "engine_start"
    (the rest of the child's life: process, imports, engine build, exit).

    vLLM's own output goes to a log file, kept (and named in the error) only when the child fails.
    """
    from overfill.vllm.runtime import engine_env

    request = engine_request(source, mode, contexts, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="overfill-vllm-") as tmp:
        request_path, result_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_path.write_text(json.dumps(request))
        fd, log_path = tempfile.mkstemp(prefix="overfill-vllm-", suffix=".log")
        env = engine_env()
        # The child is the isolation already: vLLM's engine core (and its worker) run inside it rather
        # than as two more processes, each importing torch and vLLM again (18 s vs 45 s per engine here).
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        with os.fdopen(fd, "w") as log:
            done = subprocess.run([sys.executable, "-m", "overfill.evaluation.vllm_replies", str(request_path), str(result_path)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        if done.returncode != 0 or not result_path.is_file():
            last = [line for line in Path(log_path).read_text(errors="replace").splitlines() if line.strip()][-1:] or ["no output"]
            raise OverfillError(f"vLLM failed on {what or mode} (exit code {done.returncode}): {last[0].strip()[:300]}; "
                                f"its whole log is {log_path}")
        os.unlink(log_path)
        result = json.loads(result_path.read_text())
    wall = time.perf_counter() - started
    seconds = {"generate": round(result["generate_seconds"], 2), "engine_start": round(wall - result["generate_seconds"], 2)}
    return result["replies"], seconds


def main(argv: list[str] | None = None) -> None:
    """The child: build the engine, generate every reply in one batched call, write them, exit."""
    request_path, result_path = argv if argv is not None else sys.argv[1:]
    request = json.loads(Path(request_path).read_text())
    from vllm import SamplingParams

    from overfill.vllm.export import EngineModel
    from overfill.vllm.runtime import offline_engine

    model = EngineModel.from_json(request["model"])
    llm = offline_engine(model, max_model_len=request["max_model_len"])
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"],
                            stop_token_ids=request["stop_token_ids"], detokenize=False)
    t0 = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    replies = [list(o.outputs[0].token_ids) for o in outputs]  # the stop token included, as in our loop
    Path(result_path).write_text(json.dumps({"replies": replies, "generate_seconds": seconds}))


if __name__ == "__main__":  # a spawned engine process (VLLM_ENABLE_V1_MULTIPROCESSING=1) imports this module again
    main()
