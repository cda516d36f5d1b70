"""Training the OverFill decoder and the paper's two baselines (paper §3.2 and §4.1; docs/design.md, "The method").

Three modes share one loop, one data order, one schedule and one loss definition, so their
numbers compare like with like:

    overfill: the full model is frozen and prefills the context; the decoder is trained on the
              reply under teacher forcing, reading the full model's cache (OverFillModel.forward)
    pruned:   the same decoder trained standalone: it reads context + reply itself
    full:     the full model fine-tuned standalone (the quality ceiling)

Each mode learns what it produces at generation time: the OverFill decoder reply tokens 2..N
(token 1 comes from the full model's prefill), the standalone baselines tokens 1..N; validation
scores tokens 2..N in every mode so the curves compare (loss.py). Losses are weighted by tokens
across gradient accumulation and processes. `--loss kd|ce+kd` distils the frozen full model's
next-token distributions into the decoder (distill_loss.py); metrics.jsonl then logs the step's
CE and KD parts beside the loss it optimised (`loss_ce`, `loss_kd`).

Recipe (paper §4.1): AdamW, cosine schedule with warmup, gradient clipping. Data parallel through
Accelerate (`accelerate launch -m overfill train ...`); the data order is a function of the seed
and the step alone (sampler.py), which is what makes `resume` continue exactly. Checkpoints hold
no pickles: tensors in safetensors, everything else in JSON, with sha256 sums so a damaged one is
refused (checkpoint.py). The loss itself is in loss.py.

Gradient checkpointing is deliberately not offered: in transformers 5.x it drops
`past_key_values` in decoder layers, so the decoder would silently train without the full
model's context (docs/design.md, "Traps in transformers 5.x").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from overfill.atomic import atomic_write_text
from overfill.data import Batch, collate, load_data
from overfill.data.examples import check_examples_fit
from overfill.generation import context_limit
from overfill.tensors import pad_id_of
from overfill.train.checkpoint import (
    check_same_run,
    load_checkpoint,
    prepare_out,
    publish_model,
    read_checkpoint,
    save_checkpoint,
)
from overfill.train.config import TrainConfig
from overfill.train.distill_loss import distillation_loss
from overfill.train.loss import batch_loss, first_scored, scored_tokens, validation_loss
from overfill.train.plots import plot_losses
from overfill.train.sampler import StepSampler, data_digest, total_steps
from overfill.train.trainee import load_trainee, make_optimizer


@dataclass
class TrainResult:
    out: Path
    """The run folder; for modes overfill and pruned it is also the OverFill checkpoint."""
    checkpoint: Path
    """Final model folder: an OverFill checkpoint (overfill, pruned) or an HF model folder (full)."""
    mode: str
    steps: int
    examples: int  # training examples consumed (all processes)
    losses: list[float]  # training loss of every step 1..steps (resumed runs include the earlier steps)
    val_losses: list[tuple[int, float]]  # (step, validation loss)
    seconds: float  # wall time of this invocation's loop (validation and checkpoints included)
    steps_per_s: float  # optimizer steps per second of training compute (validation and checkpoints excluded)
    tokens_per_s: float  # context + reply tokens per second of training compute (all processes)
    model: nn.Module | None = field(default=None, repr=False)  # trained: OverFillModel (overfill, pruned) or the full model

    @property
    def val_loss(self) -> float | None:
        return self.val_losses[-1][1] if self.val_losses else None


# ---------------------------------------------------------------- metrics


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


# ---------------------------------------------------------------- the loop


def micro_batch_loss(config: TrainConfig, module: nn.Module, batch: Batch,
                     full: nn.Module | None = None) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """(loss to optimise, tokens it covers, its logged parts) of one micro-batch under --loss: plain
    cross-entropy (loss.batch_loss, no parts) or distillation (distill_loss.distillation_loss, parts ce and kd).
    `full` is pruned mode's teacher (distill_loss.py)."""
    if config.loss == "ce":
        loss, tokens = batch_loss(config.mode, module, batch, refresh_every=config.refresh_every)
        return loss, tokens, {}
    return distillation_loss(config, module, batch, full)


