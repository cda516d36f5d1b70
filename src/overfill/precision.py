"""A low-precision decoder behind a full-precision prefill (paper §2, left there for future work).

Decoding is memory-bound: each step reads every decoder weight once, so the decoder's bytes are
its cost. The prefill is compute-bound and stays as it is, and so does the KV cache (the full
model's entries keep their dtype; kv_cache.KVCache hands a bfloat16 decoder its keys and values in
bfloat16). Only the decoder changes:

    float32   as trained
    bfloat16  every decoder weight and activation in bfloat16 (half the bytes)
    int8      int8 weights with one float32 scale per output channel for every linear layer, LM
              head included (a quarter of the bytes); activations, norms and attention stay in the
              model's dtype, so the decoder reads the cache as is. torchao (PyTorch's own
              quantisation library) computes the int8 values and scales. On a CPU, PyTorch's fused
              int8 weight-only kernel (`_weight_int8pack_mm`, `Int8Linear`) multiplies with them,
              reading the int8 bytes directly: torchao's own CPU linear widens the whole weight to
              float32 on every call, which costs more time than the int8 bytes save (measured: slower
              than float32). On a GPU the layers keep torchao's weights and kernels (`int8_kernels`).

Which precision the arithmetic runs in is settled by what the device can do, never by timing it, so
a checkpoint computes the same numbers on every run of a machine (`devices.native_bfloat16`): an
int8 layer hands PyTorch's kernel bfloat16 activations on a CPU with AVX512-BF16 or AMX (the
kernel's vectorised path there), float32 ones elsewhere. Whether a lower precision pays is the
machine's to show, not the conversion's to guess: bfloat16 without native support gets one warning
line (at batch 1 its halved bytes may still gain, at larger batches its products can be far slower
than float32), and `overfill bench --decoder-dtypes float32,bfloat16,int8` times the real decoder
in each.
"""

from __future__ import annotations

import copy
import typing
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from overfill import devices
from overfill.errors import OverfillError, OverfillWarning

DecoderDtype = Literal["float32", "bfloat16", "int8"]
DECODER_DTYPES: tuple[str, ...] = typing.get_args(DecoderDtype)


def check_decoder_dtype(value: str, flag: str = "--decoder-dtype") -> str:
    if value not in DECODER_DTYPES:
        raise OverfillError(f"{flag} got '{value}': pick one of {', '.join(DECODER_DTYPES)}")
    return value


def dtype_advice(dtype: str, batch: int = 1, device: torch.device | None = None) -> str | None:
    """A warning to show before running a decoder in `dtype` on `device` (default: the CPU), or None: from what the
    device can do, not from timing it."""
    device = torch.device("cpu") if device is None else device
    if dtype != "bfloat16" or device.type not in ("cpu", "cuda") or devices.native_bfloat16(device):
        return None
    if device.type == "cuda":
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        return (f"this GPU has no native bfloat16 (compute capability {capability}, below 8.0): a bfloat16 decoder "
                "may decode slower than float32; `overfill bench --decoder-dtypes float32,bfloat16` measures it")
    where = "matrix-vector products at batch 1 may gain from the halved bytes" if batch == 1 else \
        f"at batch {batch} its matrix-matrix products can be far slower than float32"
    return (f"this CPU has no native bfloat16 (no AVX512-BF16 or AMX): {where}; "
            "`overfill bench --decoder-dtypes float32,bfloat16,int8` measures it")


def _torchao():
    """torchao (the command line mutes its messages about GPU kernels a CPU machine cannot load: cli/app.py)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import torchao.quantization as quantization
        except ImportError:
            raise OverfillError("--decoder-dtype int8 needs torchao: pip install torchao==0.18.0") from None
    return quantization


def int8_kernels(device: torch.device) -> str:
    """Whose kernels an int8 decoder multiplies with on `device`: pytorch (the fused CPU kernel, `Int8Linear`) or torchao."""
    return "pytorch" if device.type == "cpu" else "torchao"


def set_decoder_dtype(decoder: nn.Module, dtype: str, batch: int = 1, kernels: str | None = None) -> nn.Module:
    """Convert `decoder` in place to `dtype` (from float32 weights, on its device) and return it; warns where it may be
    slower here. int8 `kernels` default to the device's (`int8_kernels`)."""
    check_decoder_dtype(dtype)
    device = next(decoder.parameters()).device
    if dtype == "bfloat16":
        _advise(dtype, batch, device)
        decoder.to(torch.bfloat16)
    elif dtype == "int8" and decoder_dtype(decoder) != "int8":
        _advise(dtype, batch, device)
        quantization = _torchao()
        quantization.quantize_(decoder, quantization.Int8WeightOnlyConfig())
        if (kernels or int8_kernels(device)) == "pytorch":
            for parent in list(decoder.modules()):
                for name, child in parent.named_children():
                    if isinstance(child, nn.Linear) and hasattr(child.weight, "qdata"):
                        setattr(parent, name, Int8Linear(child.weight.qdata, child.weight.scale, child.bias))
    return decoder


