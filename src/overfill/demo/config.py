"""`overfill demo`'s settings: one dataclass whose fields are the command's flags and the Python API's arguments."""

from __future__ import annotations

import math
from dataclasses import dataclass

from overfill.config import Settings, at_least
from overfill.devices import resolve_device
from overfill.engines import EngineOrAuto
from overfill.errors import OverfillError
from overfill.train.config import LOSSES, Loss
from overfill.zoo import DEFAULT_MODEL

# Preset -> (training prompts, reply tokens, optimizer steps, held-out prompts); see DemoConfig's docstring.
PRESETS = {"default": (320, 96, 80, 32), "quick": (32, 40, 8, 12)}


@dataclass
class DemoConfig(Settings):
    """The general-purpose recipe at demo scale: distil the full model's own replies, train both decoders on them,
    measure agreement with the full model on held-out prompts, and chat with all three.

    Presets, timed on this project's 2-core CPU in float32 with the bundled SmolLM2-135M and the demo's 0.25
    decoder (report.md's "where the time went" has a run's own split):

    - default (21 minutes measured with vLLM installed, about 28 without): the bundled model is pruned (half a
      minute), the full model answers 320 training prompts with replies of up to 96 tokens (under 2 minutes on
      vLLM, 9 on our loop; cached, a rerun reuses them), each decoder trains 80 steps x 8 examples on them with
      --loss ce (7 and 8 minutes: the pruned baseline also runs its decoder with gradients over each prompt),
      32 held-out prompts are evaluated (3 minutes), 4 are answered in the chat comparison (1);
    - --quick (about 4 minutes): 32 training prompts, replies of up to 40 tokens, 8 steps x 8, 12 held-out
      prompts. A check that everything runs: its decoders do not yet write sense.

    Explicit --prompts, --max-new-tokens, --steps and --heldout override the preset's value.
    """

    model: str = DEFAULT_MODEL
    """Full model: a zoo name, a local HF folder or a hub id."""
    ratio: float = 0.25
    """Pruning ratio of the decoder. The paper's 0.45 needs far more training than 20 minutes to write sense: after 48 steps on the same replies, validation NLL 4.0 at 0.45, 2.4 at 0.25."""
    out: str = "runs/demo"
    """Report folder (report.md, PNGs, the pruned model, the cached replies, both trained decoders, evaluation)."""
    quick: bool = False
    """About 4 minutes instead of about 20, to check that everything runs: 32 prompts, 40-token replies, 8 steps, 12 held out."""
    prompts: int | None = None
    """Training prompts the full model answers; its replies are the training data (preset: 320; quick 32)."""
    max_new_tokens: int | None = None
    """Reply length limit in tokens, for the full model's replies, the evaluation and the chat (preset: 96; quick 40)."""
    steps: int | None = None
    """Optimizer steps for each of the two decoders (preset: 80; quick 8)."""
    batch_size: int = 8
    """Examples per step."""
    lr: float = 5e-4
    """Peak learning rate (cosine schedule, 5% warmup)."""
    loss: Loss = "ce"
    """What both decoders optimise, as `overfill train --loss`: ce (the full model's reply tokens), kd (its next-token distributions) or ce+kd (both, half each). ce by default: kd was a little better per step in the loss trials (docs/recipes.md) but cost 2.3x the time per step, so ce wins at the same time."""
    engine: EngineOrAuto = "auto"
    """What generates the full model's training replies, as `overfill distill --engine`: auto (vLLM when it is installed, else torch), torch (our own loop) or vllm; greedy replies are the same tokens on both."""
    heldout: int | None = None
    """Held-out prompts to evaluate, on topics no training prompt mentions (preset: 32; quick 12)."""
    prompt: str | None = None
    """A prompt of your own for the chat comparison at the end, answered after the held-out ones."""
    seed: int = 0
    """Seed for the prompt order and the training order."""
    device: str = "auto"
    """Where every step runs: auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps."""

    def __post_init__(self):
        from overfill.demo.prompts import demo_prompts

        super().__post_init__()
        self.device = str(resolve_device(self.device))
        if not 0 <= self.ratio < 1:
            raise OverfillError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.loss not in LOSSES:
            raise OverfillError(f"--loss got unknown loss '{self.loss}': pick one of {', '.join(LOSSES)}")
        preset = PRESETS["quick" if self.quick else "default"]
        for name, value in zip(("prompts", "max_new_tokens", "steps", "heldout"), preset):
            if getattr(self, name) is None:
                setattr(self, name, value)
        at_least(self, 1, "prompts", "steps", "heldout", "batch_size")
        if self.max_new_tokens < 2:
            raise OverfillError(f"--max-new-tokens must be at least 2 (the decoder writes reply tokens 2..N), got {self.max_new_tokens}")
        if not 0 < self.lr < math.inf:  # NaN and infinity compare False
            raise OverfillError(f"--lr must be a positive number, got {self.lr}")
        if self.prompt is not None and not self.prompt.strip():
            raise OverfillError("--prompt is empty: pass a question for the chat comparison, or leave it out")
        train, heldout = demo_prompts(self.seed)
        for name, pool in (("prompts", train), ("heldout", heldout)):
            if getattr(self, name) > len(pool):
                raise OverfillError(f"--{name} {getattr(self, name)} is more than the {len(pool)} the demo composes: "
                                    f"pass at most {len(pool)}")
