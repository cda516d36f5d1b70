"""Where a command's models come from and where they run: the shared flag groups every model-loading command
mixes into its config (config.py says how groups compose).

`FullModelSource` is one plain model (`overfill distill` needs no more); `ModelSource` adds the OverFill pair
on top of it: a checkpoint folder, or --model with --decoder, and the decoder's own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from overfill.config import Settings
from overfill.devices import Dtype, check_dtype, default_dtype, resolve_device
from overfill.errors import OverfillError
from overfill.loading import load_model
from overfill.modeling import OverFillModel
from overfill.zoo import DEFAULT_MODEL


@dataclass(unsafe_hash=True)  # hashable: eval groups entries that share one source
class FullModelSource(Settings):
    """One model: which, in what dtype, on which device."""

    model: str | None = None
    """Full model (zoo name, folder or hub id); default: the one a checkpoint records, else smollm2-135m-instruct (unset rather than that name, so that a checkpoint's own is kept unless you replace it)."""
    dtype: Dtype | None = None
    """Weights dtype (default: bfloat16 on a GPU, float32 on a CPU; where vLLM runs the model, `serve` and `bench --engine vllm`, vLLM's own choice); with a decoder, both models', and the KV cache keeps the full model's."""
    trust_remote_code: bool = False
    """Allow custom model code from the model folder (off unless you trust it)."""
    device: str = "auto"
    """Where the model (both models, with a decoder) runs: auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps."""

    def __post_init__(self):
        super().__post_init__()
        # The device is checked here, before any model loads: a missing GPU is one error line, at once.
        self.device = str(resolve_device(self.device))
        self.dtype = self.dtype or default_dtype(torch.device(self.device))
        check_dtype(self.dtype)

    def load_full(self) -> OverFillModel:
        """The full model alone, standing in for both halves (only mode full may run on it)."""
        model = self.model or DEFAULT_MODEL
        full, tokenizer = load_model(model, dtype=check_dtype(self.dtype), device=self.device,
                                     trust_remote_code=self.trust_remote_code, quiet=True)
        return OverFillModel(full, full, tokenizer, full_source=model)


@dataclass(unsafe_hash=True)
class ModelSource(FullModelSource):
    """Where a command's OverFill model comes from, and where it runs (generate, chat, eval, bench)."""

    checkpoint: str | None = None
    """OverFill checkpoint folder (from `overfill train`); or use --model with --decoder."""
    decoder: str | None = None
    """Pruned decoder folder (from `overfill prune`, or a checkpoint's decoder/), paired with --model."""
    decoder_dtype: str | None = None
    """The decoder alone in float32, bfloat16 or int8 (int8 weights on PyTorch's fused int8 kernel on a CPU, torchao's on a GPU), behind a full model and KV cache left in --dtype; default: a checkpoint's recorded one, else --dtype."""

    def __post_init__(self):
        super().__post_init__()
        if self.decoder_dtype is not None:
            from overfill.precision import check_decoder_dtype

            check_decoder_dtype(self.decoder_dtype)

    def describe(self) -> str:
        return self.checkpoint or f"{self.model or DEFAULT_MODEL}" + (f" + {self.decoder}" if self.decoder else "")

    def load(self, *, full_alone: bool = False) -> OverFillModel:
        """The checkpoint, or --model + --decoder, on --device. With `full_alone`, --model without a decoder
        stands in for both halves (only mode full may then run)."""
        dtype, trust, device = check_dtype(self.dtype), self.trust_remote_code, torch.device(self.device)
        if self.checkpoint:
            return OverFillModel.from_pretrained(self.checkpoint, self.model, dtype=dtype, trust_remote_code=trust,
                                                 decoder_dtype=self.decoder_dtype, device=device)
        model = self.model or DEFAULT_MODEL
        if self.decoder:
            return OverFillModel.from_pair(model, self.decoder, dtype=dtype, trust_remote_code=trust,
                                           decoder_dtype=self.decoder_dtype, device=device)
        if not full_alone:
            raise OverfillError("no decoder given: pass an OverFill checkpoint folder, or --decoder (a folder from "
                                f"`overfill prune`) with --model (default {DEFAULT_MODEL})")
        return self.load_full()
