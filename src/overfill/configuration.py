"""One configuration of the two-stage model, and its one name, the same in `overfill bench`, `eval` and `frontier`.

A configuration is a mode (paper §3: overfill, or the full or pruned model alone) and the dials that vary
it: the decoder's dtype, prefill refresh every K tokens, speculative decoding with K drafts per pass of the
full model (drafting on the full model's cache, or on a cache of its own: /pruned), the compiled decode step,
and the checkpoint it comes from. Its name is written

    MODE[@DTYPE][+refreshK][+specK[/DRAFTER]][+compiled][:CHECKPOINT]

e.g. `overfill`, `full+compiled`, `overfill@int8+spec4/pruned`, `overfill+refresh16:runs/r`. The dials are
`+` parts, in any order when read and in this order when written, so `parse(c.name) == c`; everything after
the first `:` is the checkpoint folder. Without `+compiled` the step is eager in `overfill bench`; `eval` and
`frontier` let their `--compile` flag decide for such entries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from overfill.errors import OverfillError
from overfill.generation import DRAFTERS, GenerationConfig
from overfill.modeling import MODES
from overfill.precision import DECODER_DTYPES

GRAMMAR = "MODE[@DTYPE][+refreshK][+specK[/DRAFTER]][+compiled][:CHECKPOINT]"
EXAMPLE = "overfill@int8+spec4/pruned"
COMPILED = "compiled"  # the dial of the compiled decode step


@dataclass(frozen=True)
class Configuration:
    mode: str  # overfill | full | pruned
    decoder_dtype: str | None = None  # the decoder's dtype (None: the command's --decoder-dtype)
    refresh_every: int = 0  # prefill refresh every K reply tokens (overfill; 0 = off)
    draft_tokens: int = 0  # speculative decoding, K draft tokens per pass of the full model (overfill; 0 = off)
    drafter: str = "overfill"  # speculative: drafts on the full model's cache (overfill) or on its own (pruned)
    compiled: bool = False  # decode with the compiled step (decode_step.py) instead of the model's own forward
    checkpoint: str | None = None  # OverFill checkpoint folder (None: the command's shared model source)

    def __post_init__(self):
        what = f"configuration '{self.name}'"
        if self.mode not in MODES:
            raise OverfillError(f"{what} has unknown mode '{self.mode}': pick one of {', '.join(MODES)}")
        if self.decoder_dtype is not None and self.decoder_dtype not in DECODER_DTYPES:
            raise OverfillError(f"{what} has unknown decoder dtype '{self.decoder_dtype}': pick one of "
                                f"{', '.join(DECODER_DTYPES)}")
        if self.mode != "overfill" and (self.decoder_dtype or self.refresh_every or self.draft_tokens):
            raise OverfillError(f"{what}: @DTYPE, +refreshK and +specK vary OverFill's decoder; {self.mode} takes none "
                                f"(write overfill{self.dials})")
        if self.refresh_every < 0 or self.draft_tokens < 0:
            raise OverfillError(f"{what}: +refreshK and +specK take K of at least 1")
        if self.refresh_every and self.draft_tokens:
            raise OverfillError(f"{what}: a speculative configuration's replies are the full model's own, which refresh "
                                "would not change: drop +refreshK or +specK")
        if self.drafter not in DRAFTERS:
            raise OverfillError(f"{what} has unknown drafter '{self.drafter}': pick one of {', '.join(DRAFTERS)}")
        if self.drafter != "overfill" and not self.draft_tokens:
            raise OverfillError(f"{what}: a drafter belongs to +specK (e.g. +spec4/{self.drafter})")

    @property
    def dials(self) -> str:
        """The name's part after the mode and before the checkpoint, e.g. '@int8+spec4/pruned+compiled'."""
        return (f"@{self.decoder_dtype}" if self.decoder_dtype else "") + \
            (f"+refresh{self.refresh_every}" if self.refresh_every else "") + \
            (f"+spec{self.draft_tokens}" + ("" if self.drafter == "overfill" else f"/{self.drafter}")
             if self.draft_tokens else "") + \
            (f"+{COMPILED}" if self.compiled else "")

    @property
    def label(self) -> str:
        """The name without its checkpoint: what a row or an entry is called in tables, JSON and plots."""
        return self.mode + self.dials

    @property
    def name(self) -> str:
        """The canonical name: `parse(c.name) == c`."""
        return self.label + (f":{self.checkpoint}" if self.checkpoint else "")

    def __str__(self) -> str:
        return self.name

    @property
    def plain(self) -> bool:
        """No dials: the mode as it comes (eager unless the command says otherwise)."""
        return not self.dials

    @property
    def generation_mode(self) -> str:
        """The loop's mode: a speculative configuration is OverFill's decoder drafting for the full model."""
        return "speculative" if self.draft_tokens else self.mode

    @property
    def scoring_mode(self) -> str:
        """The mode its teacher-forced scores come from: speculative decoding's replies are the full model's own."""
        return "full" if self.draft_tokens else self.mode

    def generation(self, max_new_tokens: int, compile: bool | None = None) -> GenerationConfig:
        """Its generation settings; `compile` decides the step where the name does not say +compiled."""
        return GenerationConfig(mode=self.generation_mode, max_new_tokens=max_new_tokens, refresh_every=self.refresh_every,
                                draft_tokens=self.draft_tokens or GenerationConfig.draft_tokens, drafter=self.drafter,
                                compile=True if self.compiled else compile)


