"""Tensor helpers every stage shares: padding, mask-derived positions, the pad id, and teacher forcing's
inputs, labels and cross-entropy (written once for the OverFill loss, the standalone baselines and distillation),
and a state dict fit to save (`state_dict_to_save`).

Contexts are left-padded everywhere in overfill (so every row's last column is its last real
token, where the first reply token is predicted) and replies right-padded. Positions always
follow the attention mask, never the column: a padded row sees exactly the positions it would
see alone (docs/design.md, "Batching rules").
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys

import torch
import torch.nn.functional as F

IGNORE = -100  # label of a position that is not scored (cross_entropy's ignore_index)


def pad_id_of(tokenizer) -> int:
    """The id written into padded columns. Any id works (the mask hides it); many chat tokenizers
    have no pad token, so fall back to end-of-sequence, then 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def pad(sequences: list[list[int]], pad_id: int, *, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and mask, padded on the `side` ('left' or 'right').

    Not `tokenizer.pad`: it refuses tokenizers without a pad token (SmolLM2's among them) and
    needs a tokenizer where calibration, scoring and lm-eval only have token ids and a pad id.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        columns = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, columns] = torch.tensor(seq, dtype=torch.long)
        mask[row, columns] = 1
    return ids, mask


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contexts: the last column is every row's last real token, where the next token is predicted."""
    return pad(sequences, pad_id, side="left")


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replies: column i is reply token i + 1 in every row."""
    return pad(sequences, pad_id, side="right")


def positions_from_mask(mask: torch.Tensor, new_tokens: int | None = None,
                        past_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of the last `new_tokens` columns of `mask` (all of them by default), [B, new_tokens].

    `past_lengths` [B] counts real tokens already in a cache that the mask's columns continue.
    """
    columns = mask if new_tokens is None else mask[:, -new_tokens:]
    positions = columns.cumsum(-1) - 1
    if past_lengths is not None:
        positions = positions + past_lengths[:, None]
    return positions.clamp(min=0)


def last_columns(count: int, length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The last `count` of `length` columns as indices: what to pass HF models as `logits_to_keep`, never the count.

    Given a count, HF slices the hidden states ([B, count, H], a strided view of [B, T, H]), and on a strided
    3-D input `F.linear` cannot fold the batch into one matrix product: it multiplies every row by a copy of
    the LM head (B x 0.8 GB for Llama-3.2-3B's, measured on a CPU). Indices gather the rows into a contiguous
    tensor first, and the head is read once.
    """
    return torch.arange(length - count, length, device=device)


def context_and_reply(context_ids: torch.Tensor, context_mask: torch.Tensor, target_ids: torch.Tensor,
                      target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing's input columns: the left-padded context, then reply tokens y1..y_{N-1} (each predicts
    the next; yN predicts nothing) -> ids and mask [B, Tc + N - 1]."""
    ids = torch.cat([context_ids, target_ids[:, :-1]], dim=1)
    mask = torch.cat([context_mask, target_mask[:, :-1]], dim=1)
    return ids, mask


def reply_labels(target_ids: torch.Tensor, target_mask: torch.Tensor, first: int = 1) -> torch.Tensor:
    """Labels of reply tokens first+1..N, [B, N-first]; padding -> IGNORE. first=1 leaves y1 out (the full
    model's pick in OverFill mode), first=0 keeps it (a model that prefills for itself)."""
    return target_ids[:, first:].masked_fill(target_mask[:, first:] == 0, IGNORE)


def label_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of logits [B, M, V] against labels [B, M] over the labels that are not IGNORE, in
    float32 whatever the logits' dtype; and how many that is (the loop weights micro-batches by it)."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    return loss, int((labels != IGNORE).sum())


def state_dict_to_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each weight in storage of its own, as a safetensors file needs: a compiled step
    leaves a layer kind's weights as views into one stacked matrix (`_fuse`). A tied weight (one
    tensor under two names) stays shared, for transformers to store once."""
    state = model.state_dict()
    owners: dict[int, set] = {}
    for tensor in state.values():
        owners.setdefault(tensor.untyped_storage().data_ptr(), set()).add((tensor.data_ptr(), tensor.shape, tensor.stride()))
    return {name: tensor.clone() if len(owners[tensor.untyped_storage().data_ptr()]) > 1 else tensor
            for name, tensor in state.items()}


_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now


@functools.cache
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def in_mapped_file(address: int) -> bool:
    """Whether this address lies in a mapping of a file (e.g. a safetensors file), per the process's memory map."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, _, _, _, inode, *_ = line.split()
            low, high = (int(end, 16) for end in span.split("-"))
            if low <= address < high:
                return inode != "0"
    return False


def hand_back_pages(tensor: torch.Tensor, mapped: bool | None = None) -> bool:
    """Let the kernel reclaim the memory pages inside a CPU tensor that is being dropped while its storage lives on.

    A model loaded from safetensors holds its weights in one mapping of the file, which lives as long as any of
    them does: a weight replaced by a copy (the compiled step's fused layout) would keep its pages resident
    until the last weight of the file goes, so the model would be held twice meanwhile. A hint only, never a
    loss: a page written since it was read is kept (with no swap), a clean one is read from the file again if
    it is touched. Does nothing for a tensor outside a mapped file (dropping it frees it), on a GPU, or off Linux.
    True when the kernel took the hint. `mapped`: whether the tensor lies in a mapped file, when the caller
    already knows (slices of one weight), else read from the process's memory map.
    """
    if tensor.device.type != "cpu" or not sys.platform.startswith("linux") or not tensor.is_contiguous():
        return False
    if not (in_mapped_file(tensor.data_ptr()) if mapped is None else mapped):
        return False
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page  # whole pages only: a neighbour's bytes share the edge pages
    end = (tensor.data_ptr() + tensor.nbytes) // page * page
    # an old kernel answers EINVAL: nothing reclaimed, nothing lost
    return end > start and _madvise()(start, end - start, _MADV_PAGEOUT) == 0
