"""Minitron-style static width pruning that keeps KV caches compatible (docs/design.md, "Pruning").

1. Run the full model over calibration chats; hooks record, in every layer, the outputs of both
   RMSNorms ([B, T, D]) and the input of the MLP down projection ([B, T, I]).
2. Score channels: mean over the sequence (padding excluded), then L2 over sequences, streamed
   as sums of squares. Hidden channels are shared by all layers (the residual stream), so a
   sequence's hidden score adds up |mean| of both norm outputs over all layers before the L2.
3. Keep the top channels (sorted ascending, so channel order is preserved) and slice every
   weight. Layers, attention heads, KV heads and head_dim are untouched, so the pruned model
   writes cache entries of exactly the full model's shapes.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from overfill import arch
from overfill.atomic import atomic_folder, check_writable
from overfill.config import Settings, at_least
from overfill.data.calibration import bundled_calibration_records, calibration_ids
from overfill.data.records import read_records
from overfill.devices import model_device, resolve_device
from overfill.errors import OverfillError
from overfill.fingerprint import fingerprint
from overfill.loading import load_config, load_model, resolve_model
from overfill.tensors import last_columns, left_pad, pad_id_of, positions_from_mask
from overfill.zoo import DEFAULT_MODEL

BUNDLED_CALIBRATION = "bundled"


@dataclass
class PruneConfig(Settings):
    model: str = DEFAULT_MODEL
    """Full model to prune: a zoo name, a local HF folder or a hub id."""
    out: str = "runs/pruned"
    """Output folder (a normal HF model folder plus pruning.json)."""
    ratio: float = 0.45
    """Share of channels removed from both the hidden and the MLP width (paper: 0.45 for 3B)."""
    hidden_ratio: float | None = None
    """Hidden (residual) pruning ratio; overrides --ratio for D."""
    mlp_ratio: float | None = None
    """MLP intermediate pruning ratio; overrides --ratio for I."""
    hidden_size: int | None = None
    """Explicit pruned hidden width; overrides the ratios."""
    mlp_size: int | None = None
    """Explicit pruned MLP width; overrides the ratios."""
    multiple_of: int = 1
    """Round both widths down to a multiple of this (e.g. 64 for fast kernels)."""
    calib_data: str = BUNDLED_CALIBRATION
    """Calibration JSONL (chat `messages`, alpaca `instruction/input/output`, or `text`), or 'bundled'."""
    calib_samples: int = 64
    """Number of calibration sequences (the paper used 512)."""
    calib_len: int = 256
    """Tokens per calibration sequence, longer ones are cut (the paper used 512)."""
    batch_size: int = 8
    """Calibration batch size."""
    seed: int = 0
    """Seed for choosing calibration records from a larger file."""
    force: bool = False
    """Replace a non-empty output folder."""
    trust_remote_code: bool = False
    """Allow custom model code from the model folder (off unless you trust it)."""
    device: str = "auto"
    """Where the calibration batches run (in float32): auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps."""

    def __post_init__(self):
        super().__post_init__()
        self.device = str(resolve_device(self.device))
        for name in ("ratio", "hidden_ratio", "mlp_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise OverfillError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}: it is the share of channels removed")
        for name in ("hidden_size", "mlp_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise OverfillError(f"--{name.replace('_', '-')} must be a positive width, got {value}")
        at_least(self, 1, "multiple_of", "calib_samples", "calib_len", "batch_size")


@dataclass
class ChannelScores:
    hidden: torch.Tensor  # [D]
    mlp: torch.Tensor  # [L, I]
    sequences: int = 0
    tokens: int = 0


@dataclass
class Widths:
    hidden_requested: int
    hidden: int
    mlp_requested: int
    mlp: int
    hidden_multiple: int
    mlp_multiple: int


@dataclass
class PruneResult:
    model: torch.nn.Module
    record: dict
    out: Path | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- calibration


def calibration_sequences(tokenizer, config: PruneConfig) -> list[list[int]]:
    """Token ids of the calibration set, cut to calib_len, at most calib_samples of them."""
    if config.calib_data == BUNDLED_CALIBRATION:
        records = bundled_calibration_records()
    else:
        records = read_records(config.calib_data).records
        generator = torch.Generator().manual_seed(config.seed)
        records = [records[i] for i in torch.randperm(len(records), generator=generator).tolist()]
    sequences = [ids[: config.calib_len] for ids in calibration_ids(tokenizer, records[: config.calib_samples * 2])]
    sequences = [ids for ids in sequences if ids][: config.calib_samples]
    if not sequences:
        raise OverfillError(
            f"calibration data {config.calib_data} has no usable records: each JSONL line needs chat `messages`, "
            "alpaca `instruction`/`output`, or `text`"
        )
    return sequences


def _masked_sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, C] -> [B, C], averaging real tokens only (in float64, float32 on MPS)."""
    m = mask.to(x.dtype).unsqueeze(-1)
    wide = torch.float32 if x.device.type == "mps" else torch.float64
    return (x * m).sum(1).to(wide) / m.sum(1).to(wide)