def train(config: TrainConfig, *, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train as `config` says; the main process writes the run folder. `on_step(record)` sees every step's metrics."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    config.check_files()  # a missing or binary data file: one error line, before any process group or model
    accelerator = make_accelerator(config.device)
    main, world, device = accelerator.is_main_process, accelerator.num_processes, accelerator.device
    out = Path(config.out)
    resume_from = prepare_out(config, main=main)
    resume_meta = read_checkpoint(resume_from) if resume_from else None  # refuse a damaged one before loading models

    def say(text: str) -> None:
        if main and config.progress:
            tqdm.write(f"overfill train: {text}", file=sys.stderr)

    set_seed(config.seed)
    trainee = load_trainee(config)
    tokenizer = trainee.tokenizer
    data = load_data(config, tokenizer)
    limit = context_limit(trainee.pair if trainee.pair is not None else trainee.trained)
    for source in data.sources:  # before any step: past its positions a model trains on garbage without an error
        check_examples_fit(source.examples, limit, path=source.path)
    for source in data.sources:
        say(source.summary())
    say(f"{data.summary()}; mode {config.mode}, {sum(p.numel() for p in trainee.trained.parameters()) / 1e6:.1f}M trained parameters")
    digest = data_digest(data.train)
    steps = total_steps(config, len(data.train), world)
    warmup = config.warmup_steps if config.warmup_steps is not None else math.ceil(config.warmup_ratio * steps)
    pad_id = pad_id_of(tokenizer)
    first = first_scored(config.mode, training=True)  # standalone baselines also learn reply token 1

    optimizer = make_optimizer(trainee.trained, config)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    # The scheduler is not prepared: Accelerate would step it once per process. The data order is
    # ours (StepSampler) rather than a prepared DataLoader, so that resume is exact.
    module, optimizer = accelerator.prepare(trainee.module, optimizer)
    # Pruned mode distils from a full model outside the trained module: on the device, under the same autocast.
    teacher = (accelerator.prepare_model(trainee.pair.full, evaluation_mode=True)
               if config.loss != "ce" and config.mode == "pruned" else None)
    trainee.set_training(True)

    config_json = dataclasses.asdict(config)
    start = 0
    metrics_path = out / "metrics.jsonl"
    if resume_meta is not None:
        check_same_run(resume_meta, config, world, digest, resume_from)
        load_checkpoint(resume_from, resume_meta, trainee, optimizer, scheduler)
        start = int(resume_meta["step"])
        say(f"resumed from {resume_from} at step {start}")
    if main:
        if resume_meta is None and out.exists() and config.force:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "train_config.json", json.dumps(config_json, indent=1) + "\n")
        atomic_write_text(out / "data.json", json.dumps([s.as_dict() for s in data.sources], indent=1) + "\n")
        kept = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= start] if resume_meta else []
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))  # a resume keeps its history even if killed here
    accelerator.wait_for_everyone()

    sampler = StepSampler(len(data.train), config.seed, config.batch_size, config.grad_accum, world,
                          accelerator.process_index)
    history = read_metrics(metrics_path) if main else []
    params = [p for p in trainee.trained.parameters() if p.requires_grad]

    def log(record: dict) -> None:
        history.append(record)
        if main:
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def validate(step: int) -> None:
        if not data.val:
            return
        loss, tokens = validation_loss(trainee, accelerator.unwrap_model(module), data.val, config.batch_size, pad_id, accelerator,
                                       config.refresh_every)
        log({"step": step, "val_loss": loss, "val_tokens": tokens})
        say(f"step {step}: validation loss {loss:.4f} ({tokens} tokens)")

    def run_state(step: int) -> dict:
        return {"step": step, "examples": step * sampler.per_step, "world_size": world, "data_digest": digest,
                "config": config_json}

    if start == 0:
        validate(0)
    bar = tqdm(total=steps, initial=start, desc=f"train {config.mode}", unit="step", dynamic_ncols=True,
               disable=not (main and config.progress), file=sys.stderr)
    started = time.perf_counter()
    tokens_seen, step_seconds = 0, 0.0
    try:
        for step in range(start + 1, steps + 1):
            step_started = time.perf_counter()
            batches = [collate([data.train[i] for i in ids], pad_id).to(device) for ids in sampler.micro_batches(step)]
            counts = torch.tensor([sum(scored_tokens(b, first, config.refresh_every) for b in batches),
                                   sum(int(b.context_mask.sum() + b.target_mask.sum()) for b in batches)],
                                  dtype=torch.float64, device=device)
            loss_tokens, all_tokens = accelerator.reduce(counts, "sum").tolist()  # global, before any backward
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            part_sums: dict[str, torch.Tensor] = {}  # --loss kd, ce+kd: token-weighted sums of its CE and KD
            for m, batch in enumerate(batches):
                sync = contextlib.nullcontext() if m == len(batches) - 1 else accelerator.no_sync(module)
                with sync:
                    loss, tokens, parts = micro_batch_loss(config, module, batch, teacher)
                    # DDP averages gradients over processes; this scaling makes the step's gradient
                    # the token-weighted mean over every micro-batch of every process.
                    accelerator.backward(loss * (tokens * world / max(loss_tokens, 1)))
                loss_sum += loss.detach().double() * tokens
                for name, value in parts.items():
                    part_sums[name] = part_sums.get(name, 0.0) + value.double() * tokens
            grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm) if config.max_grad_norm > 0 else None
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = float(accelerator.reduce(loss_sum, "sum")) / max(loss_tokens, 1)
            seconds = time.perf_counter() - step_started
            tokens_seen += all_tokens
            step_seconds += seconds
            record = {"step": step, "epoch": round(step * sampler.per_step / len(data.train), 4), "loss": step_loss,
                      **_parts(accelerator, part_sums, loss_tokens),
                      "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                      "loss_tokens": int(loss_tokens), "tokens": int(all_tokens), "tokens_per_s": all_tokens / seconds,
                      "seconds": seconds}
            log(record)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{all_tokens / seconds:.0f}", refresh=False)
            bar.update(1)
            if step == steps or (config.eval_every and step % config.eval_every == 0):
                validate(step)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < steps:
                if main:
                    folder = save_checkpoint(out / "checkpoints" / f"step-{step:07d}", trainee, optimizer, scheduler,
                                             run_state(step), _training_extra(config, step, history))
                    for old in sorted((out / "checkpoints").glob("step-*"))[:-config.keep_checkpoints]:
                        shutil.rmtree(old)
                    plot_losses(history, out / "loss.png", _title(config))
                    bar.set_description_str(f"train {config.mode} (saved {folder.name})", refresh=False)
                accelerator.wait_for_everyone()
            if on_step is not None:
                on_step(record)
    except KeyboardInterrupt:
        say(f"interrupted; continue with --resume latest (checkpoints in {out / 'checkpoints'})")
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    done = steps - start

    trainee.set_training(False)
    if main:
        publish_model(trainee, out, _training_extra(config, steps, history))
        plot_losses(history, out / "loss.png", _title(config))
        say(f"done: {done} steps in {seconds:.0f} s; final model in {out}")
    accelerator.wait_for_everyone()
    return TrainResult(
        out=out, checkpoint=out, mode=config.mode, steps=steps, examples=steps * sampler.per_step,
        losses=[r["loss"] for r in history if "loss" in r],
        val_losses=[(r["step"], r["val_loss"]) for r in history if "val_loss" in r],
        seconds=seconds, steps_per_s=done / step_seconds if step_seconds > 0 else 0.0,
        tokens_per_s=tokens_seen / step_seconds if step_seconds > 0 else 0.0,
        model=trainee.pair if trainee.pair is not None else trainee.trained,
    )


