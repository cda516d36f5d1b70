"""Which full model a decoder belongs to: a cheap hash that checkpoints record and loading compares.

The decoder is trained against one specific frozen full model; another one, even of the same
architecture, would decode garbage from its cache, so loading refuses it (modeling.py).

The hash samples the weights as stored: where the model's folder is known, the samples are read from
its safetensors files (a few rows of each tensor), so a model loaded in another dtype than it was
saved in (a float32 checkpoint served in bfloat16) has its files' fingerprint, and no float32 copy is
needed to compute it. A model without a folder is sampled in memory, which is the same thing when it
holds the stored values.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

# Config fields that describe where or how a model was saved rather than what it computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash"}
SAMPLES = 256  # values per tensor, spread evenly over it: costs microseconds, sees every region


def _sample_positions(numel: int) -> torch.Tensor:
    return torch.arange(0, numel, max(1, numel // SAMPLES))[:SAMPLES]


def _in_memory(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // SAMPLES)][:SAMPLES].to(torch.float32).cpu()


def _from_file(stored) -> torch.Tensor:
    """The same samples read from a safetensors slice: only the rows that hold them."""
    shape = stored.get_shape()
    numel = int(torch.tensor(shape).prod()) if shape else 1
    positions = _sample_positions(numel)
    if len(shape) <= 1:
        return stored[:].reshape(-1)[positions].to(torch.float32)
    row = numel // shape[0]
    needed, which = torch.unique(positions // row, return_inverse=True)
    rows = torch.stack([stored[r:r + 1].reshape(-1) for r in needed.tolist()])  # [rows needed, row]
    return rows[which, positions % row].to(torch.float32)


def fingerprint(model, stored: str | Path | None = None) -> str:
    """sha256 of the model's config and a sample of every weight: cheap, yet changes with any retraining.
    `stored`: the folder the model was loaded from, whose files are sampled instead (see the module docstring)."""
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    state = model.state_dict()
    with contextlib.ExitStack() as files:
        slices = _stored_slices(stored, files) if stored is not None else {}
        # a tied weight (an LM head tied to the embedding) is stored once, under one of its names
        stored_name = {state[name].data_ptr(): name for name in state if name in slices}
        for name, tensor in sorted(state.items()):
            source = name if name in slices else stored_name.get(tensor.data_ptr())
            sample = _from_file(slices[source]) if source else _in_memory(tensor)
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(sample.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _stored_slices(folder: str | Path, files: contextlib.ExitStack) -> dict:
    from safetensors import safe_open

    slices = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        handle = files.enter_context(safe_open(path, framework="pt"))
        slices.update({key: handle.get_slice(key) for key in handle.keys()})
    return slices
