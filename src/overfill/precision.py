"""A low-precision decoder behind a full-precision prefill (paper §2, left there for future work).

Decoding is memory-bound: each step reads every decoder weight once, so the decoder's bytes are
its cost. The prefill is compute-bound and stays as it is, and so does the KV cache (the full
model's entries keep their dtype; kv_cache.KVCache hands a bfloat16 decoder its keys and values in
bfloat16). Only the decoder changes:

    float32   as trained
    bfloat16  every decoder weight and activation in bfloat16 (half the bytes)
    int8      torchao's int8 weight-only quantisation of every linear layer, LM head included
              (a quarter of the bytes; per-output-channel scales; activations stay float32, so
              the decoder reads the float32 cache as is). torchao is PyTorch's own quantisation
              library: its Int8Tensor runs on PyTorch's int8 CPU/GPU matmul kernels and needs no
              calibration data; hand-written quantisation would have to match both.

Whether bfloat16 pays depends on the CPU: with AVX512-BF16 or AMX it is native; without (AMD Zen3,
AVX2 only) matrix-matrix products were measured ~400x slower than float32, while matrix-vector
products at batch 1 can still gain from the halved bytes. `dtype_advice` says so before a run;
`overfill bench --decoder-dtypes` measures it on the machine at hand.
"""

from __future__ import annotations

import copy
import typing
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from overfill.errors import OverfillError, OverfillWarning

DecoderDtype = Literal["float32", "bfloat16", "int8"]
DECODER_DTYPES: tuple[str, ...] = typing.get_args(DecoderDtype)


def check_decoder_dtype(value: str, flag: str = "--decoder-dtype") -> str:
    if value not in DECODER_DTYPES:
        raise OverfillError(f"{flag} got '{value}': pick one of {', '.join(DECODER_DTYPES)}")
    return value


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); True on a GPU."""
    if torch.cuda.is_available():
        return True
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def dtype_advice(dtype: str, batch: int = 1) -> str | None:
    """A warning to show before running a decoder in `dtype` here, or None."""
    if dtype == "int8" and not torch.cuda.is_available():
        # torchao's weight-only linear widens the whole int8 weight to the activation dtype on every
        # call on CPU (no fused kernel; PyTorch's own _weight_int8pack_mm gave wrong results here for
        # widths that are not a multiple of its block): a quarter of the weight memory, not less time.
        return ("int8 decoder on CPU: a quarter of the weight memory, but torchao's CPU path widens each weight "
                "on every call, so it decodes slower than float32 here (`overfill bench --decoder-dtypes` measures it)")
    if dtype == "bfloat16" and not native_bf16():
        where = "matrix-vector products at batch 1 may gain from the halved bytes" if batch == 1 else \
            f"at batch {batch} its matrix-matrix products can be far slower than float32"
        return (f"this CPU has no native bfloat16 (no AVX512-BF16 or AMX): {where}; "
                "`overfill bench --decoder-dtypes float32,bfloat16,int8` measures it")
    return None


def _torchao():
    """torchao (its messages about GPU kernels a CPU machine cannot load are muted in overfill/__init__)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import torchao.quantization as quantization
        except ImportError:
            raise OverfillError("--decoder-dtype int8 needs torchao: pip install torchao==0.18.0") from None
    return quantization


def set_decoder_dtype(decoder: nn.Module, dtype: str, batch: int = 1) -> nn.Module:
    """Convert `decoder` in place to `dtype` (from float32 weights) and return it; warns where it may be slower here."""
    check_decoder_dtype(dtype)
    advice = dtype_advice(dtype, batch)
    if advice:
        warnings.warn(advice, OverfillWarning, stacklevel=2)
    if dtype == "bfloat16":
        decoder.to(torch.bfloat16)
    elif dtype == "int8":
        quantization = _torchao()
        if decoder_dtype(decoder) == "int8":
            return decoder
        quantization.quantize_(decoder, quantization.Int8WeightOnlyConfig())
    return decoder


def decoder_dtype(decoder: nn.Module) -> str:
    """What `set_decoder_dtype` made of a decoder: int8 when its linear layers hold quantised weights."""
    for module in decoder.modules():
        if isinstance(module, nn.Linear):
            weight = module.weight
            if hasattr(weight, "dequantize") and getattr(weight, "qdata", None) is not None:
                return "int8"
            return {torch.bfloat16: "bfloat16"}.get(weight.dtype, "float32")
    return "float32"


INT8_FILE = "int8.safetensors"  # beside an int8 decoder's float32 weights: its exact int8 values and scales


def float_copy(decoder: nn.Module) -> nn.Module:
    """A copy of an int8 decoder with float32 weights (int8 x scale): a plain model folder when saved."""
    copy_ = copy.deepcopy(decoder)
    for module in copy_.modules():
        if isinstance(module, nn.Linear) and hasattr(module.weight, "qdata"):
            module.weight = nn.Parameter(module.weight.dequantize().float(), requires_grad=False)
    if getattr(copy_.config, "tie_word_embeddings", False):
        copy_.config.tie_word_embeddings = False  # the LM head was quantised apart from the embedding
    return copy_


def _quantised(decoder: nn.Module):
    for name, module in decoder.named_modules():
        if isinstance(module, nn.Linear) and hasattr(module.weight, "qdata"):
            yield name, module.weight


def save_int8(decoder: nn.Module, folder: Path) -> None:
    """An int8 decoder's exact int8 values and scales (re-quantising its float copy would round some differently)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, weight in _quantised(decoder):
        tensors[f"{name}.qdata"], tensors[f"{name}.scale"] = weight.qdata.contiguous(), weight.scale.contiguous()
    save_file(tensors, str(Path(folder) / INT8_FILE))


def restore_int8(decoder: nn.Module, folder: Path) -> None:
    """Put back the int8 values `save_int8` wrote into a decoder just quantised from their float copy."""
    from safetensors.torch import load_file

    path = Path(folder) / INT8_FILE
    if not path.is_file():
        return
    saved = load_file(str(path))
    with torch.no_grad():
        for name, weight in _quantised(decoder):
            weight.qdata.copy_(saved[f"{name}.qdata"])
            weight.scale.copy_(saved[f"{name}.scale"])


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's weights as stored (quantised tensors count their int8 data and scales)."""
    total = 0
    for p in module.parameters():
        inner = [getattr(p, name) for name in getattr(p, "tensor_data_names", ()) if getattr(p, name, None) is not None]
        total += sum(t.numel() * t.element_size() for t in inner) if inner else p.numel() * p.element_size()
    return total
