"""KV caches for the two stages: one that grows in place, and one whose entries keep their dtype.

`KVCache` (the default everywhere): a DynamicCache whose layers keep the dtype of the first
entries written, the full model's, and hand a decoder of another dtype (a bfloat16 decoder
behind a float32 prefill, paper §2) its keys and values in the decoder's dtype; what the decoder
appends is stored in the cache's dtype. A decoder in the cache's dtype sees no difference.

`GrowingCache`: the same, and a decode step appends one token instead of copying the cache.

transformers' DynamicLayer concatenates on every update: decoding T tokens copies O(T^2) cache
entries, per layer, and on CPU those copies are a visible share of a small model's decode step.
`GrowingCache` keeps each layer in a buffer with spare room (doubling when full) and exposes the
filled part as a view, so `keys`/`values` look exactly like DynamicLayer's to the model.

It is still a DynamicCache: crop, batch_repeat_interleave and friends replace `keys`/`values`
with new tensors, and the next update notices and adopts them into a fresh buffer.
Inference only: the in-place writes would clash with autograd in training.

`StaticCache`: every layer in one buffer of a fixed capacity, which the compiled decode step
(decode_step.py) reads and extends in place; the eager forward sees it as a DynamicCache too.
"""

from __future__ import annotations

import weakref

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

MIN_CAPACITY = 256


