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

Whether bfloat16 pays depends on the CPU: with AVX512-BF16 or AMX it is native; without (AMD Zen3,
AVX2 only) matrix-matrix products were measured ~400x slower than float32, while matrix-vector
products at batch 1 can still gain from the halved bytes. And instruction sets do not settle it:
on a Xeon with AVX512-BF16 but no AMX, an int8 decoder ran at 0.97-1.07x the float32 decoder's
speed and a bfloat16 one at 0.6-0.77x, while on an AMD EPYC the int8 one ran at 1.8x. So the speed
is measured, once per machine (`decoder_speedup`: a batch-1 decode-shaped step in each dtype beside
float32, a few seconds, cached in `$OVERFILL_HOME`), and converting a decoder on a CPU warns in one
line where its dtype is no faster than float32 there. `overfill bench --decoder-dtypes` measures
the real decoder.
"""

from __future__ import annotations

import copy
import functools
import json
import time
import typing
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from overfill.atomic import atomic_write_text
from overfill.devices import cpu_info
from overfill.errors import OverfillError, OverfillWarning
from overfill.home import overfill_home

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
    if dtype == "int8" and not torch.cuda.is_available() and int8_kernel_input() is None:
        return ("PyTorch's int8 kernel measured slower than a float32 product on this CPU: the int8 decoder keeps "
                "a quarter of the weight memory but widens each weight on every call, so it decodes slower here")
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
    advice = (measured_advice(dtype) if device.type == "cpu" else None) or dtype_advice(dtype, batch)
    if advice:
        warnings.warn(advice, OverfillWarning, stacklevel=3)


# ---------------------------------------------------------------- is it faster here? measured once per machine

# Below this speed-up over float32 a lower-precision decoder counts as no faster: run-to-run noise on
# a shared machine is of this order, and a gain within it does not pay for the lost precision.
FASTER = 1.1
SPEED_CACHE = "decoder_speed.json"  # in $OVERFILL_HOME


def speed_key(dtype: str) -> str:
    """What a measured speed-up holds for: this CPU model, this torch (its kernels), the dtype."""
    return f"{cpu_info()['name']} | torch {torch.__version__} | {dtype}"


def measure_speedup(dtype: str, seconds: float = 2.0, width: int = 1024) -> float:
    """float32 time over `dtype` time of a decode-shaped step at batch 1 on this CPU.

    The step is an MLP block's two products, [width -> 4 width -> width] (32 MB of float32 weights at
    1024: more than the caches hold, as a decoder's weights are, so the bytes read count), on the
    layers the real decoder gets (bfloat16 weights, or `Int8Linear`). The two alternate round by
    round, so a busy machine slows both alike; best round of each, for about `seconds`.
    """
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(4 * width, width, generator=generator) / width ** 0.5,
               torch.randn(width, 4 * width, generator=generator) / (4 * width) ** 0.5]
    x = torch.randn(1, width, generator=generator)
    if dtype == "bfloat16":
        low, x_low = [w.to(torch.bfloat16) for w in weights], x.to(torch.bfloat16)
        low_step = lambda: nn.functional.linear(nn.functional.linear(x_low, low[0]), low[1])  # noqa: E731
    elif dtype == "int8":
        layers = []
        for w in weights:
            scale = w.abs().amax(1) / 127
            layers.append(Int8Linear(torch.round(w / scale[:, None]).to(torch.int8), scale))
        low_step = lambda: layers[1](layers[0](x))  # noqa: E731
    else:
        raise ValueError(f"no lower precision to measure: {dtype}")
    steps = {"float32": lambda: nn.functional.linear(nn.functional.linear(x, weights[0]), weights[1]), dtype: low_step}
    best = dict.fromkeys(steps, float("inf"))
    with torch.inference_mode():
        for step in steps.values():
            step()  # first calls pick kernels and allocate
        deadline, rounds = time.perf_counter() + seconds, 0
        while rounds < 3 or (time.perf_counter() < deadline and rounds < 1000):
            for name, step in steps.items():
                start = time.perf_counter()
                for _ in range(4):
                    step()
                best[name] = min(best[name], time.perf_counter() - start)
            rounds += 1
    return best["float32"] / best[dtype]


def decoder_speedup(dtype: str, measure=None) -> float:
    """How many times faster than float32 a `dtype` decoder steps on this CPU (1.0 for float32 itself).

    Measured by `measure(dtype)` (default `measure_speedup`) the first time on a machine (per CPU model, torch version and dtype:
    `speed_key`) and read from $OVERFILL_HOME/decoder_speed.json after that. A cache that cannot be
    read is measured again; one that cannot be written only costs the next run the measurement.
    """
    if dtype == "float32":
        return 1.0
    path, key = overfill_home() / SPEED_CACHE, speed_key(dtype)
    try:
        known = json.loads(path.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("speedup"), (int, float)):
        return float(entry["speedup"])
    speedup = float((measure or measure_speedup)(dtype))
    known[key] = {"speedup": round(speedup, 3), "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        atomic_write_text(path, json.dumps(known, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass
    return speedup


def speed_advice(dtype: str, speedup: float) -> str | None:
    """The one warning line for a `dtype` decoder that measured `speedup` times float32 here, or None when it is faster."""
    if dtype == "float32" or speedup >= FASTER:
        return None
    return (f"the {dtype} decoder measured {speedup:.2f}x the float32 decoder's speed on this CPU ({cpu_info()['name']}, "
            f"torch {torch.__version__}): no faster here, at lower precision; --decoder-dtype float32 decodes as fast")


def measured_advice(dtype: str) -> str | None:
    """`speed_advice` from this machine's measured speed-up (measured now if it never was)."""
    return None if dtype == "float32" else speed_advice(dtype, decoder_speedup(dtype))


