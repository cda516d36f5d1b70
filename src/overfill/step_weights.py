"""The decode model's weights laid out for one-token steps, and the step's math over them (after gpt-fast).

`StepWeights`, built once from the HF model: q/k/v fused into one matrix, gate/up into another, every
layer's matrices stacked; on a CPU stored [in, out] (a row vector times a matrix read row by row ran ~1.6x
faster than HF's [out, in] layout here, at the decoder's 315-wide shapes too), on a GPU in HF's layout
(cuBLAS reads either). The layout is the only copy of those weights: the model's own linear layers become
views into it (`_fuse`). Its `forward` is the whole step over Q tokens per row: embedding, every layer
(RMSNorm, fused q/k/v, rotary, the new column written into the cache, attention over the cache,
o-projection, RMSNorm, fused gate/up, SiLU, down), final norm, LM head. decode_step.py runs it, compiled.

Llama, Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms) and Mistral share it, as their specs in arch.py
say; a sliding window shorter than the cache, or an unsupported layout, decodes eagerly instead
(`unsupported` says why). Shapes: B rows, C cache capacity, L layers, H query heads, KV key/value heads,
G = H / KV, D head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from overfill import arch
from overfill.tensors import hand_back_pages, in_mapped_file


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
            mapped = in_mapped_file(original.data_ptr())  # once per weight, not per slice: one read of the memory map
            for first in range(0, original.shape[0], rows):  # a slice at a time: at most one slice is held twice
                held[first : first + rows] = original[first : first + rows]
                hand_back_pages(original[first : first + rows], mapped)
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
