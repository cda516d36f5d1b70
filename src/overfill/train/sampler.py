"""Training data order: which examples each optimizer step reads, and how many steps a run has.

The order is a function of the seed and the step alone (not of a DataLoader's state), which is
what makes `overfill train --resume` continue exactly; `data_digest` lets a resumed run check that
its training examples are the ones the checkpoint was trained on.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from overfill.data import Example
from overfill.train.config import TrainConfig


class StepSampler:
    """Which examples each step uses: epoch permutations of the training set laid end to end.

    Step s (1-based) takes stream positions [(s-1)*G, s*G), G = batch x accum x processes, so the
    order depends only on the seed and the step: a resumed run sees exactly the same batches.
    Process r takes micro-batch m from the slice (m*W + r)*batch of its step.
    """

    def __init__(self, n: int, seed: int, batch_size: int, grad_accum: int, world: int = 1, rank: int = 0):
        self.n, self.seed, self.batch_size, self.grad_accum, self.world, self.rank = n, seed, batch_size, grad_accum, world, rank
        self._perms: dict[int, np.ndarray] = {}

    @property
    def per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        start = (step - 1) * self.per_step
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + self.per_step)]

    def micro_batches(self, step: int) -> list[list[int]]:
        ids, b = self.indices(step), self.batch_size
        return [ids[(m * self.world + self.rank) * b:(m * self.world + self.rank + 1) * b] for m in range(self.grad_accum)]


def total_steps(config: TrainConfig, n_train: int, world: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * n_train / (config.batch_size * config.grad_accum * world)))


def data_digest(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.context_ids, e.target_ids]).encode())
    return digest.hexdigest()
