"""`overfill serve`: an OverFill model (or its full / pruned halves) behind vLLM's own OpenAI-compatible server.

The folder vLLM loads is built (or reused) first, the address checked, then this process becomes
vLLM's server (`exec`): /v1/chat/completions and /v1/completions with streaming, /v1/models,
/health, vLLM's 4xx JSON errors for bad requests, and prompts longer than --max-model-len refused
(vLLM never cuts a prompt unless a request asks it to with truncate_prompt_tokens).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from overfill.atomic import check_writable
from overfill.errors import OverfillError, OverfillWarning
from overfill.model_source import ModelSource
from overfill.modeling import Mode, check_mode
from overfill.vllm.disaggregated import ROLE_MODE, ROLES, TRANSPORTS, default_kv_path, role_args, serve_disaggregated
from overfill.vllm.listen import check_address, exposed


@dataclass
class ServeConfig(ModelSource):
    mode: Mode = "overfill"
    """What to serve: overfill (full prefill, decoder decodes), full or pruned (either model alone, for comparison)."""
    host: str = "127.0.0.1"
    """Address to listen on (loopback by default; 0.0.0.0 exposes the server to the network)."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """Require this bearer key on every request (also read from VLLM_API_KEY)."""
    max_model_len: int | None = None
    """Context length in tokens, prompt plus reply (default: the model's); longer prompts are refused."""
    name: str | None = None
    """Model name clients ask for (default: the checkpoint's folder name and the mode, e.g. ckpt-overfill)."""
    export_only: bool = False
    """Write (or find) the folder vLLM loads, print its path and exit: for `vllm serve FOLDER` or `LLM(FOLDER)`."""
    vllm_args: tuple[str, ...] = ()
    """Further vLLM server flags, after `--` (e.g. -- --max-num-seqs 64)."""
    role: str | None = None
    """One instance of a disaggregated deployment: prefill (the full model, storing each prompt's KV) or decode (the decoder alone, loading it); join them with `overfill router`."""
    disaggregated: bool = False
    """On this machine: a prefill instance, a decode instance (cores split between them) and the router in front, on --host/--port."""
    kv_path: str | None = None
    """Folder the prompt's KV passes through between the two instances (default: /dev/shm/overfill-kv, shared memory)."""
    kv_transport: str = "files"
    """With --role: files (OverFill's connector through --kv-path; one machine or a shared file system) or nixl (vLLM's NIXL connector, across machines; pip install nixl)."""
    prefill_cores: int | None = None
    """With --disaggregated: how many of this machine's cores the prefill instance binds (default: half)."""
    logs: str | None = None
    """With --disaggregated: folder for the two instances' logs (default: a new temporary folder)."""

    def __post_init__(self):
        # Without --dtype, vLLM picks the dtype as it does for any model it serves (on a CPU with bfloat16 that
        # is bfloat16, for a float32 checkpoint too); taken before the source fills in our own engine's default.
        self.engine_dtype = self.dtype or "auto"
        super().__post_init__()
        check_mode(self.mode)
        if not 0 < self.port < 65536:
            raise OverfillError(f"--port must be between 1 and 65535, got {self.port}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise OverfillError(f"--max-model-len must be at least 2 (a prompt token and a reply token), got {self.max_model_len}")
        if not self.host.strip():
            raise OverfillError("--host is empty: pass an address to listen on, e.g. 127.0.0.1")
        if self.name is not None and not self.name.strip():
            raise OverfillError("--name is empty: pass the model name clients will ask for, or leave it out")
        if self.role is not None and self.role not in ROLES:
            raise OverfillError(f"--role {self.role}: pick {' or '.join(ROLES)}")
        if self.role and self.disaggregated:
            raise OverfillError("--role starts one instance, --disaggregated both and the router: pick one")
        if (self.role or self.disaggregated) and self.mode != "overfill":
            raise OverfillError("--role and --disaggregated pick each instance's model themselves: drop --mode")
        if self.kv_transport not in TRANSPORTS:
            raise OverfillError(f"--kv-transport {self.kv_transport}: pick {' or '.join(TRANSPORTS)}")
        if self.disaggregated and self.kv_transport != "files":
            raise OverfillError("--disaggregated runs both instances on this machine, through files: drop --kv-transport")
        if self.role or self.disaggregated:
            self.kv_path = self.kv_path or default_kv_path()
            check_writable(self.kv_path, "--kv-path")


def serve(config: ServeConfig, say=print) -> None:
    """Build the folder, then replace this process with vLLM's OpenAI server (returns only with export_only)."""
    from overfill.vllm.export import engine_model
    from overfill.vllm.runtime import engine_env, server_argv, vllm_version

    if config.disaggregated:
        return serve_disaggregated(config, say)
    mode = ROLE_MODE[config.role] if config.role else config.mode
    if config.export_only:
        print(engine_model(config, mode, name=config.name, dtype=config.engine_dtype).path)
        return
    version = vllm_version()
    check_address(config.host, config.port)
    api_key = config.api_key or os.environ.get("VLLM_API_KEY")
    if exposed(config.host) and not api_key:
        warnings.warn(f"listening on {config.host} without --api-key: anyone who can reach this machine can use the model",
                      OverfillWarning, stacklevel=2)
    model = engine_model(config, mode, name=config.name, dtype=config.engine_dtype)
    env = engine_env()
    if api_key:
        env["VLLM_API_KEY"] = api_key  # not on the command line, where `ps` would show it
    roles = role_args(config.role, config.kv_path, config.kv_transport) if config.role else []
    argv = server_argv(model, host=config.host, port=config.port, max_model_len=config.max_model_len,
                       extra=(*roles, *config.vllm_args))
    dtype = "vLLM's default dtype" if model.dtype == "auto" else model.dtype
    say(f"serving {model.name} ({model.mode}, {dtype}) from {model.path} with {version}")
    say(f"  http://{config.host}:{config.port}/v1  (model name '{model.name}'; /health answers when it is ready)")
    os.execve(argv[0], argv, env)
