"""A KV cache that grows in place, so a decode step appends one token instead of copying the cache.

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


class GrowingLayer(DynamicLayer):
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