def speedup_summary(dtypes: tuple[str, ...] = ("bfloat16", "int8"), measure=None) -> str:
    """One line a benchmark can print: each dtype's measured decode speed-up over float32 on this CPU."""
    parts = [f"{d} {decoder_speedup(d, measure):.2f}x" for d in dtypes if d != "float32"]
    return f"decoder step vs float32 on this CPU (batch 1, measured once per machine): {', '.join(parts)}"


# ---------------------------------------------------------------- int8 weights, PyTorch's fused kernel

# The kernel needs the inner dimension padded to a multiple of its block: at widths a pruned
# decoder has (315, 844) an unpadded call returned wrong values, or crashed.
KERNEL_BLOCK = 64


class Int8Linear(nn.Module):
    """y = x W^T + b with W held as int8 [out, in] and one float32 scale per output row.

    The product runs in PyTorch's `_weight_int8pack_mm` on CPU, which reads the int8 bytes as they
    are: at batch 1 a decode step is bound by weight bytes, so a quarter of them is most of the
    saving. Its input is cast to the dtype that kernel is fastest with here (`int8_kernel_input`),
    and the output back, so the rest of the decoder keeps its dtype. On other devices the weight is
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
            kernel_dtype = int8_kernel_input() if x.device.type == "cpu" else None
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
        kernel_dtype = int8_kernel_input() if self.packed.device.type == "cpu" else None
        self._prepared = (kernel_dtype, None if kernel_dtype is None else self._kernel_scale(kernel_dtype))

    def _kernel_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """The scales in the kernel's input dtype, converted once (again after a move or `restore_int8`)."""
        key = (dtype, self.scale.data_ptr())
        if getattr(self, "_scale_key", None) != key:
            self._scale_key, self._scale_as = key, self.scale.to(dtype)
        return self._scale_as

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


@functools.lru_cache(maxsize=1)
def int8_kernel_input() -> torch.dtype | None:
    """The input dtype PyTorch's int8 kernel is fastest with on this CPU, or None if float32 F.linear beats both.

    With native bfloat16 (AVX512-BF16 or AMX) the kernel's bfloat16 path is its vectorised one:
    measured here ~8x faster than its float32 path and 3-9x faster than float32 F.linear at batch 1.
    Without, nothing is assumed: measured once per process, a batch-1 product with a matrix larger
    than the caches (a decode step reads its weights from memory), the candidates interleaved so a
    busy machine slows them alike, best of each. (Not measured where it is native: on a busy machine
    the kernel's threads suffer more than MKL's, and the pick would follow the load, not the CPU.)
    """
    if native_bf16():
        return torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8192, 1024, generator=generator)  # 32 MB in float32
    scale = weight.abs().amax(1) / 127
    packed = torch.round(weight / scale[:, None]).to(torch.int8).contiguous()
    x = torch.randn(1, 1024, generator=generator)
    calls = {None: lambda: nn.functional.linear(x, weight)}
    for dtype in (torch.bfloat16, torch.float32):
        h, s = x.to(dtype), scale.to(dtype)
        try:
            torch.ops.aten._weight_int8pack_mm(h, packed, s)
        except (RuntimeError, NotImplementedError):  # a build without the kernel
            continue
        calls[dtype] = lambda h=h, s=s: torch.ops.aten._weight_int8pack_mm(h, packed, s)
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(8):
        for dtype, call in calls.items():
            start = time.perf_counter()
            call()
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return min(best, key=best.get)


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
