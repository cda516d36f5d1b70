"""The decode model's one-token step as one compiled function over a preallocated KV cache (after gpt-fast).

Decoding is memory-bound: a step reads every weight of the decode model once, so its floor is the
weight bytes over the memory bandwidth. Run op by op (eager PyTorch), a small model never reaches
it: each of its ~20 operators per layer costs a fixed few microseconds on a CPU and a kernel launch
on a GPU, the same for the full model and for the pruned decoder, so the decoder's narrower
matrices save less than their bytes. This module removes that fixed cost, which is what lets the
OverFill decoder's speed follow its weight bytes (paper §2: the decoder sets the decode cost):

- `step_weights.StepWeights`: the decode model's weights laid out for one-token steps (fused, stacked,
  the only copy), whose `forward` is the whole step;
- the cache is `kv_cache.StaticCache`: one buffer of a fixed capacity that the step reads whole,
  with a boolean mask of the columns in use, so the step's shapes and addresses never change while
  a reply grows (what CUDA graphs need) and prompts of any length share a compiled step.
- `CompiledStep`: `torch.compile` of that forward: CUDA graphs on a GPU (`mode="reduce-overhead"`),
  inductor's C++ kernels on a CPU. Compiled once per decode model and shape (rows x capacity; rows
  and capacity turn symbolic after their second value), reused by every later call. The same forward
  reads several tokens per row in one pass (`CompiledStep.block`, causal within the block): speculative
  decoding's verification, where the full model reads the last token and k drafts at about the price
  of one step, as a memory-bound step reads the weights once however many tokens it carries.

- `EagerStep`: the model's own forward behind the same interface, and `step_function`, which picks one:
  a loop runs whichever it is given.

The prefill (the full model, compute-bound) stays the model's own forward, writing into the same
StaticCache; so do refresh and chat, which the cache serves as any DynamicCache.
"""

from __future__ import annotations

import time
import warnings
import weakref

import torch
from torch import nn

from overfill.errors import OverfillWarning
from overfill.kv_cache import GrowingCache, StaticCache
from overfill.step_weights import StepWeights, unsupported

# ---------------------------------------------------------------- when the weights changed


def _parameter_key(model: nn.Module) -> tuple:
    """Changes when any weight is replaced or modified in place (training, `.to()`, convert): then rebuild."""
    return tuple((p.data_ptr(), _version(p), p.dtype, p.device) for p in model.parameters())


def _version(tensor: torch.Tensor) -> int:
    # A tensor made under inference mode (a decoder copied or converted there, as the bench does) has no version
    # counter, and keeps none after its `.data` is replaced outside inference mode (StepWeights does that: the
    # parameter then no longer reads as an inference tensor, yet still has no counter). Its address, dtype and
    # device alone then say whether it changed.
    try:
        return tensor._version
    except RuntimeError:
        return -1