@torch.no_grad()
def collect_scores(model, sequences: list[list[int]], *, pad_id: int, batch_size: int = 8, progress: bool = True) -> ChannelScores:
    """Stream calibration batches through the model (on its device) and return per-channel importance scores."""
    layers = model.model.layers
    n_layers, hidden = len(layers), model.config.hidden_size
    inter = model.config.intermediate_size
    device = model_device(model)
    wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    hidden_sq = torch.zeros(hidden, dtype=wide, device=device)
    mlp_sq = torch.zeros(n_layers, inter, dtype=wide, device=device)
    state: dict = {}

    def on_norm(_module, _inputs, output):
        state["hidden"] += _masked_sequence_mean(output, state["mask"]).abs()

    def on_down(layer_index):
        def hook(_module, inputs):
            mean = _masked_sequence_mean(inputs[0], state["mask"])
            mlp_sq[layer_index] += (mean**2).sum(0)

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.input_layernorm.register_forward_hook(on_norm))
        handles.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
    tokens = 0
    # Longest first: fewer pad tokens per batch, and the slowest batch shows up in the ETA at once.
    ordered = sorted(sequences, key=len, reverse=True)
    try:
        for start in tqdm(range(0, len(ordered), batch_size), desc="calibrating", unit="batch", disable=not progress):
            ids, mask = (t.to(device) for t in left_pad(ordered[start : start + batch_size], pad_id))
            state["mask"] = mask
            state["hidden"] = torch.zeros(ids.shape[0], hidden, dtype=wide, device=device)
            model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False,
                  logits_to_keep=last_columns(1, ids.shape[1], device))
            hidden_sq += (state["hidden"] ** 2).sum(0)
            tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return ChannelScores(hidden=hidden_sq.sqrt().double().cpu(), mlp=mlp_sq.sqrt().double().cpu(), sequences=len(sequences),
                         tokens=tokens)


# ---------------------------------------------------------------- widths and selection


