"""OverFill across two vLLM instances: the prompt's KV moves from the full model's instance to the decoder's.

Figure 1 of the paper, split where serving systems already split a request:
  * the prefill instance serves the plain full model (`kv_role: kv_producer`); it reads the prompt of
    L tokens, samples token 1 from the full model's head, and stores the KV of exactly those L
    positions, every layer, once the prompt is complete (whatever chunks it took, whatever came
    from its prefix cache);
  * the decode instance serves the plain pruned decoder (`kv_role: kv_consumer`); it is given
    prompt + token 1, loads exactly the L stored positions into its own paged cache, computes token
    1's KV with the decoder and decodes on. Neither instance needs our model plugin, and the decode
    instance holds no full-model weight.

The router (router.py) carries the store's key from one to the other in vLLM's `kv_transfer_params`:
the router asks the prefill instance to store ({"overfill_store": true}), which returns {"overfill_kv":
key, "tokens": L} with its one token, and the decode request passes it back. A request that does not
ask stores nothing, so the prefill instance serves plain clients as well. The transport is a folder of safetensors files, one per request, written
atomically and removed once loaded: on one machine put it in shared memory (/dev/shm). A layer is
stored as the whole cache blocks that hold the prompt (`blocks`), so both instances must share the
KV layout (layers, KV heads, head_dim, dtype, block size; and the attention backend, which a
machine's kind and that dtype decide), which `kv_layout` reports and the router checks before serving.

Loaded by vLLM from `--kv-transfer-config '{"kv_connector": "OverFillConnector", "kv_connector_module_path":
"overfill.vllm.plugin.kv_connector", "kv_role": ..., "kv_connector_extra_config": {"path": FOLDER}}'`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger
from vllm.v1.request import RequestStatus

from overfill.vllm import KEY, LAYOUT, LOADED, MOVED_LOG, STORE

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# Under vLLM's logger, whose handler prints INFO in every vLLM process (a logger outside it prints warnings only).
logger = init_logger(f"vllm.{__name__}")

MOVED_EVERY = 16


def prompt_digest(token_ids) -> str:
    """Names the exact prompt a store holds, so that a decode request can only load its own prompt's KV."""
    return hashlib.sha256(torch.tensor(list(token_ids), dtype=torch.int64).numpy().tobytes()).hexdigest()