_DIAL = re.compile(r"refresh(?P<refresh>\d+)|spec(?P<spec>\d+)(?:/(?P<drafter>\w+))?|(?P<compiled>compiled)")
# Names `overfill bench` wrote before it shared this grammar, and what they are now.
_OLD_SPECULATIVE = re.compile(r"speculative(\d+)(/\w+)?")


def parse(text: str) -> Configuration:
    """The configuration named `text` (see the module's docstring); one error line naming the fix if it is not one."""
    text = text.strip()
    body, colon, checkpoint = text.partition(":")
    checkpoint = checkpoint.strip()
    form = f"write {GRAMMAR}, e.g. {EXAMPLE}"
    if colon and not checkpoint:
        raise OverfillError(f"configuration '{text}' ends in ':' without a checkpoint folder: {form}")
    head, *dials = body.strip().split("+")
    old = _OLD_SPECULATIVE.fullmatch(head)
    if old or checkpoint == COMPILED:  # a name `overfill bench` wrote before: say what it is called now
        new = "+".join((f"overfill+spec{old[1]}{old[2] or ''}" if old else head, *dials))
        new += f"+{COMPILED}" if checkpoint == COMPILED else (f":{checkpoint}" if checkpoint else "")
        folder = f" (a checkpoint folder named '{COMPILED}' is ./{COMPILED})" if checkpoint == COMPILED else ""
        raise OverfillError(f"configuration '{text}' is an old spelling: write {new}{folder}")
    mode, at, dtype = head.partition("@")
    if mode not in MODES:
        raise OverfillError(f"configuration '{text}' has unknown mode '{mode}': {form}, MODE one of {', '.join(MODES)}")
    if at and not dtype:
        raise OverfillError(f"configuration '{text}': '@' needs a dtype, one of {', '.join(DECODER_DTYPES)}")
    found: dict[str, object] = {}
    for dial in dials:
        match = _DIAL.fullmatch(dial.strip())
        if not match:
            raise OverfillError(f"configuration '{text}' has unknown dial '+{dial}': {form}")
        key = next(k for k in ("refresh", "spec", "compiled") if match[k])
        if key in found:
            raise OverfillError(f"configuration '{text}' gives +{key} twice: keep one")
        found[key] = match
    refresh, spec = found.get("refresh"), found.get("spec")
    if (refresh and int(refresh["refresh"]) < 1) or (spec and int(spec["spec"]) < 1):
        raise OverfillError(f"configuration '{text}': +refreshK and +specK take K of at least 1")
    return Configuration(mode, decoder_dtype=dtype or None, refresh_every=int(refresh["refresh"]) if refresh else 0,
                         draft_tokens=int(spec["spec"]) if spec else 0,
                         drafter=(spec["drafter"] if spec else None) or "overfill",
                         compiled="compiled" in found, checkpoint=checkpoint or None)