def _advise(dtype: str, batch: int, device: torch.device) -> None:
    advice = dtype_advice(dtype, batch, device)
    if advice:
        warnings.warn(advice, OverfillWarning, stacklevel=3)


def precision_summary(dtypes: tuple[str, ...], device: torch.device) -> str:
    """One line a benchmark can print: what each lower-precision decoder computes in on `device`, and the capability
    that decided it (the bench's own rows time what it costs)."""
    where = "AVX512-BF16 or AMX" if device.type == "cpu" else ""
    if device.type == "cuda":
        where = "compute capability " + ".".join(map(str, torch.cuda.get_device_capability(device)))
    native = f"{'native' if devices.native_bfloat16(device) else 'no native'} bfloat16" + (f" ({where})" if where else "")
    parts = []
    if "bfloat16" in dtypes:
        parts.append("bfloat16 decoder: bfloat16 weights and activations")
    if "int8" in dtypes:
        parts.append(f"int8 decoder: PyTorch's int8 kernel with {str(int8_kernel_input(device)).removeprefix('torch.')} "
                     "activations" if int8_kernels(device) == "pytorch" else "int8 decoder: torchao's int8 kernels")
    return f"decoder precision on {device.type}, {native}" + (f": {'; '.join(parts)}" if parts else "")


# ---------------------------------------------------------------- int8 weights, PyTorch's fused kernel

# The kernel needs the inner dimension padded to a multiple of its block: at widths a pruned
# decoder has (315, 844) an unpadded call returned wrong values, or crashed.
KERNEL_BLOCK = 64


