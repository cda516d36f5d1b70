"""The decode model's one-token step as one compiled function over a preallocated KV cache (after gpt-fast).

Decoding is memory-bound: a step reads every weight of the decode model once, so its floor is the
weight bytes over the memory bandwidth. Run op by op (eager PyTorch), a small model never reaches
it: each of its ~20 operators per layer costs a fixed few microseconds on a CPU and a kernel launch
on a GPU, the same for the full model and for the pruned decoder, so the decoder's narrower
matrices save less than their bytes. This module removes that fixed cost, which is what lets the
OverFill decoder's speed follow its weight bytes (paper §2: the decoder sets the decode cost):

- `StepWeights`: the decode model's weights laid out for one-token steps, built once from the HF
  model: q/k/v fused into one matrix, gate/up into another, every layer's matrices stacked; on a
  CPU stored [in, out] (a row vector times a matrix read row by row ran ~1.6x faster than HF's
  [out, in] layout here, at the decoder's 315-wide shapes too), on a GPU in HF's layout (cuBLAS
  reads either). Its `forward` is the whole step: embedding, every layer (RMSNorm, fused q/k/v,
  rotary, the new column written into the cache, attention over the cache, o-projection, RMSNorm,
  fused gate/up, SiLU, down), final norm, LM head.
- the cache is `kv_cache.StaticCache`: one buffer of a fixed capacity that the step reads whole,
  with a boolean mask of the columns in use, so the step's shapes and addresses never change while
  a reply grows (what CUDA graphs need) and prompts of any length share a compiled step.
- `CompiledStep`: `torch.compile` of that forward: CUDA graphs on a GPU (`mode="reduce-overhead"`),
  inductor's C++ kernels on a CPU. Compiled once per decode model and shape (rows x capacity; rows
  and capacity turn symbolic after their second value), reused by every later call. The same forward
  reads several tokens per row in one pass (`CompiledStep.block`, causal within the block): speculative
  decoding's verification, where the full model reads the last token and k drafts at about the price
  of one step, as a memory-bound step reads the weights once however many tokens it carries.

The prefill (the full model, compute-bound) stays the model's own forward, writing into the same
StaticCache; so do refresh and chat, which the cache serves as any DynamicCache. Llama, Qwen2 (q/k/v
biases), Qwen3 (per-head q/k norms) and Mistral share this step; a sliding window shorter than the
cache, or an unsupported layout, decodes eagerly instead (`unsupported` says why).
Shapes: B rows, C cache capacity, L layers, H query heads, KV key/value heads, G = H / KV, D head_dim.
"""

from __future__ import annotations

import time
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from overfill import arch
from overfill.errors import OverfillWarning
from overfill.kv_cache import GrowingCache, StaticCache
from overfill.tensors import hand_back_pages

# ---------------------------------------------------------------- the weights, laid out for one token


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


class Projection(nn.Module):
    """One kind of linear layer in every decoder layer (e.g. the fused q/k/v projection).

    Plain float layers are concatenated along their outputs and stacked over layers: weight
    [L, in, out] (`transposed`, CPU) or [L, out, in], bias [L, out] or none. Any other linear (int8,
    precision.Int8Linear) is kept as its modules, called one by one.
    """

    def __init__(self, parts: list[list[nn.Module]], transposed: bool):
        super().__init__()
        self.transposed = transposed
        dense = all(type(m) is nn.Linear and not hasattr(m.weight, "qdata") for layer in parts for m in layer)
        self.dense = dense and len({m.weight.dtype for layer in parts for m in layer}) == 1
        if self.dense:
            self.weight, self.bias = _fuse(parts, transposed)
        else:
            self.layers = nn.ModuleList(nn.ModuleList(layer) for layer in parts)
            for module in self.layers.modules():
                if hasattr(module, "prepare"):  # precision.Int8Linear: its kernel settings, before tracing
                    module.prepare()

    def forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """x [B, in] -> [B, out] through layer i's projection(s)."""
        if not self.dense:
            return torch.cat([m(x) for m in self.layers[i]], dim=-1)
        weight = self.weight[i]
        if self.transposed:
            y = x @ weight if self.bias is None else torch.addmm(self.bias[i], x, weight)
        else:
            y = F.linear(x, weight, None if self.bias is None else self.bias[i])
        return y


COPY_BYTES = 32 * 2**20  # what the layout copies at a time from a weight mapped from its file (see `_fuse`)