def blocks(block_ids: list[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """The cache blocks that hold positions start..end-1 of a request holding `block_ids` (start: a block boundary).

    Whole blocks move, not token slots: a block's bytes are laid out as the attention backend packs
    them (on a CPU, each head's keys then values, in an ISA-specific order), so only a whole block
    means the same thing in both instances. A last block's slots past the prompt hold nothing the
    decode instance reads: it writes token 1's KV into its slot L, and attention reads no further.
    """
    return torch.tensor(block_ids[start // block_size:-(-end // block_size)], dtype=torch.int64)


@dataclass
class Transfer:
    """One request's move this step: store (prefill instance) or load (decode instance) the blocks of its prompt."""

    req_id: str
    key: str
    blocks: torch.Tensor
    store: bool
    tokens: int = 0
    digest: str = ""


@dataclass
class OverFillConnectorMetadata(KVConnectorMetadata):
    transfers: list[Transfer] = field(default_factory=list)


class OverFillConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        self.producer = transfer.kv_role == "kv_producer"
        if transfer.kv_role not in ("kv_producer", "kv_consumer"):
            raise ValueError(f"OverFillConnector moves KV one way: kv_role kv_producer (prefill instance) or "
                             f"kv_consumer (decode instance), not {transfer.kv_role}")
        if vllm_config.parallel_config.world_size > 1:  # each rank holds a shard of heads or layers: one file each, not built
            raise ValueError("OverFillConnector moves one rank's cache: serve each instance without tensor or pipeline "
                             "parallelism, or use --kv-transport nixl")
        self.folder = Path(transfer.get_from_extra_config("path", os.path.join(tempfile.gettempdir(), "overfill-kv")))
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Stores nobody loaded (a client gone, a decode instance down) are removed after keep_s, and the oldest
        # beyond keep_mb at once: in shared memory they are RAM.
        self.keep_s = float(transfer.get_from_extra_config("keep_s", 600))
        self.keep_bytes = int(float(transfer.get_from_extra_config("keep_mb", 1024)) * 2**20)
        self._swept = 0.0
        self.block_size = vllm_config.cache_config.block_size
        self.layout = kv_layout(vllm_config)
        # Scheduler side: the requests seen, those stored, those to load when their blocks are scheduled.
        self._requests: dict[str, Request] = {}
        self._stored: dict[str, tuple[str, int]] = {}
        self._to_load: dict[str, tuple[str, int, int]] = {}
        self._loaded: dict[str, int] = {}  # decode side: positions loaded per request, reported when it finishes
        # Worker side: this step's stores, gathered layer by layer and written once the step is done; what has moved.
        self._gathered: dict[str, dict[str, torch.Tensor]] = {}
        self._load_errors: set[int] = set()
        self.moved = {"requests": 0, "bytes": 0, "seconds": 0.0}

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return True  # a full CUDA graph would replay a step without calling save_kv_layer, and store nothing

    # ---- scheduler side ----

    def on_new_request(self, request: Request) -> None:
        if self.producer:
            self._requests[request.request_id] = request

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        """Decode instance: the stored prompt positions this request loads (prompt + token 1 in, L positions loaded).

        Anything wrong with the request's key or its file costs that request its load (the decoder then reads the
        prompt itself, and the instance logs it), never the engine: a client can send any kv_transfer_params."""
        params = request.kv_transfer_params or {}
        if self.producer or KEY not in params:
            return 0, False
        prompt = list(request.prompt_token_ids or [])[:-1]  # the last prompt token is token 1: the decoder computes its KV
        try:
            with safe_open(self._path(params[KEY]), "pt") as stored:
                digest = (stored.metadata() or {}).get("prompt")
        except Exception as error:  # no such key or file, a bad key, half a file from elsewhere
            logger.warning("OverFill: no stored KV for key %r (%s); the decoder reads the prompt itself", params[KEY],
                           type(error).__name__)
            return 0, False
        if digest != prompt_digest(prompt):
            logger.warning("OverFill: the KV stored under %s is another prompt's; the decoder recomputes the prompt", params[KEY])
            return 0, False
        count = len(prompt) - num_computed_tokens
        if count <= 0:
            return 0, False
        self._to_load[request.request_id] = (params[KEY], num_computed_tokens, len(prompt))
        return count, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            self._to_load.pop(request.request_id, None)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = OverFillConnectorMetadata()
        manager = self._kv_cache_manager
        if self.producer:
            for req_id, count in scheduler_output.num_scheduled_tokens.items():
                request = self._requests.get(req_id)
                length = request.num_prompt_tokens if request else 0
                # Stored in the step that completes the prompt: every earlier position is in the cache by then.
                if (request is None or STORE not in (request.kv_transfer_params or {}) or req_id in self._stored
                        or request.num_computed_tokens + count < length):
                    continue
                key = f"{prompt_digest(request.prompt_token_ids)[:16]}-{hashlib.sha256(req_id.encode()).hexdigest()[:16]}"
                meta.transfers.append(Transfer(req_id, key, blocks(manager.get_block_ids(req_id)[0], self.block_size, 0, length),
                                               store=True, tokens=length, digest=prompt_digest(request.prompt_token_ids)))
                self._stored[req_id] = (key, length)
        for req_id, (key, start, end) in list(self._to_load.items()):
            if req_id in scheduler_output.num_scheduled_tokens:
                meta.transfers.append(Transfer(req_id, key, blocks(manager.get_block_ids(req_id)[0], self.block_size, start, end),
                                               store=False, tokens=end - start))
                self._loaded[req_id] = end - start
                del self._to_load[req_id]
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        self._to_load.pop(request.request_id, None)
        params = {}
        stored = self._stored.pop(request.request_id, None)
        if stored and request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_ABORTED):
            self._remove(stored[0])  # token 1 ended the reply (EOS, a stop string) or the client left: no decode follows
        elif stored:
            params.update({KEY: stored[0], "tokens": stored[1]})
        if stored:
            self._sweep(by_age=self._sweep_due())
        loaded = self._loaded.pop(request.request_id, None)
        if loaded is not None:
            params[LOADED] = loaded
            # Removed once the request is done, not once loaded: a request preempted after its load loads it again.
            self._remove((request.kv_transfer_params or {}).get(KEY, ""))
        if LAYOUT in (request.kv_transfer_params or {}):
            params[LAYOUT] = self.layout
        return False, params or None

    def _remove(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except (ValueError, OSError):
            pass

    def _sweep_due(self) -> bool:
        return time.time() - self._swept >= 60

    def _sweep(self, by_age: bool) -> None:
        """Removes the oldest stores beyond keep_mb, and (every minute) those older than keep_s."""
        now = time.time()
        if by_age:
            self._swept = now
        stores = []
        for entry in os.scandir(self.folder):
            try:
                info = entry.stat()
            except FileNotFoundError:  # loaded (and removed) meanwhile
                continue
            stores.append((info.st_mtime, info.st_size, entry.path))
        total = sum(size for _, size, _ in stores)
        for mtime, size, path in sorted(stores):
            if total <= self.keep_bytes and not (by_age and now - mtime > self.keep_s):
                continue
            Path(path).unlink(missing_ok=True)
            total -= size

    # ---- worker side ----

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        for transfer in (t for t in meta.transfers if not t.store):
            started = time.perf_counter()
            try:
                stored = load_file(self._path(transfer.key))
                caches = {name: layer.kv_cache for name, layer in forward_context.no_compile_layers.items()
                          if getattr(layer, "kv_cache", None) is not None}
                if missing := sorted(set(caches) - set(stored)):
                    raise KeyError(f"no layer {missing[0]}: the two instances serve models with different layers")
                for name, cache in caches.items():  # the stored blocks from block start // size on
                    cache[transfer.blocks] = stored[name][-len(transfer.blocks):].to(cache.device, cache.dtype)
            except Exception as error:  # gone meanwhile, garbled, another model's: vLLM's kv_load_failure_policy decides
                logger.warning("OverFill: loading the KV stored under %s failed (%s: %s)", transfer.key,
                               type(error).__name__, error)
                self._load_errors.update(transfer.blocks.tolist())
                continue
            self._count(sum(t.numel() * t.element_size() for t in stored.values()), started)
            self.moved["seconds"] += time.perf_counter() - started

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous: done in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        for transfer in (t for t in meta.transfers if t.store):
            taken = kv_layer[transfer.blocks]  # [blocks, heads, block_size, content]: vLLM's per-layer view; a copy
            self._gathered.setdefault(transfer.req_id, {})[layer_name] = taken.to("cpu")

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        for transfer in (t for t in meta.transfers if t.store):
            started = time.perf_counter()
            layers = self._gathered.pop(transfer.req_id, {})
            if not layers:
                continue
            self._count(sum(t.numel() * t.element_size() for t in layers.values()), started)
            path = self._path(transfer.key)
            partial = path.with_name(path.name + ".partial")
            save_file(layers, str(partial), metadata={"prompt": transfer.digest, "tokens": str(transfer.tokens)})
            os.replace(partial, path)  # whole or absent: a decode instance never reads half a store
            self.moved["seconds"] += time.perf_counter() - started

    def _count(self, size: int, started: float) -> None:
        """Counts a request's move; every 16th is logged with the running totals (the bench reads the last line)."""
        moved = self.moved
        moved["requests"] += 1
        moved["bytes"] += size
        if moved["requests"] % MOVED_EVERY == 0:
            logger.info(MOVED_LOG, "stored" if self.producer else "loaded", moved["requests"], moved["bytes"],
                        moved["seconds"] + time.perf_counter() - started)

    def _path(self, key: str) -> Path:
        if not key or any(c not in "0123456789abcdef-" for c in key):
            raise ValueError(f"OverFill: not a store key: {key!r}")
        return self.folder / f"{key}.safetensors"


def kv_layout(vllm_config: VllmConfig) -> dict:
    """What must match for one instance's stored KV to be another's: layers, KV heads, head_dim, dtype, block size."""
    model, cache = vllm_config.model_config, vllm_config.cache_config
    dtype = model.dtype if cache.cache_dtype == "auto" else cache.cache_dtype
    return {"layers": model.get_num_layers(vllm_config.parallel_config),
            "kv_heads": model.get_num_kv_heads(vllm_config.parallel_config), "head_dim": model.get_head_size(),
            "dtype": str(dtype).removeprefix("torch."), "block_size": cache.block_size}
