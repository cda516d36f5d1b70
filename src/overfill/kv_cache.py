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
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

MIN_CAPACITY = 256


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
