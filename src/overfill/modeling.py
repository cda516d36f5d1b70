"""OverFill's two stages and the one place where they meet (paper §3, Figure 1).

The paper's Figure 1 is `handoff`: the *prefill model* reads the context x in one parallel pass
(`prefill`) and its last logits give the first reply token y1; the *decode model* then reads and
extends that KV cache (`decode`) for y1, y2, ... Training (`OverFillModel.forward`), teacher-forced
scoring (evaluation.scoring) and generation (generation.generate_ids) all run these same three
functions, so what is evaluated is what was trained and what is served.

A mode only chooses the pair (`OverFillModel.stages`):

    overfill: prefill = frozen full model, decode = pruned decoder   (the paper's method)
    full:     prefill = full model,        decode = full model       (the quality ceiling)
    pruned:   prefill = decoder,           decode = decoder          (the paper's baseline)

Checkpoint folder (docs/design.md, "Checkpoint format"): overfill.json + decoder/ (a normal HF model folder).
Shapes: B rows, Tc context columns (left-padded), N reply tokens (right-padded), V vocabulary.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Final, Literal

import torch
from torch import nn
from transformers import DynamicCache

from overfill import arch
from overfill.atomic import atomic_folder, read_json_object
from overfill.errors import OverfillError
from overfill.fingerprint import fingerprint
from overfill.kv_cache import KVCache, crop_to
from overfill.loading import load_model, resolve_model, stored_folder
from overfill.tensors import (
    IGNORE,
    context_and_reply,
    label_cross_entropy,
    last_columns,
    positions_from_mask,
    reply_labels,
    state_dict_to_save,
)

Mode = Literal["overfill", "full", "pruned"]
MODES: Final[tuple[str, ...]] = typing.get_args(Mode)
CHECKPOINT_FORMAT: Final = 1  # overfill.json's "format"


def check_mode(mode: str, flag: str = "--mode") -> str:
    if mode not in MODES:
        raise OverfillError(f"{flag} got unknown mode '{mode}': pick one of {', '.join(MODES)}")
    return mode


# ---------------------------------------------------------------- the two stages


def prefill(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: DynamicCache | None = None,
            past_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, DynamicCache]:
    """Stage 1: `model` over a left-padded prompt in one pass -> (last-position logits [B, V], its KV cache).

    `attention_mask` covers cached plus new tokens, [B, T_cache + T_new]; `past_lengths` [B]
    counts real tokens already in `cache` (a chat continuing earlier turns).
    """
    cache = KVCache() if cache is None else cache
    positions = positions_from_mask(attention_mask, input_ids.shape[1], past_lengths)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                past_key_values=cache, use_cache=True,
                logits_to_keep=last_columns(1, input_ids.shape[1], input_ids.device))
    return out.logits[:, -1].float(), out.past_key_values


@torch.no_grad()
def prefill_with_reply(model: nn.Module, context_ids: torch.Tensor, context_mask: torch.Tensor, target_ids: torch.Tensor,
                       target_mask: torch.Tensor, logits_to_keep: int | torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
    """A model that does not train, once over context + reply inputs y1..y_{N-1} -> (logits, KV of all Tc + N - 1 columns).

    Teacher forcing for the prefill stage: logits_to_keep=N gives its predictions of y1..yN, [B, N, V]
    (column Tc - 1 predicts y1: contexts are left-padded). Attention is causal, so the KV of the first
    Tc columns is what `prefill` of the context alone gives; positions follow the mask.
    """
    inputs, mask = context_and_reply(context_ids, context_mask, target_ids, target_mask)  # [B, Tc + N - 1]
    out = model(input_ids=inputs, attention_mask=mask, position_ids=positions_from_mask(mask), past_key_values=KVCache(),
                use_cache=True, logits_to_keep=(last_columns(logits_to_keep, inputs.shape[1], inputs.device)
                                                      if isinstance(logits_to_keep, int) else logits_to_keep))
    return out.logits, out.past_key_values


def decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: DynamicCache,
           start: torch.Tensor) -> torch.Tensor:
    """Stage 2: `model` reads and extends another stage's `cache` -> next-token logits [B, T, V].

    input_ids [B, T] are reply tokens (one per row when generating, y1..y_{N-1} under teacher
    forcing); row b's first one sits at position start[b], its real token count so far, whatever
    its padding. `attention_mask` covers the cache plus these tokens.
    """
    positions = start[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)  # [B, T]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                past_key_values=cache, use_cache=True)
    return out.logits


@dataclass
class HandoffLogits:
    first: torch.Tensor  # [B, V] the prefill model's prediction of y1
    rest: torch.Tensor  # [B, N-1, V] the predictions of y2..yN
    by_prefill: torch.Tensor | None = None  # [N-1] bool: which of `rest` the prefill model made (refresh); None = none
    teacher: torch.Tensor | None = None  # [B, N-1, V] the prefill model's own predictions of y2..yN (handoff_with_teacher)


# (prefill_model, decode_model, context_ids, context_mask, target_ids, target_mask) -> HandoffLogits: `handoff`,
# `handoff_with_teacher`, or the refresh schedule (refresh.refreshed_handoff); callers pick one.
Handoff = Callable[[nn.Module, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], HandoffLogits]


def handoff(prefill_model: nn.Module, decode_model: nn.Module, context_ids: torch.Tensor, context_mask: torch.Tensor,
            target_ids: torch.Tensor, target_mask: torch.Tensor) -> HandoffLogits:
    """Figure 1 under teacher forcing: prefill the context, then decode the whole reply on that cache at once.

    The prefill stage never trains (in overfill mode it is the frozen full model), so it runs
    without gradients; the decode stage keeps them when the caller is training.
    """
    with torch.no_grad():
        first, cache = prefill(prefill_model, context_ids, context_mask)  # cache of x
    return HandoffLogits(first, decode_reply(decode_model, first, cache, context_ids, context_mask, target_ids, target_mask))


def handoff_with_teacher(prefill_model: nn.Module, decode_model: nn.Module, context_ids: torch.Tensor,
                         context_mask: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor) -> HandoffLogits:
    """`handoff` whose prefill model reads context + reply in one pass, so its own predictions of y2..yN come back
    too (distillation's teacher, train/distill_loss.py); the decoder reads that pass's KV cropped to the context:
    one prefill, not two."""
    logits, cache = prefill_with_reply(prefill_model, context_ids, context_mask, target_ids, target_mask,
                                       target_ids.shape[1])  # [B, N, V]
    crop_to(cache, context_ids.shape[1])  # cache of x
    first = logits[:, 0].float()
    return HandoffLogits(first, decode_reply(decode_model, first, cache, context_ids, context_mask, target_ids, target_mask),
                         teacher=logits[:, 1:])


def decode_reply(decode_model: nn.Module, first: torch.Tensor, cache: DynamicCache, context_ids: torch.Tensor,
                 context_mask: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """The decode stage under teacher forcing: y1..y_{N-1} on the context's `cache` -> predictions of y2..yN [B, N-1, V]."""
    inputs = target_ids[:, :-1]  # y1..y_{N-1} predict y2..yN
    if inputs.shape[1] == 0:
        return first.new_zeros(first.shape[0], 0, first.shape[-1])
    _, mask = context_and_reply(context_ids, context_mask, target_ids, target_mask)  # [B, Tc + N - 1]
    return decode(decode_model, inputs, mask, cache, start=context_mask.sum(-1))


# ---------------------------------------------------------------- the model


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether any layer recomputes activations (the flag its layers carry in every transformers 5.x)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Switch it off: transformers 5.23 names the method activation_checkpointing_disable, 5.19 gradient_..."""
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()


@dataclass
class OverFillOutput:
    loss: torch.Tensor  # mean cross-entropy over target tokens 2..N
    logits: torch.Tensor  # [B, N-1, V] decoder predictions of y2..yN
    tokens: int  # number of target tokens in the loss
    labels: torch.Tensor | None = None  # [B, N-1] y2..yN, IGNORE where a token is not in the loss
    teacher: torch.Tensor | None = None  # [B, N-1, V] the full model's predictions of y2..yN (via a teacher handoff)


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
    """A frozen full model and a width-pruned decoder that reads and extends its KV cache.

    `full` prefills the context and picks the first reply token; `decoder` (same layers, KV heads,
    head_dim and rotary settings, checked by `arch.check_compatible`) decodes every later token.
    Only the decoder trains: `forward` is its teacher-forced loss on reply tokens 2..N.
    `stages(mode)` gives the (prefill, decode) pair of a mode; `save_pretrained` /
    `from_pretrained` write and read an OverFill checkpoint folder, refusing a full model other
    than the one the decoder was trained against (by fingerprint).
    """

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

    def stages(self, mode: str) -> tuple[nn.Module, nn.Module]:
        """(prefill model, decode model) of a mode."""
        return {"overfill": (self.full, self.decoder), "full": (self.full, self.full),
                "pruned": (self.decoder, self.decoder)}[check_mode(mode)]

    def forward(self, context_ids: torch.Tensor, context_mask: torch.Tensor, target_ids: torch.Tensor,
                target_mask: torch.Tensor, via: Handoff = handoff) -> OverFillOutput:
        """Teacher-forced decoder loss on top of the frozen full model's context cache (paper §3.2).

        context_ids/mask [B, Tc] left-padded; target_ids/mask [B, N] right-padded (reply + end of
        turn). y1 is the full model's job, so the loss covers the decoder's predictions of y2..yN.
        `via` is the teacher-forced handoff the caller picks: `handoff` (Figure 1),
        `handoff_with_teacher` (the full model's predictions come back for distillation), or the
        refresh schedule (refresh.refreshed_handoff: the decoder reads full-model KV for the blocks
        before its own, and the tokens the full model picks after each block leave the loss too).
        It is an argument, not a choice made here, so that the training wrapper (DDP) still runs
        the whole loss inside this forward.
        """
        if target_ids.shape[1] < 2:
            raise OverfillError("targets need at least 2 tokens: the decoder's loss covers target tokens 2..N")
        if self.decoder.training and activation_checkpointing(self.decoder):
            # transformers' checkpointed layers silently drop past_key_values: the decoder would train
            # without the full model's context (docs/design.md, "Traps in transformers 5.x").
            raise OverfillError("gradient checkpointing drops the full model's cache from the decoder's layers: "
                                "disable it on the decoder (modeling.disable_activation_checkpointing(decoder))")
        stages = via(self.full, self.decoder, context_ids, context_mask, target_ids, target_mask)
        labels = reply_labels(target_ids, target_mask)  # [B, N-1]
        if stages.by_prefill is not None:
            labels = labels.masked_fill(stages.by_prefill[None, :], IGNORE)  # the full model's picks, not the decoder's
        loss, tokens = label_cross_entropy(stages.rest, labels)
        return OverFillOutput(loss=loss, logits=stages.rest, tokens=tokens, labels=labels, teacher=stages.teacher)

    # ------------------------------------------------------------ identity

    @property
    def full_fingerprint(self) -> str:
        """Of the full model's weights as stored (its files, where its source is known), whatever dtype they run in."""
        if self._full_fingerprint is None:
            self._full_fingerprint = fingerprint(self.full, stored=stored_folder(self.full_source))
        return self._full_fingerprint

    # ------------------------------------------------------------ save / load

    def save_pretrained(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write overfill.json + decoder/ to a temporary sibling, then rename it into place.

        A bfloat16 or int8 decoder (precision.set_decoder_dtype) is recorded as overfill.json's
        "decoder_dtype" and comes back so on loading; an int8 one is saved as the float32 weights
        its int8 values stand for (a plain model folder) plus the int8 values themselves.
        """
        from overfill.precision import DECODER_DTYPES, decoder_dtype, float_copy, save_int8

        folder = Path(folder)
        dtype = decoder_dtype(self.decoder)
        with atomic_folder(folder) as tmp:
            saved = float_copy(self.decoder) if dtype == "int8" else self.decoder
            saved.save_pretrained(tmp / "decoder", state_dict=state_dict_to_save(saved))
            if dtype == "int8":
                save_int8(self.decoder, tmp / "decoder")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp / "decoder")
            meta = {
                "format": CHECKPOINT_FORMAT,
                "full_model": self.full_source,
                "full_fingerprint": self.full_fingerprint,
                "decoder": "decoder",
                "pruning": {k: v for k, v in self.pruning.items() if k != "kept"},
                # a dtype of the decoder alone; one both models share (e.g. float16) is the loader's --dtype
                **({"decoder_dtype": dtype} if dtype in DECODER_DTYPES and dtype != "float32" else {}),
                **(extra or {}),
            }
            (tmp / "overfill.json").write_text(json.dumps(meta, indent=1) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, full_model: str | nn.Module | None = None, *,
                        dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                        decoder_dtype: str | None = None, device: str | torch.device = "cpu") -> "OverFillModel":
        """Load a checkpoint folder onto `device`; the full model defaults to the one recorded in overfill.json,
        the decoder's dtype (precision.py) to the recorded one, else `dtype`."""
        folder = Path(folder)
        meta = read_checkpoint_meta(folder)
        if meta.get("decoder_dtype") is not None:
            from overfill.precision import DECODER_DTYPES

            if meta["decoder_dtype"] not in DECODER_DTYPES:
                raise OverfillError(f"{folder / 'overfill.json'} records decoder_dtype {meta['decoder_dtype']!r}, which this "
                                    f"overfill does not know ({', '.join(DECODER_DTYPES)}): upgrade overfill, or re-save "
                                    "the checkpoint")
        tokenizer = None
        chosen = decoder_dtype or meta.get("decoder_dtype")
        decoder_folder = str(folder / meta.get("decoder", "decoder"))
        resolve_model(decoder_folder, quiet=True)  # a missing decoder folder is refused before the full model loads
        if full_model is None or isinstance(full_model, str):
            source = full_model or meta.get("full_model")
            if not source:
                raise OverfillError(f"{folder}/overfill.json names no full model: pass the full model explicitly")
            full, tokenizer = load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code, quiet=True)
        else:
            full, source = full_model, None
        decoder, decoder_tokenizer = load_model(decoder_folder, dtype=_loaded_dtype(dtype, chosen),
                                                device=device, trust_remote_code=trust_remote_code, quiet=True)
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
        if full_model is not None and not isinstance(full_model, str):
            _ = model.full_fingerprint  # of the module handed in, before it is named after the recorded model
            model.full.to(device)  # a module handed in: on the device asked for, in its dtype unless one is asked
            if dtype != torch.float32:
                model.full.to(dtype)
        model.full_source = model.full_source or meta.get("full_model")
        model.set_decoder_dtype(chosen)
        if chosen == "int8":
            from overfill.precision import restore_int8

            restore_int8(model.decoder, folder / meta.get("decoder", "decoder"))
        return model

    @classmethod
    def from_pair(cls, full_model: str, decoder: str, *, dtype: torch.dtype = torch.float32,
                  trust_remote_code: bool = False, decoder_dtype: str | None = None,
                  device: str | torch.device = "cpu") -> "OverFillModel":
        """A full model and a decoder folder (e.g. from `overfill prune`), checked against each other."""
        full, tokenizer = load_model(full_model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, quiet=True)
        dec, dec_tokenizer = load_model(decoder, dtype=_loaded_dtype(dtype, decoder_dtype), device=device,
                                        trust_remote_code=trust_remote_code, quiet=True)
        pruning = {}
        record_path = Path(resolve_model(decoder, quiet=True)) / "pruning.json"
        if record_path.is_file():
            pruning = read_json_object(record_path, "prune the decoder again (`overfill prune`)")
        model = cls(full, dec, tokenizer, full_source=full_model, decoder_tokenizer=dec_tokenizer, pruning=pruning)
        expected = pruning.get("source_fingerprint")
        if expected and model.full_fingerprint != expected:
            raise OverfillError(
                f"decoder {decoder} was pruned from another model than {full_model} "
                f"(fingerprint {model.full_fingerprint[:12]} != {expected[:12]}): pair it with its source model"
            )
        return model.set_decoder_dtype(decoder_dtype)

    def set_decoder_dtype(self, decoder_dtype: str | None) -> "OverFillModel":
        """The decoder alone in `decoder_dtype` (precision.py: float32, bfloat16 or int8, whose kernels depend on the
        device), behind the full model and KV cache in theirs; None leaves it as loaded."""
        from overfill.precision import decoder_dtype as current
        from overfill.precision import set_decoder_dtype

        if not decoder_dtype or decoder_dtype == current(self.decoder):
            return self
        if decoder_dtype == "float32":
            self.decoder.float()
        else:
            set_decoder_dtype(self.decoder, decoder_dtype)
        return self


def _loaded_dtype(dtype: torch.dtype, decoder_dtype: str | None) -> torch.dtype:
    """The dtype a decoder's weights are read in: a float decoder dtype's own, else the model's (int8 converts from it)."""
    return getattr(torch, decoder_dtype) if decoder_dtype in ("float32", "bfloat16") else dtype


def read_checkpoint_meta(folder: Path) -> dict:
    meta_path = folder / "overfill.json"
    if not meta_path.is_file():
        raise OverfillError(f"{folder} is not an OverFill checkpoint (no overfill.json): pass a folder written by `overfill train`, or --model with --decoder")
    meta = read_json_object(meta_path, "re-create the checkpoint")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise OverfillError(f"{meta_path} has format {meta.get('format')}, this overfill reads format {CHECKPOINT_FORMAT}: upgrade overfill")
    return meta