def _round_down(value: int, multiple: int) -> int:
    return (value // multiple) * multiple


def target_widths(model_config, config: PruneConfig) -> Widths:
    spec = arch.arch_of(model_config)
    full_hidden, full_mlp = model_config.hidden_size, model_config.intermediate_size
    hidden_ratio = config.ratio if config.hidden_ratio is None else config.hidden_ratio
    mlp_ratio = config.ratio if config.mlp_ratio is None else config.mlp_ratio
    # 1e-9 guards against (1 - 0.45) * 3072 landing a hair below an integer.
    hidden_req = config.hidden_size or math.floor((1 - hidden_ratio) * full_hidden + 1e-9)
    mlp_req = config.mlp_size or math.floor((1 - mlp_ratio) * full_mlp + 1e-9)
    if hidden_req > full_hidden:
        raise OverfillError(f"--hidden-size {hidden_req} is larger than the model's hidden size {full_hidden}: pick at most {full_hidden}")
    if mlp_req > full_mlp:
        raise OverfillError(f"--mlp-size {mlp_req} is larger than the model's MLP size {full_mlp}: pick at most {full_mlp}")
    hidden_multiple = config.multiple_of
    if spec.hidden_multiple_of_heads:
        hidden_multiple = math.lcm(hidden_multiple, model_config.num_attention_heads)
    hidden, mlp = _round_down(hidden_req, hidden_multiple), _round_down(mlp_req, config.multiple_of)
    if hidden < 1 or mlp < 1:
        raise OverfillError(
            f"pruned widths round down to zero (hidden {hidden_req}->{hidden} at multiple {hidden_multiple}, "
            f"MLP {mlp_req}->{mlp} at multiple {config.multiple_of}): use a smaller ratio or --multiple-of"
        )
    return Widths(hidden_req, hidden, mlp_req, mlp, hidden_multiple, config.multiple_of)


def top_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, sorted ascending so channel order is preserved."""
    # stable sort: ties (e.g. all-zero channels) resolve to the lower index, deterministically
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return torch.sort(order).values


# ---------------------------------------------------------------- slicing

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def slice_state_dict(state: dict[str, torch.Tensor], hidden_idx: torch.Tensor, mlp_idx: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply docs/design.md, "Pruning", step 5 to every weight; anything not on a pruned axis is copied unchanged."""
    out = {}
    for key, tensor in state.items():
        match = _LAYER_KEY.match(key)
        if match:
            layer, suffix = int(match.group(1)), match.group(2)
            keep_mlp = mlp_idx[layer]
            if suffix in arch.HIDDEN_VECTORS:
                tensor = tensor[hidden_idx]
            elif suffix in arch.HIDDEN_INPUT_COLUMNS:
                tensor = tensor[:, hidden_idx]
            elif suffix in arch.HIDDEN_OUTPUT_ROWS:
                tensor = tensor[hidden_idx]
            elif suffix in arch.MLP_IN:
                tensor = tensor[keep_mlp][:, hidden_idx]
            elif suffix in arch.MLP_IN_BIAS:
                tensor = tensor[keep_mlp]
            elif suffix == arch.MLP_OUT:
                tensor = tensor[hidden_idx][:, keep_mlp]
            elif suffix == arch.MLP_OUT_BIAS:
                tensor = tensor[hidden_idx]
            # q/k/v biases, Qwen3's per-head q_norm/k_norm: outputs and head_dim are untouched
        elif key in (arch.EMBEDDING, arch.LM_HEAD):
            tensor = tensor[:, hidden_idx]
        elif key == arch.FINAL_NORM:
            tensor = tensor[hidden_idx]
        out[key] = tensor.contiguous().clone()
    return out


def pruned_config(config, hidden: int, mlp: int):
    values = config.to_dict()
    # head_dim can no longer be derived as hidden_size / heads once D shrinks.
    values.update(hidden_size=hidden, intermediate_size=mlp, head_dim=arch.head_dim_of(config))
    return type(config).from_dict(values)


def slice_model(model, hidden_idx: torch.Tensor, mlp_idx: list[torch.Tensor]):
    """A new model of the same class holding the kept channels (tied embeddings stay tied)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    new_config = pruned_config(model.config, len(hidden_idx), len(mlp_idx[0]))
    device = model_device(model)  # slicing happens where the weights are
    state = slice_state_dict(model.state_dict(), hidden_idx.to(device), [idx.to(device) for idx in mlp_idx])
    # Parameters on the meta device (no random init of a model we overwrite), buffers such as
    # rotary inv_freq stay real.
    with init_empty_weights(include_buffers=False):
        pruned = AutoModelForCausalLM.from_config(new_config, dtype=model.dtype)
    tied = bool(getattr(new_config, "tie_word_embeddings", False))
    if tied:
        state.pop(arch.LM_HEAD, None)
    missing, unexpected = pruned.load_state_dict(state, strict=False, assign=True)
    if tied:
        pruned.lm_head.weight = pruned.model.embed_tokens.weight
        missing = [k for k in missing if k != arch.LM_HEAD]
    if missing or unexpected:
        raise OverfillError(f"internal: pruned weights do not fit the pruned model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    pruned.generation_config = model.generation_config
    return pruned.eval()


def stored_dtype(config) -> torch.dtype:
    """The dtype a model's weights are saved in, as its config records it (float32 where it records none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def count_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------- the whole step


def prune_model(model, tokenizer, config: PruneConfig, *, progress: bool = True) -> PruneResult:
    """Score, select and slice; returns the pruned model and its pruning record (nothing is written)."""
    started = time.perf_counter()
    spec = arch.arch_of(model.config)
    widths = target_widths(model.config, config)
    sequences = calibration_sequences(tokenizer, config)
    pad_id = pad_id_of(tokenizer)
    scores = collect_scores(model, sequences, pad_id=pad_id, batch_size=config.batch_size, progress=progress)
    hidden_idx = top_channels(scores.hidden, widths.hidden)
    mlp_idx = [top_channels(layer_scores, widths.mlp) for layer_scores in scores.mlp]
    pruned = slice_model(model, hidden_idx, mlp_idx)
    record = {
        "format": 1,
        "source_model": config.model,
        "source_fingerprint": fingerprint(model),
        "architecture": spec.model_type,
        "original": {"hidden_size": model.config.hidden_size, "intermediate_size": model.config.intermediate_size},
        "requested": {"hidden_size": widths.hidden_requested, "intermediate_size": widths.mlp_requested},
        "actual": {"hidden_size": widths.hidden, "intermediate_size": widths.mlp},
        "rounding": {"hidden_multiple": widths.hidden_multiple, "mlp_multiple": widths.mlp_multiple},
        "kept_layers": model.config.num_hidden_layers,
        "parameters": {"source": count_parameters(model), "pruned": count_parameters(pruned)},
        "calibration": {
            "source": config.calib_data,
            "sequences": scores.sequences,
            "tokens": scores.tokens,
            "max_len": config.calib_len,
            "batch_size": config.batch_size,
            "seed": config.seed,
        },
        "kept": {"hidden": hidden_idx.tolist(), "mlp": [idx.tolist() for idx in mlp_idx]},
        "config": asdict(config),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return PruneResult(model=pruned, record=record, extra={"scores": scores, "widths": widths})


def check_output_folder(out: str | Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OverfillError(f"output folder {out} exists and is not empty: pick another --out or pass --force to replace it")
    return out


def save_pruned(result: PruneResult, tokenizer, out: str | Path, *, force: bool = False) -> Path:
    """Write the HF folder + pruning.json to a temporary sibling, then rename it into place."""
    out = check_output_folder(out, force)
    with atomic_folder(out) as tmp:
        result.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pruning.json").write_text(json.dumps(result.record, indent=1) + "\n")
    result.out = out
    return out


def prune(config: PruneConfig, *, progress: bool = True) -> PruneResult:
    """Load the full model, prune it and save the result: what `overfill prune` runs."""
    # Everything that can be refused is refused before the model loads and a minute of calibration, not after.
    check_writable(config.out, "--out", staged_beside=True)  # first: a file named --out is not "a full folder"
    check_output_folder(config.out, config.force)
    if config.calib_data != BUNDLED_CALIBRATION:
        read_records(config.calib_data)  # a missing, empty or binary file; calibration reads it again, it is small
    location = resolve_model(config.model, quiet=not progress)
    source_config = load_config(location, trust_remote_code=config.trust_remote_code)
    arch.arch_of(source_config)
    # calibration runs in float32 (scores summed over many tokens); the decoder is saved in its model's dtype
    model, tokenizer = load_model(location, device=config.device, trust_remote_code=config.trust_remote_code)
    result = prune_model(model, tokenizer, config, progress=progress)
    result.model.to(device="cpu", dtype=stored_dtype(source_config))
    result.record["source_path"] = location
    save_pruned(result, tokenizer, config.out, force=config.force)
    return result
