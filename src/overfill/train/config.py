"""`overfill train`'s settings: one dataclass whose fields are the command's flags and the Python API's arguments."""

from __future__ import annotations

import math
import os
import typing
from dataclasses import dataclass
from typing import Final, Literal

from overfill.config import at_least
from overfill.data import DataConfig
from overfill.devices import resolve_device
from overfill.errors import OverfillError
from overfill.modeling import Mode, check_mode
from overfill.zoo import DEFAULT_MODEL

Loss = Literal["ce", "kd", "ce+kd"]
LOSSES: Final[tuple[str, ...]] = typing.get_args(Loss)


@dataclass
class TrainConfig(DataConfig):
    mode: Mode = "overfill"
    """overfill (the decoder on the frozen full model's cache), pruned (the decoder standalone) or full (fine-tune the full model)."""
    model: str = DEFAULT_MODEL
    """Full model: a zoo name, a local HF folder or a hub id."""
    decoder: str | None = None
    """Decoder to train (modes overfill and pruned): a folder from `overfill prune`, or an OverFill checkpoint."""
    out: str = "runs/train"
    """Run folder: the final checkpoint, metrics.jsonl, loss.png, checkpoints/step-N/."""
    lr: float = 1e-4
    """Peak learning rate (paper: 2e-5 at 3B scale; small models and short runs want more)."""
    weight_decay: float = 0.0
    """AdamW weight decay, on matrices only (not on norms or biases)."""
    warmup_ratio: float = 0.01
    """Warmup as a share of all optimizer steps (paper: 1%)."""
    warmup_steps: int | None = None
    """Warmup steps; overrides --warmup-ratio."""
    batch_size: int = 4
    """Examples per micro-batch, per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch size x grad accum x processes)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 = no clipping)."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed); ignored when --max-steps is given."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides --epochs."""
    eval_every: int = 100
    """Validation loss every N steps (also before the first and after the last); 0 = only before and after."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N steps (0 = none)."""
    keep_checkpoints: int = 2
    """Keep only the newest N step checkpoints."""
    resume: str | None = None
    """Continue a run: a checkpoints/step-N folder, or 'latest' for the newest one under --out."""
    force: bool = False
    """Start over in an --out folder that already holds a training run (deletes it)."""
    progress: bool = True
    """Show a progress bar and the data summary (main process only)."""
    trust_remote_code: bool = False
    """Allow custom model code (only for models you trust)."""
    refresh_every: int = 0
    """Mode overfill: train (and validate) the decoder on the prefill-refresh schedule, full-model KV for every earlier block of K reply tokens (0 = off)."""
    loss: Loss = "ce"
    """ce (cross-entropy on the reply), kd (distil the frozen full model's next-token distributions, KL(full || trained)) or ce+kd (both, mixed by --kd-weight); kd needs --mode overfill or pruned. Validation stays CE."""
    kd_temperature: float = 1.0
    """Temperature T of both distributions in the KD term, which is scaled by T^2 so its gradients keep their size across T (Hinton et al.)."""
    kd_weight: float = 0.5
    """--loss ce+kd: loss = (1 - w) * CE + w * KD with this w in [0, 1] (--loss kd is w = 1)."""
    device: str = "auto"
    """auto (Accelerate's placement: each process's CUDA device when there is one, else the CPU; the rule of every other command), cpu, cuda, cuda:N (one process) or mps."""

    def __post_init__(self):
        super().__post_init__()
        resolved = resolve_device(self.device)  # a missing GPU is one error line, before any model loads
        if resolved.type == "cuda" and resolved.index and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise OverfillError(f"--device {self.device} picks one GPU, and this run has several processes: each takes "
                                "its own (LOCAL_RANK); pass --device auto, or choose GPUs with CUDA_VISIBLE_DEVICES")
        check_mode(self.mode)
        if self.refresh_every < 0 or (self.refresh_every and self.mode != "overfill"):
            raise OverfillError(f"--refresh-every trains OverFill's decoder on the prefill-refresh schedule: it needs "
                                f"--mode overfill and a token count of at least 1, got {self.refresh_every} with --mode {self.mode}")
        if self.loss not in LOSSES:
            raise OverfillError(f"--loss got unknown loss '{self.loss}': pick one of {', '.join(LOSSES)}")
        if self.loss != "ce" and self.mode == "full":
            raise OverfillError(f"--loss {self.loss} distils the frozen full model into a decoder; --mode full trains "
                                "the full model itself, which would distil from itself: use --loss ce with --mode full")
        if not 0 < self.kd_temperature < math.inf:
            raise OverfillError(f"--kd-temperature must be a positive number, got {self.kd_temperature}")
        if not 0 <= self.kd_weight <= 1:
            raise OverfillError(f"--kd-weight must be in [0, 1] (loss = (1 - w) * CE + w * KD), got {self.kd_weight}")
        if self.mode in ("overfill", "pruned") and not self.decoder:
            raise OverfillError(f"--mode {self.mode} trains a decoder: pass --decoder (a folder from `overfill prune`)")
        if self.mode == "full" and self.decoder:
            raise OverfillError("--mode full fine-tunes the full model and uses no --decoder: drop --decoder")
        # Each number is checked for being in its range, so NaN and infinity (which compare False) are out too.
        if not 0 < self.lr < math.inf:
            raise OverfillError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf or not 0 <= self.max_grad_norm:  # max_grad_norm inf: no clipping
            raise OverfillError(f"--weight-decay and --max-grad-norm must be 0 or more, got {self.weight_decay} and {self.max_grad_norm}")
        if not 0 <= self.warmup_ratio < 1:
            raise OverfillError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        at_least(self, 1, "batch_size", "grad_accum", "keep_checkpoints", "max_steps")
        at_least(self, 0, "warmup_steps", "eval_every", "checkpoint_every")
        if self.max_steps is None and not 0 < self.epochs < math.inf:
            raise OverfillError(f"--epochs must be a positive number, got {self.epochs}")
