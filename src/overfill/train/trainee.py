"""What a training mode optimises: the module the loss runs through, the parameters it updates, what it saves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from overfill.train.config import TrainConfig


@dataclass
class Trainee:
    mode: str
    module: nn.Module  # what the loss runs through (OverFillModel for overfill, else the trained model)
    trained: nn.Module  # the model whose parameters are optimised (decoder, or the full model)
    tokenizer: object
    pair: nn.Module | None  # OverFillModel (modes overfill and pruned): what the final checkpoint saves

    def set_training(self, training: bool) -> None:
        self.module.train(training)
        if self.pair is not None:
            self.pair.full.eval()  # the full model stays frozen: no dropout in its prefill


def load_trainee(config: TrainConfig) -> Trainee:
    from overfill.loading import load_model
    from overfill.modeling import OverFillModel, activation_checkpointing, disable_activation_checkpointing

    if config.mode == "full":
        full, tokenizer = load_model(config.model, trust_remote_code=config.trust_remote_code, quiet=True)
        full.requires_grad_(True)
        trainee = Trainee("full", full, full, tokenizer, None)
    else:
        if (Path(config.decoder) / "overfill.json").is_file():  # continue from an OverFill checkpoint
            pair = OverFillModel.from_pretrained(config.decoder, config.model, trust_remote_code=config.trust_remote_code)
        else:
            pair = OverFillModel.from_pair(config.model, config.decoder, trust_remote_code=config.trust_remote_code)
        pair.decoder.requires_grad_(True)
        module = pair if config.mode == "overfill" else pair.decoder
        trainee = Trainee(config.mode, module, pair.decoder, pair.tokenizer, pair)
    if activation_checkpointing(trainee.trained):
        # it would drop the full model's cache (docs/design.md, "Traps in transformers 5.x")
        disable_activation_checkpointing(trainee.trained)
    return trainee


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.weight_decay > 0:
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    else:
        groups = [{"params": params, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)