class Int8Linear(nn.Module):
    """y = x W^T + b with W held as int8 [out, in] and one float32 scale per output row.

    The product runs in PyTorch's `_weight_int8pack_mm` on CPU, which reads the int8 bytes as they
    are: at batch 1 a decode step is bound by weight bytes, so a quarter of them is most of the
    saving. Its input is cast to the dtype this CPU's kernel computes in (`int8_kernel_input`: by
    capability, so the numbers do not depend on the machine's load), and the output back, so the rest of the decoder keeps its dtype. On other devices the weight is
    widened per call (correct, not fast).
    """

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = qdata.shape[1], qdata.shape[0]
        padded = -self.in_features % KERNEL_BLOCK
        self.register_buffer("packed", nn.functional.pad(qdata.detach(), (0, padded)).contiguous())
        self.register_buffer("scale", scale.detach().reshape(-1).float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @property
    def qdata(self) -> torch.Tensor:
        return self.packed[:, : self.in_features]

    def dequantize(self) -> torch.Tensor:
        return self.qdata.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a compiled step: what `prepare` settled, as constants
            kernel_dtype, scale = self._prepared
        else:
            kernel_dtype = int8_kernel_input(x.device) if x.device.type == "cpu" else None
            scale = None if kernel_dtype is None else self._kernel_scale(kernel_dtype)
        if kernel_dtype is None:
            y = nn.functional.linear(x, self.dequantize().to(x.dtype))
        else:
            rows = x.reshape(-1, self.in_features).to(kernel_dtype)
            if self.packed.shape[1] != self.in_features:
                rows = nn.functional.pad(rows, (0, self.packed.shape[1] - self.in_features))
            y = torch.ops.aten._weight_int8pack_mm(rows, self.packed, scale)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def prepare(self) -> None:
        """Settle the kernel's input dtype and scales before a compiled step traces `forward` (decode_step.py)."""
        kernel_dtype = int8_kernel_input(self.packed.device) if self.packed.device.type == "cpu" else None
        self._prepared = (kernel_dtype, None if kernel_dtype is None else self._kernel_scale(kernel_dtype))

    def _kernel_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """The scales in the kernel's input dtype, converted once (again after a move or `restore_int8`)."""
        key = (dtype, self.scale.data_ptr())
        if getattr(self, "_scale_key", None) != key:
            self._scale_key, self._scale_as = key, self.scale.to(dtype)
        return self._scale_as

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def int8_kernel_input(device: torch.device | None = None) -> torch.dtype:
    """The activation dtype PyTorch's int8 kernel computes in on this CPU: bfloat16 where it is native (AVX512-BF16 or
    AMX: the kernel's vectorised path, measured ~8x faster than its float32 path and 3-9x faster than float32
    F.linear at batch 1), else float32.

    Decided by capability alone (`devices.native_bfloat16`), never by a timing race: a checkpoint's numbers are the
    same on every run of a machine, however busy it is. `overfill bench --decoder-dtypes` measures what it costs.
    """
    return torch.bfloat16 if devices.native_bfloat16(device or torch.device("cpu")) else torch.float32


def decoder_dtype(decoder: nn.Module) -> str:
    """What a decoder's linear layers hold: int8 weights (either kernels', `set_decoder_dtype`), else their float
    dtype's name (float32, bfloat16, or another such as float16 when both models were loaded in it)."""
    for module in decoder.modules():
        if isinstance(module, Int8Linear) or (isinstance(module, nn.Linear) and hasattr(module.weight, "qdata")):
            return "int8"
        if isinstance(module, nn.Linear):
            return str(module.weight.dtype).removeprefix("torch.")
    return "float32"


INT8_FILE = "int8.safetensors"  # beside an int8 decoder's float32 weights: its exact int8 values and scales


def float_copy(decoder: nn.Module) -> nn.Module:
    """A copy of an int8 decoder with float32 weights (int8 x scale): a plain model folder when saved."""
    copy_ = copy.deepcopy(decoder)
    for parent in list(copy_.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Int8Linear) or (isinstance(child, nn.Linear) and hasattr(child.weight, "qdata")):
                weight = child.dequantize() if isinstance(child, Int8Linear) else child.weight.dequantize()
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device=weight.device)
                linear.weight = nn.Parameter(weight.float(), requires_grad=False)
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias.detach().float().clone(), requires_grad=False)
                setattr(parent, name, linear)
    if getattr(copy_.config, "tie_word_embeddings", False):
        copy_.config.tie_word_embeddings = False  # the LM head was quantised apart from the embedding
    return copy_


def _quantised(decoder: nn.Module):
    """(name, int8 values [out, in], scales [out]) of every int8 layer, views of the tensors the layer computes with."""
    for name, module in decoder.named_modules():
        if isinstance(module, Int8Linear):
            yield name, module.qdata, module.scale
        elif isinstance(module, nn.Linear) and hasattr(module.weight, "qdata"):  # torchao's weights
            yield name, module.weight.qdata, module.weight.scale.view(-1)


def save_int8(decoder: nn.Module, folder: Path) -> None:
    """An int8 decoder's exact int8 values and scales (re-quantising its float copy would round some differently)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, qdata, scale in _quantised(decoder):
        tensors[f"{name}.qdata"], tensors[f"{name}.scale"] = qdata.contiguous().cpu(), scale.contiguous().cpu()
    save_file(tensors, str(Path(folder) / INT8_FILE))


def restore_int8(decoder: nn.Module, folder: Path) -> None:
    """Put back the int8 values `save_int8` wrote into a decoder just quantised from their float copy."""
    from safetensors.torch import load_file

    path = Path(folder) / INT8_FILE
    if not path.is_file():
        return
    saved = load_file(str(path))
    with torch.no_grad():
        for name, qdata, scale in _quantised(decoder):
            qdata.copy_(saved[f"{name}.qdata"])
            scale.copy_(saved[f"{name}.scale"].reshape(-1))
    for module in decoder.modules():
        if isinstance(module, Int8Linear):
            module._scale_key = None


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's weights, shared ones once (an int8 layer counts its int8 values and scales, not the kernel's padding)."""
    dense = {id(p): p for p in module.parameters() if not hasattr(p, "qdata")}
    return (sum(p.numel() * p.element_size() for p in dense.values())
            + sum(q.numel() * q.element_size() + s.numel() * s.element_size() for _, q, s in _quantised(module)))
