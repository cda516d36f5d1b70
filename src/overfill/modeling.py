"""OverFillModel: a frozen full model and a trainable, cache-compatible pruned decoder (paper §3).

Figure 1 of the paper in code: `prefill` runs the full model over the context x and returns its
KV cache and last logits (the first reply token y1 comes from them); the decoder then reads that
cache and appends its own KV for y1, y2, ... Training (`forward`) is the same picture under
teacher forcing: full model on x without gradients, decoder on y with x's cache as its past,
cross-entropy on the decoder's predictions of y2..yN only (y1 is the full model's job).

Checkpoint folder (DESIGN §2): overfill.json + decoder/ (a normal HF model folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from overfill import arch
from overfill.atomic import atomic_folder
from overfill.errors import OverfillError
from overfill.generation import prefill
from overfill.zoo import fingerprint, load_model, resolve_model

CHECKPOINT_FORMAT = 1
IGNORE = -100


@dataclass
class OverFillOutput:
    loss: torch.Tensor  # mean cross-entropy over target tokens 2..N
    logits: torch.Tensor  # [B, N-1, V] decoder predictions of y2..yN
    tokens: int  # number of target tokens in the loss


def check_same_tokenizer(full_tokenizer, decoder_tokenizer) -> None:
    if full_tokenizer is None or decoder_tokenizer is None:
        return
    if full_tokenizer.get_vocab() != decoder_tokenizer.get_vocab():
        raise OverfillError("the decoder's tokenizer differs from the full model's (vocabulary): both must use the same tokenizer")
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        a, b = getattr(full_tokenizer, name), getattr(decoder_tokenizer, name)
        if a != b:
            raise OverfillError(f"the decoder's tokenizer differs from the full model's: {name} is {b}, not {a}")


class OverFillModel(nn.Module):
    def __init__(self, full: nn.Module, decoder: nn.Module, tokenizer=None, *, full_source: str | None = None,
                 decoder_tokenizer=None, pruning: dict | None = None):
        super().__init__()
        arch.check_compatible(full.config, decoder.config)
        check_same_tokenizer(tokenizer, decoder_tokenizer)
        self.full = full.eval().requires_grad_(False)  # frozen: only the decoder is trained
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.full_source = full_source
        self.pruning = pruning or {}
        self._full_fingerprint: str | None = None

    def train(self, mode: bool = True) -> "OverFillModel":
        """Train or eval the decoder; the frozen full model always stays in eval mode (no dropout)."""
        super().train(mode)
        self.full.eval()
        return self

    # ------------------------------------------------------------ the two stages

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Full model over a left-padded context: (KV cache, last-position logits [B, V])."""
        logits, cache = prefill(self.full, input_ids, attention_mask)
        return cache, logits

    def forward(self, context_ids: torch.Tensor, context_mask: torch.Tensor, target_ids: torch.Tensor,
                target_mask: torch.Tensor) -> OverFillOutput:
        """Teacher-forced decoder loss on top of the frozen full model's context cache.

        context_ids/mask [B, Tc] left-padded; target_ids/mask [B, N] right-padded (reply + end of turn).
        """
        if target_ids.shape[1] < 2:
            raise OverfillError("targets need at least 2 tokens: the decoder's loss covers target tokens 2..N")
        if self.decoder.training and any(getattr(m, "gradient_checkpointing", False) for m in self.decoder.modules()):
            # transformers' checkpointed layers silently drop past_key_values: the decoder would train
            # without the full model's context (DESIGN §4).
            raise OverfillError("gradient checkpointing drops the full model's cache from the decoder's layers: "
                                "disable it on the decoder (decoder.gradient_checkpointing_disable())")
        cache, _ = self.prefill(context_ids, context_mask)
        # The decoder sees y1..y_{N-1} and predicts y2..yN; positions continue from each row's
        # own context length, whatever its padding.
        inputs, labels = target_ids[:, :-1], target_ids[:, 1:].masked_fill(target_mask[:, 1:] == 0, IGNORE)
        mask = torch.cat([context_mask, target_mask[:, :-1]], dim=1)  # [B, Tc + N - 1]
        positions = context_mask.sum(-1, keepdim=True) + torch.arange(inputs.shape[1], device=inputs.device)  # [B, N-1]
        out = self.decoder(input_ids=inputs, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        return OverFillOutput(loss=loss, logits=out.logits, tokens=int((labels != IGNORE).sum()))

    # ------------------------------------------------------------ identity

    @property
    def full_fingerprint(self) -> str:
        if self._full_fingerprint is None:
            self._full_fingerprint = fingerprint(self.full)
        return self._full_fingerprint

    # ------------------------------------------------------------ save / load

    def save_pretrained(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write overfill.json + decoder/ to a temporary sibling, then rename it into place."""
        folder = Path(folder)
        with atomic_folder(folder) as tmp:
            self.decoder.save_pretrained(tmp / "decoder")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp / "decoder")
            meta = {
                "format": CHECKPOINT_FORMAT,
                "full_model": self.full_source,
                "full_fingerprint": self.full_fingerprint,
                "decoder": "decoder",
                "pruning": {k: v for k, v in self.pruning.items() if k != "kept"},
                **(extra or {}),
            }
            (tmp / "overfill.json").write_text(json.dumps(meta, indent=1) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, full_model: str | nn.Module | None = None, *,
                        dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> "OverFillModel":
        """Load a checkpoint folder; the full model defaults to the one recorded in overfill.json."""
        folder = Path(folder)
        meta = read_checkpoint_meta(folder)
        tokenizer = None
        if full_model is None or isinstance(full_model, str):
            source = full_model or meta.get("full_model")
            if not source:
                raise OverfillError(f"{folder}/overfill.json names no full model: pass the full model explicitly")
            full, tokenizer = load_model(source, dtype=dtype, trust_remote_code=trust_remote_code, quiet=True)
        else:
            full, source = full_model, None
        decoder, decoder_tokenizer = load_model(str(folder / meta.get("decoder", "decoder")), dtype=dtype,
                                                trust_remote_code=trust_remote_code, quiet=True)
        model = cls(full, decoder, tokenizer or decoder_tokenizer, full_source=source,
                    decoder_tokenizer=decoder_tokenizer, pruning=meta.get("pruning"))
        expected = meta.get("full_fingerprint")
        if expected and model.full_fingerprint != expected:
            given = f"the full model given ({source})" if source else "the full model given"
            raise OverfillError(
                f"{given} is not the one this decoder was trained against "
                f"(fingerprint {model.full_fingerprint[:12]} != {expected[:12]}): pass the original full model"
                + (f" ({meta['full_model']})" if meta.get("full_model") else "")
            )
        model.full_source = model.full_source or meta.get("full_model")
        return model

    @classmethod
    def from_pair(cls, full_model: str, decoder: str, *, dtype: torch.dtype = torch.float32,
                  trust_remote_code: bool = False) -> "OverFillModel":
        """A full model and a decoder folder (e.g. from `overfill prune`), checked against each other."""
        full, tokenizer = load_model(full_model, dtype=dtype, trust_remote_code=trust_remote_code, quiet=True)
        dec, dec_tokenizer = load_model(decoder, dtype=dtype, trust_remote_code=trust_remote_code, quiet=True)
        pruning = {}
        record_path = Path(resolve_model(decoder, quiet=True)) / "pruning.json"
        if record_path.is_file():
            pruning = json.loads(record_path.read_text())
        model = cls(full, dec, tokenizer, full_source=full_model, decoder_tokenizer=dec_tokenizer, pruning=pruning)
        expected = pruning.get("source_fingerprint")
        if expected and model.full_fingerprint != expected:
            raise OverfillError(
                f"decoder {decoder} was pruned from another model than {full_model} "
                f"(fingerprint {model.full_fingerprint[:12]} != {expected[:12]}): pair it with its source model"
            )
        return model


def read_checkpoint_meta(folder: Path) -> dict:
    meta_path = folder / "overfill.json"
    if not meta_path.is_file():
        raise OverfillError(f"{folder} is not an OverFill checkpoint (no overfill.json): pass a folder written by `overfill train`, or --model with --decoder")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise OverfillError(f"{meta_path} is corrupt ({err.msg}): re-create the checkpoint") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise OverfillError(f"{meta_path} has format {meta.get('format')}, this overfill reads format {CHECKPOINT_FORMAT}: upgrade overfill")
    return meta


def load_overfill(checkpoint: str | None = None, *, model: str | None = None, decoder: str | None = None,
                  dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> OverFillModel:
    """What the CLI calls: a checkpoint folder, or --model + --decoder (decoder defaults to the model itself)."""
    if checkpoint:
        return OverFillModel.from_pretrained(checkpoint, model, dtype=dtype, trust_remote_code=trust_remote_code)
    if not model:
        raise OverfillError("pass an OverFill checkpoint folder, or --model (and --decoder, a pruned folder)")
    if not decoder:
        raise OverfillError("--model needs --decoder (a folder from `overfill prune` or `overfill train`)")
    return OverFillModel.from_pair(model, decoder, dtype=dtype, trust_remote_code=trust_remote_code)
