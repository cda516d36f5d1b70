"""Which full model a decoder belongs to: a cheap hash that checkpoints record and loading compares.

The decoder is trained against one specific frozen full model; another one, even of the same
architecture, would decode garbage from its cache, so loading refuses it (modeling.py).
"""

from __future__ import annotations

import hashlib
import json

import torch

# Config fields that describe where or how a model was saved rather than what it computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash"}


def fingerprint(model) -> str:
    """sha256 of the model's config and a sample of every weight: cheap, yet changes with any retraining."""
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        # 256 values spread evenly over the whole tensor: costs microseconds, sees every region.
        sample = flat[:: max(1, flat.numel() // 256)][:256].to(torch.float32).cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()