def crop_to(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` cached tokens (5.x `crop` takes minus the number of tokens to remove)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class DtypeKeepingLayer(DynamicLayer):
    """Stores entries in the dtype of the first ones; returns keys/values in the dtype of the caller's."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or key_states.dtype == self.keys.dtype:
            return super().update(key_states, value_states, *args, **kwargs)
        keys, values = super().update(key_states.to(self.keys.dtype), value_states.to(self.values.dtype), *args, **kwargs)
        return keys.to(key_states.dtype), values.to(value_states.dtype)


class KVCache(DynamicCache):
    """DynamicCache with DtypeKeepingLayer layers (see module docstring)."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=DtypeKeepingLayer)


class GrowingLayer(DtypeKeepingLayer):
    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def _owns_current(self) -> bool:
        # True while keys is still the view we handed out (crop keeps it a prefix view of the buffer).
        buffer = self._key_buffer
        return (buffer is not None and self.keys.dim() == 4 and self.keys.data_ptr() == buffer.data_ptr()
                and self.keys.shape[:2] == buffer.shape[:2] and self.keys.stride() == buffer.stride())

    def _reserve(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Make room for `needed` tokens, keeping the current contents (adopted if replaced from outside)."""
        if self._owns_current() and needed <= self._key_buffer.shape[-2]:
            return
        length = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        spare = self._key_buffer.shape[-2] if self._owns_current() else length
        capacity = max(MIN_CAPACITY, needed, 2 * spare)
        key_buffer = key_states.new_empty(*key_states.shape[:2], capacity, key_states.shape[-1])
        value_buffer = value_states.new_empty(*value_states.shape[:2], capacity, value_states.shape[-1])
        if length:
            key_buffer[..., :length, :] = self.keys
            value_buffer[..., :length, :] = self.values
        self._key_buffer, self._value_buffer = key_buffer, value_buffer
        self.keys, self.values = key_buffer[..., :length, :], value_buffer[..., :length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.dtype != self.keys.dtype:  # a decoder in another dtype (see DtypeKeepingLayer)
            keys, values = self.update(key_states.to(self.keys.dtype), value_states.to(self.values.dtype))
            return keys.to(key_states.dtype), values.to(value_states.dtype)
        length = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        new = key_states.shape[-2]
        self._reserve(length + new, key_states, value_states)
        self._key_buffer[..., length : length + new, :] = key_states  # [B, kv_heads, new, head_dim]
        self._value_buffer[..., length : length + new, :] = value_states
        self.keys = self._key_buffer[..., : length + new, :]
        self.values = self._value_buffer[..., : length + new, :]
        return self.keys, self.values


class GrowingCache(DynamicCache):
    """DynamicCache with in-place growing layers (see module docstring)."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


# ---------------------------------------------------------------- one preallocated buffer (the compiled step's)


class StaticLayer(DtypeKeepingLayer):
    """A layer whose keys/values are the filled part of two preallocated buffers of its cache.

    To the model's eager forward (prefill, refresh) it looks exactly like a DynamicLayer: `keys` is
    the filled part [B, kv_heads, T, head_dim], `update` appends in place, `crop` shortens it. The
    compiled decode step (decode_step.py) writes the buffers' next column itself and moves `length`
    on (`StaticCache.advance`): an integer per layer, so a step builds no views.
    """

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor):
        self.key_buffer, self.value_buffer = key_buffer, value_buffer  # [B, kv_heads, capacity, head_dim]
        self.filled = [0, 0]  # columns of keys, of values: apart, since crop shortens one and then reads the other
        super().__init__()
        self.dtype, self.device = key_buffer.dtype, key_buffer.device
        self.is_initialized = True

    @property
    def length(self) -> int:
        return self.filled[0]

    @length.setter
    def length(self, value: int) -> None:
        self.filled = [value, value]

    @property
    def keys(self) -> torch.Tensor:
        return self.key_buffer[..., : self.filled[0], :]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._assign(0, self.key_buffer, value)

    @property
    def values(self) -> torch.Tensor:
        return self.value_buffer[..., : self.filled[1], :]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._assign(1, self.value_buffer, value)

    def _assign(self, which: int, buffer: torch.Tensor, value: torch.Tensor | None) -> None:
        # DynamicLayer's crop assigns a prefix of the buffer (its length is all that changes); anything
        # else assigned is copied in.
        if value is None:
            return
        if value.data_ptr() != buffer.data_ptr() or value.stride() != buffer.stride():
            buffer[..., : value.shape[-2], :].copy_(value)
        self.filled[which] = value.shape[-2]

    def get_seq_length(self) -> int:
        return self.filled[0]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.dtype != self.dtype:  # a decoder in another dtype (see DtypeKeepingLayer)
            keys, values = self.update(key_states.to(self.dtype), value_states.to(self.dtype))
            return keys.to(key_states.dtype), values.to(value_states.dtype)
        length, new = self.length, key_states.shape[-2]
        if length + new > self.key_buffer.shape[-2]:
            raise RuntimeError(f"internal: a static KV cache of {self.key_buffer.shape[-2]} tokens was asked to hold {length + new}")
        self.key_buffer[..., length : length + new, :] = key_states
        self.value_buffer[..., length : length + new, :] = value_states
        self.length = length + new
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise RuntimeError("internal: StaticCache repeats rows as a whole (StaticCache.batch_repeat_interleave)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise RuntimeError("internal: a StaticCache keeps its rows")


class StaticCache(DynamicCache):
    """Every layer's keys and values in preallocated buffers `key_buffers[i]`, `value_buffers[i]` [B, kv_heads, capacity, head_dim].

    What the compiled decode step reads and writes (decode_step.py), so that its inputs keep their
    shapes and addresses from step to step (what CUDA graphs need) and across calls of the same
    shape: buffers come from a pool and go back to it when the cache is dropped (idle ones are kept
    up to a byte budget, `set_idle_budget`). Each layer's
    are separate tensors, not views of one: a compiled step writing into views of one input would
    copy all of it, every layer. `mask` [B, capacity] (bool) says which columns a decode step attends
    to. Capacities are whole multiples of CAPACITY_STEP, so prompts of many lengths share one compiled step.
    """

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device):
        self.shape = (layers, rows, kv_heads, capacity_for(capacity), head_dim)
        self.key_buffers, self.value_buffers, self.mask = _POOL.borrow(self, self.shape, dtype, torch.device(device))
        Cache.__init__(self, layers=[StaticLayer(k, v) for k, v in zip(self.key_buffers, self.value_buffers)])
        self.mask_width = 0  # columns of `mask` that hold the loop's attention mask (mask_from)

    @classmethod
    def for_model(cls, model, rows: int, columns: int) -> "StaticCache":
        """An empty cache for `model`'s KV (its layers, KV heads, head_dim, activation dtype and device), for
        `rows` rows of up to `columns` tokens."""
        from overfill.arch import head_dim_of, kv_heads_of

        config, embedding = model.config, model.get_input_embeddings().weight
        return cls(config.num_hidden_layers, rows, kv_heads_of(config), head_dim_of(config), columns,
                   embedding.dtype, embedding.device)

    @classmethod
    def copy_of(cls, cache: DynamicCache, columns: int) -> "StaticCache":
        """A StaticCache of up to `columns` tokens holding what `cache` holds (e.g. a chat's kept context)."""
        keys = cache.layers[0].keys  # [B, kv_heads, T, head_dim]
        static = cls(len(cache.layers), keys.shape[0], keys.shape[1], keys.shape[-1], columns, keys.dtype, keys.device)
        for source, layer in zip(cache.layers, static.layers):
            layer.update(source.keys, source.values)
        return static

    def _buffers(self) -> tuple:
        return self.key_buffers, self.value_buffers, self.mask

    @property
    def rows(self) -> int:
        return self.shape[1]

    @property
    def capacity(self) -> int:
        return self.shape[3]

    def advance(self, tokens: int = 1) -> None:
        """The compiled step wrote `tokens` more columns into every layer's buffer: show them to the eager forward."""
        for layer in self.layers:
            layer.length += tokens

    def mask_from(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """`mask` [B, capacity] holding `attention_mask` [B, T] (cache + new token), False beyond: updated in place,
        one column per step once in step with the loop."""
        width = attention_mask.shape[1]
        if width == self.mask_width + 1 and self.mask_width:
            self.mask[:, width - 1] = attention_mask[:, -1].bool()
        elif width != self.mask_width:
            self.mask.zero_()
            self.mask[:, :width] = attention_mask.bool()
        self.mask_width = width
        return self.mask

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Several candidates from one prefill: a buffer of `repeats` times the rows, each row's entries repeated."""
        if repeats == 1:
            return
        old = self.layers
        self.shape = (self.shape[0], self.rows * repeats, *self.shape[2:])
        self.key_buffers, self.value_buffers, self.mask = _POOL.borrow(self, self.shape, self.key_buffers[0].dtype,
                                                          self.key_buffers[0].device)
        self.layers = [StaticLayer(k, v) for k, v in zip(self.key_buffers, self.value_buffers)]
        for source, layer in zip(old, self.layers):
            layer.update(source.keys.repeat_interleave(repeats, dim=0), source.values.repeat_interleave(repeats, dim=0))
        del old
        self.mask_width = 0


CAPACITY_STEP = 128


def capacity_for(tokens: int) -> int:
    """The static cache's capacity for `tokens` columns: the next multiple of CAPACITY_STEP."""
    return max(CAPACITY_STEP, -(-tokens // CAPACITY_STEP) * CAPACITY_STEP)


class _BufferPool:
    """KV buffers kept for reuse between calls of the same shape: a compiled step (a CUDA graph above all)
    then finds its inputs where it left them. A cache borrows one set for its lifetime; a finalizer gives it
    back, and idle sets are kept, the most recently returned first, while they fit the byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.idle: list[tuple[tuple, tuple]] = []  # (key, (keys, values, mask))

    def borrow(self, owner, shape: tuple, dtype: torch.dtype, device: torch.device):
        key = (shape, dtype, device)
        for i, (k, buffers) in enumerate(self.idle):
            if k == key:
                del self.idle[i]
                break
        else:
            layers, rows, *layer_shape = shape
            keys = [torch.zeros(rows, *layer_shape, dtype=dtype, device=device) for _ in range(layers)]
            values = [torch.zeros(rows, *layer_shape, dtype=dtype, device=device) for _ in range(layers)]
            mask = torch.zeros(rows, layer_shape[1], dtype=torch.bool, device=device)  # [B, capacity]
            if device.type == "cuda":  # CUDA graphs read these where they are, not from copies
                for tensor in (*keys, *values, mask):
                    torch._dynamo.mark_static_address(tensor, guard=False)  # a new buffer re-records, never recompiles
            buffers = (keys, values, mask)
        weakref.finalize(owner, self._give_back, key, buffers)
        return buffers

    def _give_back(self, key, buffers) -> None:
        self.idle.insert(0, (key, buffers))
        self.trim()

    def trim(self) -> None:
        kept, total = [], 0
        for entry in self.idle:
            total += buffer_bytes(entry[1])
            if total <= self.budget_bytes:
                kept.append(entry)
        self.idle = kept

    def idle_bytes(self) -> int:
        return sum(buffer_bytes(buffers) for _, buffers in self.idle)


def buffer_bytes(buffers: tuple) -> int:
    keys, values, mask = buffers
    return sum(t.numel() * t.element_size() for t in (*keys, *values, mask))


# Idle buffers kept for reuse, at most (one batch-1 set of a Llama-3.2-3B shape at 2,048 tokens in bfloat16: 224 MiB).
IDLE_BUDGET_MB = 1024
_POOL = _BufferPool(IDLE_BUDGET_MB << 20)


def set_idle_budget(megabytes: float) -> None:
    """Keep at most this many MiB of idle static-cache buffers for reuse (0: none, a cache's buffers go with it)."""
    _POOL.budget_bytes = int(megabytes * (1 << 20))
    _POOL.trim()


def idle_cache_bytes() -> int:
    """Bytes of static-cache buffers held idle for reuse (the pool's, not any live cache's)."""
    return _POOL.idle_bytes()
