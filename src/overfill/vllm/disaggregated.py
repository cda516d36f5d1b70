"""Prefill and decode on separate vLLM instances: their settings, `overfill serve --disaggregated`, `overfill router`.

  * a prefill instance serves the plain full model with OverFill's connector as kv_producer
    (`overfill serve --role prefill`): vLLM's defaults otherwise, prefix caching included, since
    every block it caches holds full-model prompt KV;
  * a decode instance serves the plain decoder as kv_consumer (`overfill serve --role decode`), with
    prefix caching off: its blocks past a prompt hold the decoder's KV, which a later prompt
    repeating them must not be served (the problem prefix_cache.py solves inside one engine);
  * the router (router.py) joins them behind one OpenAI endpoint.
`overfill serve --disaggregated` starts one of each on this machine, its cores split between the two
instances, and the router in this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from overfill.config import Settings, as_tuple
from overfill.errors import OverfillError, OverfillWarning
from overfill.processes import start, stop_all
from overfill.vllm.listen import check_address, exposed, free_port, wait_healthy

ROLES = ("prefill", "decode")
ROLE_MODE = {"prefill": "full", "decode": "pruned"}  # which model each instance serves


def default_kv_path() -> str:
    """Where the prompt's KV waits between the two instances on one machine: shared memory where there is one."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return str(base / f"overfill-kv-{os.getuid()}")  # this user's (the connector creates it 0700): prompts are private


TRANSPORTS = ("files", "nixl")


def role_args(role: str, kv_path: str, transport: str = "files") -> list[str]:
    """vLLM server flags of a prefill or decode instance: OverFill's file connector (one machine, or a shared file
    system), or vLLM's NIXL connector with OverFill's decode-side count (nixl_connector.py; across machines)."""
    kv_role = "kv_producer" if role == "prefill" else "kv_consumer"
    if transport == "nixl":
        config = {"kv_connector": "OverFillNixlConnector", "kv_connector_module_path": "overfill.vllm.plugin.nixl_connector",
                  "kv_role": kv_role, "kv_connector_extra_config": {"enforce_handshake_compat": False}}
    else:
        config = {"kv_connector": "OverFillConnector", "kv_connector_module_path": "overfill.vllm.plugin.kv_connector",
                  "kv_role": kv_role, "kv_connector_extra_config": {"path": kv_path}}
    args = ["--kv-transfer-config", json.dumps(config)]
    if role == "decode":
        args.append("--no-enable-prefix-caching")
    return args


def split_cores(cores: list[int], prefill: int | None) -> tuple[list[int], list[int]]:
    """The cores of the prefill instance and of the decode instance (half each by default, at least one each)."""
    if len(cores) < 2:
        raise OverfillError(f"--disaggregated runs two engines, one core each at least; this process may use {len(cores)}")
    count = len(cores) // 2 if prefill is None else prefill
    if not 1 <= count < len(cores):
        raise OverfillError(f"--prefill-cores must leave the decode instance a core: 1 to {len(cores) - 1}, got {count}")
    return cores[:count], cores[count:]