def _count_versions(model: nn.Module) -> None:
    """Give every weight and buffer made under inference mode (a decoder copied or converted there, as the bench
    does) a copy made outside it, in place in its module (a weight tied to two modules stays one). The compiled
    graph reads a version counter of each tensor it is handed, and such a tensor has none; nor does a parameter
    made there keep one once its `.data` is replaced outside inference mode, as StepWeights does."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or _version(tensor) >= 0:
                    continue
                if id(tensor) not in made:
                    fresh = tensor.detach().clone()
                    made[id(tensor)] = (nn.Parameter(fresh, requires_grad=tensor.requires_grad)
                                        if isinstance(tensor, nn.Parameter) else fresh)
                table[name] = made[id(tensor)]


# ---------------------------------------------------------------- compiled, with its caches


# What torch.compile lowers the step with. Tests of the loop around the step swap in "aot_eager" (the same
# captured graph, run by PyTorch's own kernels: seconds instead of a C++ build per shape).
BACKEND = "inductor"


def compile_options(device: torch.device) -> dict:
    """torch.compile's settings per device: CUDA graphs on a GPU (a step is one graph launch), inductor's C++
    kernels on a CPU; the whole step one graph (`fullgraph`), so nothing falls back to Python midway.

    On a GPU rows and cache capacity are symbolic from the first compile (batch 1 apart, which torch
    always specialises): a sweep of shapes then costs one CUDA graph capture per shape, not a compile.
    On a CPU they turn symbolic at their second value (the first shape keeps kernels fixed to it).
    """
    cuda = device.type == "cuda"
    mode = "reduce-overhead" if cuda and BACKEND == "inductor" else None
    return {"backend": BACKEND, "mode": mode, "fullgraph": True, "dynamic": True if cuda else None}


def _raise_recompile_limit(limit: int = 64) -> None:
    # Every (rows, capacity) shape and every model is one entry of the same code object: 8 (the default) is too few.
    import torch._dynamo.config as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(dynamo, name, limit) < limit:
            setattr(dynamo, name, limit)


class CompiledStep:
    """One decode model's compiled step on one device: its StepWeights, the compiled forward, what compiling took.

    `__call__(tokens, positions, cache, attention_mask)` decodes one token per row on a StaticCache
    and moves the cache on by one column; `compile_seconds` holds the first call's time of every
    new shape (rows, capacity): what compiling (or capturing a CUDA graph) cost.
    """

    compiled = True

    def __init__(self, model: nn.Module, device: torch.device):
        self.model_ref = weakref.ref(model)
        self.device = device
        self.weights: StepWeights | None = None
        self.key: tuple | None = None
        self.seen: set[tuple] = set()
        self.compile_seconds: dict[str, float] = {}
        _raise_recompile_limit()

    def refresh(self) -> "CompiledStep":
        """Rebuild the step's weights if the model's changed since (training, `.to()`): once per generation, not per step."""
        model = self.model_ref()
        if self.weights is None or _parameter_key(model) != self.key:
            # Built outside inference mode: the model's own weights become views of this layout, and must stay
            # ordinary tensors (a training step, `.to()` and `load_state_dict` refuse inference tensors).
            with torch.inference_mode(False), torch.no_grad():
                _count_versions(model)
                self.weights = StepWeights(model, self.device).eval()
            self.key = _parameter_key(model)  # after: the model's layers now view the new layout
            self.forward = torch.compile(self.weights, **compile_options(self.device))
        return self

    @staticmethod
    def new_cache(owner: nn.Module, rows: int, columns: int) -> StaticCache:
        """The cache this step runs on: static, `columns` wide, for `owner`'s KV (the prefill model's)."""
        return StaticCache.for_model(owner, rows, columns)

    @staticmethod
    def adopt(cache, columns: int) -> StaticCache:
        """A caller's cache (a conversation's earlier turns) as one this step runs on: copied into a static one."""
        return cache if isinstance(cache, StaticCache) else StaticCache.copy_of(cache, columns)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticCache,
                 attention_mask: torch.Tensor) -> torch.Tensor:
        """tokens, positions [B]; attention_mask [B, T] covers the cache plus this token -> logits [B, V] float32."""
        return self.block(tokens[:, None], positions[:, None], cache, attention_mask)[:, 0]

    @torch.inference_mode()
    def block(self, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticCache,
              attention_mask: torch.Tensor) -> torch.Tensor:
        """Q tokens per row in one pass: tokens, positions [B, Q]; attention_mask [B, T] covers the cache plus the Q
        tokens -> logits [B, Q, V] float32, each token seeing the cache and the block's tokens up to itself."""
        length, width = cache.get_seq_length(), tokens.shape[1]
        column = torch.full((1,), length, dtype=torch.long, device=tokens.device)  # where the new entries go: the cache's length
        mask = cache.mask_from(attention_mask)[:, None, :]  # [B, 1, C]
        if width > 1:  # causal within the block: token i sees the columns up to its own, length + i
            reach = length + torch.arange(width, device=mask.device)[:, None]  # [Q, 1]
            mask = mask & (torch.arange(mask.shape[-1], device=mask.device) <= reach)  # [B, Q, C]
        shape = (tokens.shape[0], width, cache.capacity)
        started = time.perf_counter() if shape not in self.seen else None
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        logits = self.forward(tokens, positions, column, mask, cache.key_buffers, cache.value_buffers)
        if self.device.type == "cuda":
            logits = logits.clone()  # a CUDA graph's output is overwritten by its next replay
        cache.advance(width)
        if started is not None:
            self.seen.add(shape)
            name = f"{shape[0]}x{shape[2]}" if width == 1 else f"{shape[0]}x{width}x{shape[2]}"
            seconds = time.perf_counter() - started
            self.compile_seconds[name] = round(seconds, 2)
            _COMPILING[0] += seconds
        return logits


_COMPILING = [0.0]  # seconds of every compiled step's first call per shape, this process


def seconds_compiling() -> float:
    """Seconds this process has spent so far in first calls of a compiled step's shapes (compiling, or capturing a
    CUDA graph): a loop reads it before and after a step to keep compiling out of its decode time."""
    return _COMPILING[0]


_STEPS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def compiled_step(model: nn.Module, device: torch.device) -> CompiledStep:
    """The decode model's CompiledStep on `device`, made once and kept as long as the model (its weights
    rebuilt when the model's have changed)."""
    per_device = _STEPS.setdefault(model, {})
    if device not in per_device:
        per_device[device] = CompiledStep(model, device)
    return per_device[device].refresh()


def compile_seconds(model: nn.Module) -> dict[str, float]:
    """What compiling the model's step took so far, per device and shape ('cpu 1x384': seconds)."""
    return {f"{device} {shape}": s for device, step in _STEPS.get(model, {}).items()
            for shape, s in step.compile_seconds.items()}


class EagerStep:
    """The decode model's own forward, op by op, behind CompiledStep's interface: a token per row (`__call__`) or
    Q of them (`block`) -> float32 logits, on a cache that grows as it goes. What a loop runs when it does not
    compile, so that it never asks which kind of step it has."""

    compiled = False

    def __init__(self, model: nn.Module):
        self.model = model

    @staticmethod
    def new_cache(owner: nn.Module, rows: int, columns: int) -> GrowingCache:
        return GrowingCache()

    @staticmethod
    def adopt(cache, columns: int):
        return cache

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.block(tokens[:, None], positions[:, None], cache, attention_mask)[:, 0]

    def block(self, tokens: torch.Tensor, positions: torch.Tensor, cache, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                         use_cache=True)
        return out.logits.float()


DecodeStep = CompiledStep | EagerStep


def step_function(decode_model, device: torch.device, compile: bool | None, capacity: int) -> DecodeStep:
    """The decode step a loop runs: compiled when compiling (None: on a GPU), else the model's own forward. A
    model the compiled step cannot run decodes eagerly, with a warning when compiling was asked for."""
    if not (compile if compile is not None else device.type == "cuda"):
        return EagerStep(decode_model)
    reason = unsupported(decode_model, capacity)
    if reason is not None:
        if compile:
            warnings.warn(f"decoding eagerly: the compiled step cannot run this model ({reason})", OverfillWarning,
                          stacklevel=4)
        return EagerStep(decode_model)
    return compiled_step(decode_model, device)
