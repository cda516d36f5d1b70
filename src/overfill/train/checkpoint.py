"""The files a training run keeps (train.py writes them): model folders, resumable step checkpoints, resume checks.

A step checkpoint (checkpoints/step-N/) holds no pickles: the trained weights as a model folder
(model/), the optimizer's tensors and every RNG's state in safetensors, and everything else
(step, scheduler, optimizer scalars, the run's config) in trainer.json, written last with the
sha256 of every other file, so that a damaged or half-written checkpoint is refused on resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Final

import numpy as np
import torch

from overfill.atomic import atomic_folder, check_writable
from overfill.errors import OverfillError
from overfill.tensors import state_dict_to_save
from overfill.train.config import TrainConfig
from overfill.train.trainee import Trainee

TRAINER_STATE_FORMAT: Final = 1  # trainer.json's "format"
TRAINER_FILE = "trainer.json"

# Config fields that decide the training trajectory; a resumed run must agree on all of them.
TRAJECTORY_FIELDS = (
    "mode", "model", "decoder", "data", "val_data", "val_size", "prompt_field", "response_field", "max_context",
    "max_target", "limit", "seed", "lr", "weight_decay", "warmup_ratio", "warmup_steps", "batch_size",
    "grad_accum", "max_grad_norm", "epochs", "max_steps", "refresh_every", "loss", "kd_temperature", "kd_weight",
)
# Fields newer than some checkpoints: their value when a checkpoint has none (older runs trained on plain CE).
ADDED_LATER = {"refresh_every": 0, "loss": "ce", "kd_temperature": 1.0, "kd_weight": 0.5}
# Fields renamed since some checkpoints were written: new name -> the name such a checkpoint records.
RENAMED = {"limit": "max_examples"}


# ---------------------------------------------------------------- model folders


@contextlib.contextmanager
def _quiet_saving():
    """No 'Writing model shards' bars from transformers while we save."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def save_model_folder(trainee: Trainee, folder: Path, extra: dict) -> Path:
    """The model a run produces: an OverFill checkpoint (overfill, pruned) or an HF folder (full)."""
    with _quiet_saving():
        if trainee.pair is not None:
            return trainee.pair.save_pretrained(folder, extra={"training": extra})
        with atomic_folder(folder) as tmp:
            trainee.trained.save_pretrained(tmp, state_dict=state_dict_to_save(trainee.trained))
            trainee.tokenizer.save_pretrained(tmp)
            (tmp / "training.json").write_text(json.dumps(extra, indent=1) + "\n")
        return folder


def publish_model(trainee: Trainee, out: Path, extra: dict) -> None:
    """Save the final model into the run folder `out` beside its metrics: staged in out/.final, then
    moved in entry by entry, the marker file last (overfill.json or config.json: it says the folder is complete)."""
    staged = save_model_folder(trainee, out / ".final", extra)
    marker = "overfill.json" if trainee.pair is not None else "config.json"
    (out / marker).unlink(missing_ok=True)
    for entry in sorted(staged.iterdir(), key=lambda p: p.name == marker):
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(entry, target)
    staged.rmdir()


# ---------------------------------------------------------------- step checkpoints