def serve_disaggregated(config, say) -> None:
    """A prefill instance and a decode instance on this machine, then the router on config.host:config.port."""
    from overfill.vllm.export import engine_model
    from overfill.vllm.runtime import engine_env, on_cpu, server_argv, vllm_version

    vllm_version()
    check_address(config.host, config.port)  # the router's address, before minutes of starting engines
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    split = split_cores(cores, config.prefill_cores) if on_cpu() else (cores, cores)
    # One GPU, two engines: each takes part of its memory unless the user's vLLM flags say otherwise.
    shared_gpu = () if on_cpu() or "--gpu-memory-utilization" in config.vllm_args else ("--gpu-memory-utilization", "0.45")
    logs = Path(config.logs or tempfile.mkdtemp(prefix="overfill-serve-"))
    logs.mkdir(parents=True, exist_ok=True)
    Path(config.kv_path).mkdir(parents=True, exist_ok=True)
    procs, urls = [], {}
    try:
        for role, bound in zip(ROLES, split):
            model = engine_model(config, ROLE_MODE[role], name=f"{config.name or 'overfill'}-{role}", dtype=config.engine_dtype)
            port = free_port()
            # Loopback only, so no key of their own: the router in front checks the clients' key.
            env = engine_env({**{k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"},
                              "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, bound))})
            argv = server_argv(model, host="127.0.0.1", port=port, max_model_len=config.max_model_len,
                               extra=(*role_args(role, config.kv_path), *shared_gpu, *config.vllm_args))
            log = logs / f"{role}.log"
            say(f"starting the {role} instance ({model.mode} model, cores {','.join(map(str, bound))}) on port {port}; log {log}")
            procs.append((start(argv, log, env, die_with_parent=True), log))
            urls[role] = f"http://127.0.0.1:{port}"
        for (proc, log), role in zip(procs, ROLES):
            wait_healthy(urls[role], proc, log, f"the {role} instance")
        run_router(RouterConfig(prefill=(urls["prefill"],), decode=(urls["decode"],), host=config.host, port=config.port,
                                name=config.name or f"{_base_name(config)}-overfill", api_key=config.api_key), say)
    finally:
        stop_all([proc for proc, _ in procs])
        for store in Path(config.kv_path).glob("*.safetensors*"):  # prompts nobody will load now
            store.unlink(missing_ok=True)


def _base_name(config) -> str:
    return Path(config.checkpoint or config.decoder or config.model or "overfill").name


@dataclass
class RouterConfig(Settings):
    """`overfill router`: one OpenAI endpoint in front of prefill and decode instances."""

    prefill: tuple[str, ...] = ()
    """Prefill instances (the full model, `overfill serve --role prefill`): their URLs, e.g. http://10.0.0.5:8001."""
    decode: tuple[str, ...] = ()
    """Decode instances (the decoder, `overfill serve --role decode`): their URLs."""
    host: str = "127.0.0.1"
    """Address to listen on (loopback by default; 0.0.0.0 exposes the router to the network)."""
    port: int = 8000
    """TCP port."""
    name: str = "overfill"
    """Model name clients ask for."""
    policy: str = "round-robin"
    """How the next instance of a kind is picked: round-robin or least-loaded (fewest requests in flight)."""
    transport: str = "files"
    """How the instances move the prompt's KV, as they were started: files (OverFill's connector) or nixl."""
    api_key: str | None = None
    """Require this bearer key of every client (also read from VLLM_API_KEY)."""
    instance_api_key: str | None = None
    """The bearer key the instances require, if they were started with one (also read from OVERFILL_INSTANCE_API_KEY)."""

    def __post_init__(self):
        super().__post_init__()
        self.prefill, self.decode = as_tuple(self.prefill), as_tuple(self.decode)
        for kind in ("prefill", "decode"):
            urls = getattr(self, kind)
            if not urls:
                raise OverfillError(f"--{kind} got nothing: give the URL of at least one {kind} instance, e.g. http://127.0.0.1:8001")
            for url in urls:
                if not url.startswith(("http://", "https://")):
                    raise OverfillError(f"--{kind} {url} is not a URL: write it as http://HOST:PORT")
        if not 0 < self.port < 65536:
            raise OverfillError(f"--port must be between 1 and 65535, got {self.port}")
        from overfill.vllm.router import POLICIES

        if self.policy not in POLICIES:
            raise OverfillError(f"--policy {self.policy}: pick {' or '.join(POLICIES)}")
        if self.transport not in TRANSPORTS:
            raise OverfillError(f"--transport {self.transport}: pick {' or '.join(TRANSPORTS)}")


def run_router(config: RouterConfig, say=print) -> None:
    """Check the instances' KV layouts, then serve until stopped."""
    import uvicorn

    from overfill.vllm.router import Router, make_app

    check_address(config.host, config.port)
    api_key = config.api_key or os.environ.get("VLLM_API_KEY")
    if not api_key and exposed(config.host):
        warnings.warn(f"listening on {config.host} without --api-key: anyone who can reach this machine can use the model",
                      OverfillWarning, stacklevel=2)
    router = Router(list(config.prefill), list(config.decode), name=config.name, policy=config.policy,
                    transport_kind=config.transport,
                    instance_api_key=config.instance_api_key or os.environ.get("OVERFILL_INSTANCE_API_KEY"))
    layout = asyncio.run(_checked(router))
    shared = (f"share one KV layout ({', '.join(f'{k} {v}' for k, v in layout.items())})" if layout
              else "answer (NIXL checks their KV layouts at its handshake)")
    say(f"router: {len(config.prefill)} prefill and {len(config.decode)} decode instances {shared}")
    say(f"  http://{config.host}:{config.port}/v1  (model name '{config.name}')")
    uvicorn.run(make_app(router, api_key=api_key), host=config.host, port=config.port, log_level="warning")


async def _checked(router) -> dict:
    try:
        return await router.check()
    finally:
        await router.close()  # the serving loop makes its own connections
