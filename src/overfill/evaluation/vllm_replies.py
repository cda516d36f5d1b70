"""Greedy replies from vLLM for `overfill eval --engine vllm`: one engine per entry, each in a process of its own.

Each entry's engine is an `overfill.vllm.worker.EngineWorker` (a child process that exits once its
replies are made: the next engine starts on a clean machine).

The replies are those our own loop (`generation.generate_ids`) would give, made by vLLM's batched,
continuously batched engine instead:
  * prompts are the exact context ids our loop gets (the chat-templated contexts of the data
    records), passed as prompt_token_ids: nothing is re-tokenised, no BOS is added;
  * greedy (temperature 0), at most max_new_tokens tokens;
  * a reply ends on any id of `generation.eos_ids_of` (the tokenizer's EOS / end-of-turn and every
    eos_token_id of both models' generation configs), which stays in the reply, as in our loop.
The model folder is `overfill.vllm.export.engine_model(source, mode)`.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from overfill.model_source import ModelSource


def engine_request(source: ModelSource, mode: str, contexts: list[list[int]], *, max_new_tokens: int,
                   stop_ids: set[int]) -> dict:
    """What the engine gets: the folder vLLM loads (exported on first use), its settings, prompts and sampling."""
    from overfill.vllm.export import engine_model

    return {
        "model": engine_model(source, mode),
        # Room for the longest prompt and its whole reply, no more: vLLM sizes its KV cache by it
        # (and would stop a reply early if prompt + reply reached it).
        "engine": {"max_model_len": max(len(c) for c in contexts) + max_new_tokens},
        "prompts": [list(map(int, c)) for c in contexts],
        "params": greedy_params(max_new_tokens, stop_ids),
    }


def greedy_params(max_new_tokens: int, stop_ids: set[int]) -> dict:
    """vLLM's sampling fields for our loop's greedy replies: at most max_new_tokens, ending on (and keeping) a stop id."""
    return {"temperature": 0.0, "max_tokens": max_new_tokens, "stop_token_ids": sorted(stop_ids), "detokenize": False}


def vllm_replies(source: ModelSource, mode: str, contexts: list[list[int]], *, max_new_tokens: int,
                 stop_ids: set[int], what: str = "") -> tuple[list[list[int]], dict]:
    """Reply token ids in input order (the stop token included, as in our loop), and seconds: "generate"
    (vLLM's one generate call) and "engine_start" (the rest of the child's life: process, imports, engine, exit).

    vLLM's own output goes to a log file, kept (and named in the error) only when the child fails.
    """
    from overfill.vllm.worker import EngineWorker

    request = engine_request(source, mode, contexts, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
    fd, log = tempfile.mkstemp(prefix="overfill-vllm-", suffix=".log")
    os.close(fd)
    started = time.perf_counter()
    with EngineWorker(request["model"], Path(log), engine=request["engine"], what=f"vLLM on {what or mode}") as worker:
        replies, generate_s = worker.generate(request["prompts"], **request["params"])
    wall = time.perf_counter() - started
    os.unlink(log)
    return replies, {"generate": round(generate_s, 2), "engine_start": round(wall - generate_s, 2)}