def make_accelerator(device: str = "auto"):
    """Accelerate's placement, which is --device auto's rule: CUDA when available (each process its own GPU), else CPU.

    --device cpu keeps every process on the CPU, and so does a multi-process launch on a machine
    without CUDA: Accelerate only picks its gloo (MULTI_CPU) backend when told to use the CPU, but the
    launchers that start several local processes (`accelerate launch --multi_gpu`, `torchrun`) do
    not say so. --device cuda:N makes GPU N the current one for a single process.
    """
    from accelerate import Accelerator

    from overfill.devices import resolve_device

    resolved = resolve_device(device)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1
    if resolved.type == "cpu":
        return Accelerator(cpu=True)
    if resolved.type == "cuda" and resolved.index is not None and not launched:
        torch.cuda.set_device(resolved)
    return Accelerator()


def _parts(accelerator, sums: dict[str, torch.Tensor], loss_tokens: float) -> dict[str, float]:
    """The step's token-weighted mean of each loss part over every process, as metrics (`loss_ce`, `loss_kd`)."""
    if not sums:
        return {}
    names = sorted(sums)
    totals = accelerator.reduce(torch.stack([sums[n] for n in names]), "sum").tolist()
    return {f"loss_{n}": total / max(loss_tokens, 1) for n, total in zip(names, totals)}


def _title(config: TrainConfig) -> str:
    loss = f" --loss {config.loss}" if config.loss != "ce" else ""
    return f"overfill train --mode {config.mode}{loss} ({Path(config.data).name})"


def _training_extra(config: TrainConfig, step: int, history: list[dict]) -> dict:
    """What a saved model records about how it was trained (beside overfill.json's own fields)."""
    val = [r["val_loss"] for r in history if "val_loss" in r]
    return {"mode": config.mode, "step": step, "val_loss": val[-1] if val else None,
            "config": dataclasses.asdict(config)}

