"""Choosing tokens and reporting them: what every decoding loop shares (generation.py, speculative.py).

`Sampling` is the settings of the choice (generate, chat and distill share them); `TokenChooser` turns
logits into tokens (greedy, or transformers' own warpers and a seeded draw); `Step` is what a loop
yields for each reply token of a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from overfill.config import Settings
from overfill.errors import OverfillError


@dataclass
class Sampling(Settings):
    """How each token is chosen: what generate, chat and distill share."""

    temperature: float = 0.0
    """0 = greedy; > 0 samples."""
    top_k: int = 0
    """Sample from the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    seed: int = 0
    """Sampling seed, 0 by default as in every command: the same seed, prompt and settings give the same reply."""

    def __post_init__(self):
        super().__post_init__()
        # In-range tests, so that NaN and infinity (which compare False) are refused too.
        if not 0 <= self.temperature < math.inf or not 0 < self.top_p <= 1 or not self.top_k >= 0:
            raise OverfillError(f"sampling needs temperature >= 0 (finite), 0 < top_p <= 1 and top_k >= 0, got "
                                f"{self.temperature}, {self.top_p} and {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenChooser:
    """Greedy argmax, or transformers' own warpers + a seeded multinomial draw.

    With `row_seeds` (one per row), each row draws from a generator of its own, so a row's tokens
    depend on its seed and its own logits only, not on the rows that share its batch.
    """

    def __init__(self, config: Sampling, row_seeds: list[int] | None = None):
        self.config = config
        self.row_generators = None if row_seeds is None else [torch.Generator().manual_seed(s) for s in row_seeds]
        self.warpers = LogitsProcessorList()
        if not config.greedy:
            self.warpers.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k:
                self.warpers.append(TopKLogitsWarper(config.top_k))
            if config.top_p < 1:
                self.warpers.append(TopPLogitsWarper(config.top_p))
        # A private generator: seeding never touches (or, unseeded, reseeds) torch's global RNG.
        self.generator = torch.Generator()
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> tokens [B]."""
        if self.config.greedy:
            return logits.argmax(-1)
        return self.draw(self.probs(logits, history))

    def probs(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """The distribution sampling draws from: logits [B, V] through the warpers -> probabilities [B, V]."""
        return self.warpers(history, logits).softmax(-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row from probs [B, V], on the CPU generators, so a seed gives the same reply on any device."""
        cpu = probs.float().cpu()
        if self.row_generators is not None:
            picks = [torch.multinomial(row, 1, generator=g) for row, g in zip(cpu, self.row_generators, strict=True)]
            return torch.cat(picks).to(probs.device)
        return torch.multinomial(cpu, 1, generator=self.generator).squeeze(-1).to(probs.device)

    def uniform(self, shape: tuple[int, int]) -> torch.Tensor:
        """U(0, 1) numbers [B, k] from the same generators (a row's from its own, with row seeds)."""
        if self.row_generators is not None:
            return torch.stack([torch.rand(shape[1], generator=g) for g in self.row_generators])
        return torch.rand(shape, generator=self.generator)


@dataclass
class Step:
    tokens: torch.Tensor  # [B] token chosen at this step (pad for finished rows)
    finished: torch.Tensor  # [B] bool, row done after this step
    seconds: float  # wall time of this step (prefill + first token for step 0), the device's work included


class RowState:
    """What a token loop keeps of each row: the tokens it chose so far and whether the row has finished (EOS, or
    a stop string by `is_stopped(row, tokens) -> bool`). `record` takes one token per row and returns them with
    finished rows padded; both loops (generation's and speculative decoding's) read their rows through it."""

    def __init__(self, rows: int, device: torch.device, eos_ids: set[int], pad_id: int, is_stopped=None):
        self.eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
        self.pad_id, self.is_stopped = pad_id, is_stopped
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.tokens = torch.empty(rows, 0, dtype=torch.long, device=device)  # [B, N] chosen so far
        self.done = False

    def record(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = torch.where(self.finished, torch.full_like(tokens, self.pad_id), tokens)
        self.tokens = torch.cat([self.tokens, tokens[:, None]], dim=1)
        ended = ~self.finished & torch.isin(tokens, self.eos)
        if self.is_stopped is not None:
            for row in (~self.finished & ~ended).nonzero().flatten().tolist():
                ended[row] = bool(self.is_stopped(row, self.tokens[row]))
        self.finished = self.finished | ended
        self.done = bool(self.finished.all())  # waits for the device: a step timed after this includes its work
        return tokens

    def step(self, tokens: torch.Tensor, seconds: float) -> Step:
        return Step(tokens=tokens, finished=self.finished.clone(), seconds=seconds)
