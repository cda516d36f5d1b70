"""Tensor helpers every stage shares: padding, mask-derived positions, the pad id, the ignored label.

Contexts are left-padded everywhere in overfill (so every row's last column is its last real
token, where the first reply token is predicted) and replies right-padded. Positions always
follow the attention mask, never the column: a padded row sees exactly the positions it would
see alone (DESIGN §2 "Batching rules").
"""

from __future__ import annotations

import torch

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
