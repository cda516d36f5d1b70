"""Tiny randomly initialised models and a tiny tokenizer for the tests (no downloads; overfill.bench.synthetic)."""

from __future__ import annotations

import functools
import json

# The builders live in the package, where the GPU check uses them too. TINY_CONFIGS holds one config per family of
# overfill.arch.ARCHS (test_arch checks it): a new family adds its tiny config there.
from overfill.bench.synthetic import KINDS, VOCAB, tiny_model  # noqa: F401 - the tests import them from here
from overfill.bench.synthetic import TINY_CONFIGS as CONFIGS  # noqa: F401
from overfill.bench.synthetic import byte_tokenizer as tiny_tokenizer


@functools.cache
def tiny_pruned(kind: str = "llama"):
    """(full model, decoder pruned from it at ratio 0.5), built once per session: callers must not edit them."""
    from overfill.prune import PruneConfig, prune_model

    full = tiny_model(kind)
    return full, prune_model(full, tiny_tokenizer(), PruneConfig(ratio=0.5), progress=False).model


def save_tiny(folder, kind: str = "llama", seed: int = 0):
    model, tok = tiny_model(kind, seed), tiny_tokenizer()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