@torch.no_grad()
def _fuse(parts: list[list[nn.Linear]], transposed: bool) -> tuple[nn.Parameter, nn.Parameter | None]:
    """The layers' linears concatenated along their outputs and stacked: weight [L, in, out] (`transposed`) or
    [L, out, in], bias [L, out] or None; the model's own linears then read their slices of it.

    Every weight is held once: the stack is allocated empty and filled a matrix at a time, each linear's
    weight rebound (`.data`, so an optimizer keeps its parameter objects) as soon as it is copied, which
    frees the original or, for a weight mapped from its file, hands its pages back as it goes (COPY_BYTES at a
    time). Building the layout then costs a few megabytes, not a second copy of the model. On a CPU a linear's weight becomes a
    transposed view ([out, in] over [in, out] storage), which `F.linear` reads as it is.
    """
    first = parts[0]
    reference, inputs = first[0].weight, first[0].in_features
    width = sum(m.out_features for m in first)
    shape = (len(parts), inputs, width) if transposed else (len(parts), width, inputs)
    weight = torch.empty(shape, dtype=reference.dtype, device=reference.device)
    biased = any(m.bias is not None for layer in parts for m in layer)
    bias = torch.zeros(len(parts), width, dtype=reference.dtype, device=reference.device) if biased else None
    for i, layer in enumerate(parts):
        start = 0
        for module in layer:
            end = start + module.out_features
            held = weight[i, :, start:end].t() if transposed else weight[i, start:end]  # [out, in], as the linear's
            original = module.weight.data
            rows = max(1, COPY_BYTES // (original.shape[1] * original.element_size()))
            for first in range(0, original.shape[0], rows):  # a slice at a time: at most one slice is held twice
                held[first : first + rows] = original[first : first + rows]
                hand_back_pages(original[first : first + rows])
            module.weight.data = held
            if module.bias is not None:
                original = module.bias.data
                bias[i, start:end] = original
                module.bias.data = bias[i, start:end]
            start = end
    return _frozen(weight), (_frozen(bias) if biased else None)


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    # A parameter, not a buffer: torch.compile keeps parameter shapes static (a buffer's may turn symbolic
    # once a second model's step compiles), and CUDA graphs read parameters in place.
    return nn.Parameter(tensor, requires_grad=False)


# StepWeights' own tensors (the rest, embedding and final norm, are the model's modules)
STEP_LAYOUT = ("qkv", "o", "gate_up", "down", "head", "norms", "qk_norms")


def _own_the_rest(model: nn.Module, step: nn.Module) -> None:
    """Give the model's weights the step did not take (the final norm, an untied embedding) storage of their own.
    A model loaded from safetensors holds its weights in a mapping of the file, which lives while any of its
    tensors does: one small weight left in it would keep every replaced weight's pages resident."""
    own = [p for name, p in step.named_parameters() if name.split(".")[0] in STEP_LAYOUT and type(p.data) is torch.Tensor]
    taken = {p.untyped_storage().data_ptr() for p in own}  # the fused and stacked tensors the step made
    for parameter in model.parameters():
        if type(parameter.data) is torch.Tensor and parameter.untyped_storage().data_ptr() not in taken:
            parameter.data = parameter.data.clone()


def _stacked(norms: list[list[nn.Module]]) -> nn.Parameter:
    """Norm weights stacked [L, n, width], the modules' own weights then views into the stack (held once)."""
    stack = _frozen(torch.stack([torch.stack([m.weight for m in layer]) for layer in norms]))
    for i, layer in enumerate(norms):
        for j, module in enumerate(layer):
            module.weight.data = stack[i, j]
    return stack


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm (Llama, Qwen2/3, Mistral): normalised in float32, scaled in the input's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as HF applies it: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class StepWeights(nn.Module):
    """A decode model's weights in step layout; `forward` is the step over Q tokens per row (see the module docstring).

    The fused (and, on a CPU, transposed) matrices become the only copy of those weights: the model's
    linear layers read views into them (`_fuse`), so the step costs no weight memory
    of its own. Embedding, norms and rotary tables are the model's own.
    """

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        config = model.config
        body = model.model
        layers = body.layers
        self.transposed = device.type == "cpu"
        self.heads, self.kv_heads = config.num_attention_heads, arch.kv_heads_of(config)
        self.head_dim = arch.head_dim_of(config)
        self.scaling = float(getattr(layers[0].self_attn, "scaling", self.head_dim**-0.5))
        self.eps = float(layers[0].input_layernorm.variance_epsilon)
        self.embed = body.embed_tokens
        self.rotary = body.rotary_emb
        self.act = layers[0].mlp.act_fn
        attention = [layer.self_attn for layer in layers]
        mlp = [layer.mlp for layer in layers]
        self.qkv = Projection([[a.q_proj, a.k_proj, a.v_proj] for a in attention], self.transposed)
        self.o = Projection([[a.o_proj] for a in attention], self.transposed)
        self.gate_up = Projection([[m.gate_proj, m.up_proj] for m in mlp], self.transposed)
        self.down = Projection([[m.down_proj] for m in mlp], self.transposed)
        with torch.no_grad():
            norms = [[layer.input_layernorm, layer.post_attention_layernorm] for layer in layers]
            self.norms = _stacked(norms)  # [L, 2, hidden]
            # Biases need no flag: each Projection fuses its linears' own (Qwen2's q/k/v, Llama's attention_bias).
            qk_norm = arch.layer_traits(config).qk_norm  # Qwen3: RMSNorm over each head's head_dim
            self.qk_eps = float(attention[0].q_norm.variance_epsilon) if qk_norm else None
            if qk_norm:
                self.qk_norms = _stacked([[a.q_norm, a.k_norm] for a in attention])  # [L, 2, D]
            self.final_norm = body.norm
            self.head = Projection([[model.lm_head]], self.transposed)
            _own_the_rest(model, self)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, column: torch.Tensor, mask: torch.Tensor,
                cache_keys: list[torch.Tensor], cache_values: list[torch.Tensor]) -> torch.Tensor:
        """Q tokens per row -> each one's next-token logits [B, Q, V] in float32, their keys/values written into the cache.

        Q is 1 for a decode step, and k + 1 for speculative decoding's verification pass (the last token and k
        drafts read in one pass). tokens, positions [B, Q]; column [1]: the cache column the row's first new
        entry goes to (the cache's length: the caller owns it, the step only reads it); mask [B, Q, C] bool: the columns each new token attends to (itself
        and the earlier ones included); cache_keys/values: L tensors [B, KV, C, D] in the cache's dtype (the
        full model's, which may differ from ours).
        """
        (rows, width), heads, kv_heads, dim = tokens.shape, self.heads, self.kv_heads, self.head_dim
        groups = heads // kv_heads  # query head j reads kv head j // G
        x = self.embed(tokens)  # [B, Q, hidden]
        cos, sin = self.rotary(x, positions)  # [B, Q, D]
        q_cos, q_sin = cos[:, None, :, None], sin[:, None, :, None]  # [B, 1, Q, 1, D]: over kv heads and query groups
        k_cos, k_sin = cos[:, None], sin[:, None]  # [B, 1, Q, D]: over kv heads
        attend = mask[:, None, :, None]  # [B, 1, Q, 1, C]
        columns = column + torch.arange(width, device=column.device)  # [Q]
        for i, (keys, values) in enumerate(zip(cache_keys, cache_values)):
            h = rms_norm(x, self.norms[i, 0], self.eps).view(rows * width, -1)
            q, k, v = self.qkv(i, h).split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
            q = q.view(rows, width, kv_heads, groups, dim).transpose(1, 2)  # [B, KV, Q, G, D]
            k, v = (t.view(rows, width, kv_heads, dim).transpose(1, 2) for t in (k, v))  # [B, KV, Q, D]
            if self.qk_eps is not None:
                q, k = rms_norm(q, self.qk_norms[i, 0], self.qk_eps), rms_norm(k, self.qk_norms[i, 1], self.qk_eps)
            q, k = rotate(q, q_cos, q_sin), rotate(k, k_cos, k_sin)
            keys.index_copy_(2, columns, k.to(keys.dtype))
            values.index_copy_(2, columns, v.to(values.dtype))
            # The block's tokens and query groups share one matrix product per kv head, the cache read once as it
            # is: a separate batch dimension for them would broadcast (copy) the cache once per group.
            q = q.reshape(rows, kv_heads, width * groups, dim)  # [B, KV, Q * G, D]
            scores = (q @ keys.transpose(-1, -2).to(q.dtype)) * self.scaling  # [B, KV, Q * G, C]
            scores = scores.view(rows, kv_heads, width, groups, -1).masked_fill(~attend, float("-inf"))
            weights = scores.softmax(-1, dtype=torch.float32).to(q.dtype).view(rows, kv_heads, width * groups, -1)
            out = (weights @ values.to(q.dtype)).view(rows, kv_heads, width, groups, dim)  # HF's softmax: in float32
            out = out.transpose(1, 2).reshape(rows * width, heads * dim)
            x = x + self.o(i, out).view(rows, width, -1)
            h = rms_norm(x, self.norms[i, 1], self.eps).view(rows * width, -1)
            gate, up = self.gate_up(i, h).chunk(2, dim=-1)
            x = x + self.down(i, self.act(gate) * up).view(rows, width, -1)
        return self.head(0, self.final_norm(x).view(rows * width, -1)).view(rows, width, -1).float()


def unsupported(model: nn.Module, capacity: int) -> str | None:
    """Why `StepWeights` cannot run this model's steps (None: it can)."""
    config = model.config
    try:
        arch.arch_of(config)
    except Exception as error:  # noqa: BLE001 - the reason is the message
        return str(error)
    window = arch.sliding_window_of(config)
    if window is not None and window < capacity:
        return f"a sliding window of {window} tokens is shorter than the {capacity}-token cache"
    body = getattr(model, "model", None)
    if body is None or not all(hasattr(body, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "its layout is not Llama's (model.embed_tokens, layers, norm, rotary_emb)"
    if "dynamic" in str(getattr(body.rotary_emb, "rope_type", "")):
        return "dynamic rotary scaling changes with the sequence length"
    return None


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