def _weights_folder(trainee: Trainee, model_folder: Path) -> Path:
    return model_folder / "decoder" if trainee.pair is not None else model_folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of every random number generator training may touch."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{i}"] = state
    return {"python": [version, list(mt), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}, tensors


def _set_rng_state(json_part: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, mt, gauss = json_part["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(folder: Path, trainee: Trainee, optimizer, scheduler, state: dict, extra: dict) -> Path:
    """Write a resumable checkpoint atomically: model/ + optimizer.safetensors + rng.safetensors + trainer.json."""
    from safetensors.torch import save_file

    with atomic_folder(folder) as tmp:
        save_model_folder(trainee, tmp / "model", extra)
        opt = optimizer.state_dict()
        tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() for i, s in opt["state"].items()
                   for k, v in s.items() if isinstance(v, torch.Tensor)}
        scalars = {str(i): {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)} for i, s in opt["state"].items()}
        save_file(tensors, tmp / "optimizer.safetensors")
        rng_json, rng_tensors = _rng_state()
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, tmp / "rng.safetensors")
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta = {"format": TRAINER_STATE_FORMAT, **state, "scheduler": scheduler.state_dict(),
                "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}, "rng": rng_json, "files": files}
        (tmp / TRAINER_FILE).write_text(json.dumps(meta, indent=1) + "\n")  # written last: it marks a complete checkpoint
    return folder


def _corrupt(folder: Path, what: str) -> OverfillError:
    return OverfillError(f"checkpoint {folder} is corrupt ({what}): delete it and resume from an earlier checkpoint, or start over with --force")


def read_checkpoint(folder: Path) -> dict:
    """trainer.json of a step checkpoint, after checking every file against its recorded sha256.

    A folder without trainer.json is no checkpoint at all (atomic_folder never leaves a half one
    under its final name), so it is refused as the wrong folder, not as a damaged checkpoint.
    """
    meta_path = folder / TRAINER_FILE
    if not folder.exists():
        raise OverfillError(f"checkpoint {folder} does not exist: pass a checkpoints/step-N folder or 'latest'")
    if not folder.is_dir() or not meta_path.is_file():
        what = "not a folder" if not folder.is_dir() else f"no {TRAINER_FILE}"
        if folder.is_dir() and folder.name.startswith("step-"):  # where a checkpoint goes, left by a killed writer
            what += ", so it was never completed"
        raise OverfillError(f"--resume {folder} is not a training checkpoint ({what}): pass a checkpoints/step-N "
                            "folder of a run, or 'latest'")
    try:
        meta = json.loads(meta_path.read_text())
    except OSError as err:  # e.g. an I/O error on a damaged disk
        raise _corrupt(folder, f"{TRAINER_FILE} cannot be read: {err.strerror or type(err).__name__}") from None
    except ValueError as err:  # any text json.loads refuses, bytes that are not UTF-8 included
        raise _corrupt(folder, f"{TRAINER_FILE} is not valid JSON: {getattr(err, 'msg', err)}") from None
    if not isinstance(meta, dict) or meta.get("format") != TRAINER_STATE_FORMAT or not isinstance(meta.get("files"), dict):
        raise _corrupt(folder, f"{TRAINER_FILE} is not a format-{TRAINER_STATE_FORMAT} trainer state")
    for name, expected in meta["files"].items():
        path = folder / name
        if not path.is_file():
            raise _corrupt(folder, f"{name} is missing")
        try:
            matches = _sha256(path) == expected
        except OSError as err:
            raise _corrupt(folder, f"{name} cannot be read: {err.strerror or type(err).__name__}") from None
        if not matches:
            raise _corrupt(folder, f"{name} does not match its recorded sha256")
    return meta


def latest_checkpoint(out: Path) -> Path:
    found = sorted((p for p in (out / "checkpoints").glob("step-*") if p.is_dir()), key=lambda p: p.name)
    if not found:
        raise OverfillError(f"no checkpoint to resume under {out}/checkpoints: train with --checkpoint-every N, "
                            "or start over without --resume")
    return found[-1]


def load_checkpoint(folder: Path, meta: dict, trainee: Trainee, optimizer, scheduler) -> None:
    """Put the weights, optimizer, scheduler and RNG states of a verified checkpoint back in place."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = {}
        for path in sorted(_weights_folder(trainee, folder / "model").glob("*.safetensors")):
            weights.update(load_file(path))
        opt_tensors = load_file(folder / "optimizer.safetensors")
        rng_tensors = load_file(folder / "rng.safetensors")
    except (SafetensorError, OSError) as err:
        raise _corrupt(folder, str(err).splitlines()[0]) from None
    params = dict(trainee.trained.named_parameters())
    missing = sorted(set(params) - set(weights))
    if missing:
        raise OverfillError(f"checkpoint {folder} does not hold this model's weights (missing {missing[0]}): "
                            "resume with the --model/--decoder/--mode it was trained with")
    with torch.no_grad():
        for name, p in params.items():
            if weights[name].shape != p.shape:
                raise OverfillError(f"checkpoint {folder} holds {name} of shape {tuple(weights[name].shape)}, "
                                    f"the model has {tuple(p.shape)}: resume with the model it was trained with")
            p.copy_(weights[name])
    opt_meta = meta["optimizer"]
    state: dict[int, dict] = {int(i): dict(s) for i, s in opt_meta["scalars"].items()}
    for key, tensor in opt_tensors.items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = tensor
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in opt_meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(meta["scheduler"])
    _set_rng_state(meta["rng"], rng_tensors)


# ---------------------------------------------------------------- resuming


def prepare_out(config: TrainConfig, *, main: bool = True) -> Path | None:
    """Check the run folder (before any model loads); returns the checkpoint to resume from, if any.

    Only the main process checks it: the check writes a probe into the folder, and two processes probing
    one folder at once (data-parallel ranks) would remove each other's probe, or find it there. The others
    only need to know what to resume from.
    """
    out = check_writable(config.out, "--out") if main else Path(config.out)
    if config.resume:
        folder = latest_checkpoint(out) if config.resume == "latest" else Path(config.resume)
        return folder
    if not main:
        return None
    if out.exists() and any(out.iterdir()):
        if not config.force:
            raise OverfillError(f"--out {out} already holds files: pass --resume latest to continue that run, "
                                "--force to start over, or another --out")
        if not (out / "train_config.json").is_file():
            raise OverfillError(f"--out {out} is not empty and is not a training run folder: pick another --out")
    return None


def check_same_run(meta: dict, config: TrainConfig, world: int, digest: str, folder: Path) -> None:
    saved = meta.get("config", {})
    for name in TRAJECTORY_FIELDS:
        value = saved.get(name, saved.get(RENAMED.get(name), ADDED_LATER.get(name)))
        if value != getattr(config, name):
            raise OverfillError(f"cannot resume from {folder}: it was trained with --{name.replace('_', '-')} "
                                f"{value!r}, this run has {getattr(config, name)!r}; pass the same settings")
    if meta.get("world_size") != world:
        raise OverfillError(f"cannot resume from {folder}: it ran on {meta.get('world_size')} processes, this run has "
                            f"{world}; resume with the same number of processes")
    if meta.get("data_digest") != digest:
        raise OverfillError(f"cannot resume from {folder}: the training data changed since (different examples); "
                            "resume with the same data files")
