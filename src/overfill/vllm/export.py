"""The folder vLLM loads: one per (full model, decoder) pair, written once, atomically, and reused.

`engine_model(source, mode)` is what `overfill serve`, `bench --engine vllm` and `eval --engine vllm`
hand to vLLM:
  * overfill: an exported folder under $OVERFILL_HOME/vllm/, named by both models' fingerprints;
  * full / pruned: the full model's or the decoder's own folder, which vLLM loads as it is
    (plain Llama / Qwen2 / ... served the same way, for comparison).

Exported layout (names relative to the folder):

    config.json                  the full model's config, architectures = ["OverFillForCausalLM"],
                                 plus "overfill": {"format", "decoder": {hidden_size, intermediate_size,
                                 tie_word_embeddings, rms_norm_eps}, "full_fingerprint", "decoder_fingerprint"}
    <full shards>.safetensors    the full model's own files, names unchanged ("model.layers.0...."),
                                 symlinked to the full model's folder
    decoder.safetensors          the decoder's tensors, every name prefixed with "decoder."
    model.safetensors.index.json weight_map over both (vLLM skips .safetensors files an index omits)
    tokenizer files (as the full model's tokenizer saves them), generation_config.json (copied)

The pair is loaded and checked first (same layers, KV heads, head_dim and tokenizer; the decoder's
recorded full-model fingerprint), exactly as `overfill generate` would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

from safetensors import safe_open
from safetensors.torch import save_file

from overfill.arch import ARCHS
from overfill.atomic import atomic_folder, check_writable, read_json_object
from overfill.errors import OverfillError
from overfill.fingerprint import fingerprint
from overfill.home import overfill_home
from overfill.loading import load_config, load_tokenizer, resolve_model
from overfill.model_source import ModelSource
from overfill.modeling import Mode, check_mode, read_checkpoint_meta
from overfill.vllm import ARCH
from overfill.zoo import DEFAULT_MODEL

FORMAT = 1
DONE = "config.json"  # written last: a folder that has it is complete
GENERATION_CONFIG_NAME = "generation_config.json"


@dataclass(frozen=True)
class EngineModel:
    """A folder vLLM can load, and the name it is served under."""

    path: Path
    name: str
    mode: Mode
    dtype: str
    trust_remote_code: bool = False

    def as_json(self) -> dict:
        """For a child process that starts the engine (bench, eval): every field, the path as text."""
        return {**asdict(self), "path": str(self.path)}

    @classmethod
    def from_json(cls, fields: dict) -> "EngineModel":
        return cls(**{**fields, "path": Path(fields["path"])})


def engine_model(source: ModelSource, mode: str = "overfill", *, name: str | None = None,
                 dtype: str | None = None) -> EngineModel:
    """The folder vLLM loads for `mode` of `source` (exporting the OverFill pair on first use), served in `dtype`
    (default: the source's; "auto" leaves the choice to vLLM, as `overfill serve` and the vLLM bench do unless
    --dtype is given)."""
    mode = check_mode(mode)
    if getattr(source, "decoder_dtype", None) not in (None, "float32", source.dtype):
        raise OverfillError(f"--decoder-dtype {source.decoder_dtype} runs on our own engine; vLLM serves both models in "
                            f"--dtype {source.dtype}: drop --decoder-dtype (or use vLLM's own --quantization after --)")
    if mode == "full":
        path = Path(resolve_model(_full_source(source), quiet=True))
    elif mode == "pruned":
        path = plain_decoder(Path(resolve_model(_decoder_folder(source), quiet=True)))
    else:
        path = export(source)
    check_engine_folder(path, source.trust_remote_code)
    return EngineModel(path=path, name=name or _default_name(source, mode), mode=mode, dtype=dtype or source.dtype,
                       trust_remote_code=source.trust_remote_code)


def check_engine_folder(path: Path, trust_remote_code: bool = False) -> None:
    """Refuse a folder whose config or tokenizer does not load, as vLLM would only minutes into its start.

    Loading them is the check (a second, no weights), not a list of file names: a tokenizer may be
    tokenizer.json alone, or a sentencepiece model, and a file may be there and garbled.
    """
    load_config(str(path), trust_remote_code=trust_remote_code, quiet=True)
    load_tokenizer(str(path), trust_remote_code=trust_remote_code, quiet=True)


def _full_source(source: ModelSource) -> str:
    if source.model:
        return source.model
    if source.checkpoint:
        recorded = read_checkpoint_meta(Path(source.checkpoint)).get("full_model")
        if not recorded:
            raise OverfillError(f"{source.checkpoint}/overfill.json names no full model: pass the full model with --model")
        return recorded
    return DEFAULT_MODEL


def _decoder_folder(source: ModelSource) -> str:
    if source.checkpoint:
        return str(Path(source.checkpoint) / read_checkpoint_meta(Path(source.checkpoint)).get("decoder", "decoder"))
    if source.decoder:
        return source.decoder
    raise OverfillError("no decoder given: pass an OverFill checkpoint folder, or --decoder (a folder from "
                        f"`overfill prune`) with --model (default {DEFAULT_MODEL})")


def _default_name(source: ModelSource, mode: str) -> str:
    base = Path(source.checkpoint).name if source.checkpoint else Path(source.decoder or source.model or DEFAULT_MODEL).name
    return f"{base}-{mode}"


def export(source: ModelSource) -> Path:
    """The exported OverFill folder of `source`: reused when it exists, else checked, written and renamed into place."""
    full_dir = Path(resolve_model(_full_source(source), quiet=True))
    decoder_dir = Path(resolve_model(_decoder_folder(source), quiet=True))
    target = overfill_home() / "vllm" / _folder_key(full_dir, decoder_dir)
    if (target / DONE).is_file():
        return target  # these very files were checked when it was written
    check_writable(target, "OVERFILL_HOME", staged_beside=True)  # before loading the pair
    pair = source.load()  # checks compatibility, tokenizer and the recorded fingerprint; float32 weights
    full_print, decoder_print, tokenizer = pair.full_fingerprint, fingerprint(pair.decoder), pair.tokenizer
    del pair
    with atomic_folder(target, done_marker=DONE) as tmp:
        write_folder(full_dir, decoder_dir, tmp, tokenizer=tokenizer, full_fingerprint=full_print,
                     decoder_fingerprint=decoder_print)
    return target


def plain_decoder(decoder: Path) -> Path:
    """The decoder folder as vLLM's own model classes serve it alone (`--mode pruned`, a decode instance).

    Width pruning keeps head_dim and shrinks hidden_size, so head_dim is no longer hidden_size / heads.
    vLLM 0.32's Llama, Mistral and Qwen3 read head_dim from the config; its Qwen2 derives it, and
    would build attention of the wrong width (`vllm_derives_head_dim` in the family's spec, arch.py).
    Its Llama with `qkv_bias` and `attention_bias` set apart takes any family's biases (Qwen2: q/k/v
    biases, none on o_proj) under the same weight names, so such a pruned decoder is served as that
    Llama: a folder of its config, rewritten, and its files linked, under $OVERFILL_HOME/vllm/.
    """
    config = read_json_object(decoder / "config.json", "re-save the decoder with `overfill prune` or save_pretrained")
    derived = config.get("hidden_size", 0) // max(1, config.get("num_attention_heads", 1))
    spec = ARCHS.get(config.get("model_type"))
    if spec is None or not spec.vllm_derives_head_dim or config.get("head_dim") in (None, derived):
        return decoder
    if config.get("use_sliding_window"):
        kind = spec.model_type
        raise OverfillError(f"{decoder}: vLLM serves a pruned {kind} decoder as a Llama, which has no {kind} sliding window; "
                            "serve it with the full model (--mode overfill)")
    target = overfill_home() / "vllm" / f"plain-{_folder_key(decoder, decoder)}"
    if (target / DONE).is_file():
        return target
    check_writable(target, "OVERFILL_HOME", staged_beside=True)
    with atomic_folder(target, done_marker=DONE) as tmp:
        for item in decoder.iterdir():
            if item.name != DONE:
                os.symlink(item.resolve(), tmp / item.name)
        layer = spec.layer(SimpleNamespace(**config))
        view = dict(config, model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=layer.o_bias,
                    qkv_bias=layer.qkv_bias, mlp_bias=layer.mlp_bias)
        (tmp / DONE).write_text(json.dumps(view, indent=1) + "\n")
    return target


def _folder_key(full: Path, decoder: Path) -> str:
    """Names the exported folder after the exact weight files it links and copies (path, size, mtime):
    retraining or re-pruning into the same folder gives a new export, never a stale one."""
    digest = hashlib.sha256(f"format {FORMAT}".encode())
    for folder in (full, decoder):
        for name in ("config.json", *(shard.name for shard in _shards(folder))):
            stat = (folder / name).stat()
            digest.update(f"{(folder / name).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # vLLM reads the shards it names, and only those
        fix = "re-save the model with save_pretrained, or remove the index if the folder has one model.safetensors"
        weight_map = read_json_object(index, fix).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise OverfillError(f"{index} is corrupt (no weight_map of file names): {fix}")
        shards = sorted({folder / name for name in weight_map.values()})
        for shard in shards:
            if not shard.is_file():
                raise OverfillError(f"{index} names {shard.name}, which is not in {folder}: {fix}")
        return shards
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise OverfillError(f"{folder} has no .safetensors weights: vLLM loads safetensors only; "
                            "save the model with save_pretrained (safe_serialization)")
    return shards


def write_folder(full: Path, decoder: Path, out: Path, *, tokenizer, full_fingerprint: str, decoder_fingerprint: str) -> None:
    """Write the exported layout (module docstring) for a checked pair into the empty folder `out`; `tokenizer` is the
    full model's, as our own engine loaded it."""
    full_config = json.loads((full / "config.json").read_text())
    decoder_config = json.loads((decoder / "config.json").read_text())
    weight_map: dict[str, str] = {}
    for shard in _shards(full):
        if shard.name == "decoder.safetensors":
            raise OverfillError(f"{full} has a weight file named decoder.safetensors, the name OverFill's decoder takes: "
                                "rename it (and its model.safetensors.index.json entry)")
        # Symlinks: the full model's weights stay where they are (a 3B model is not copied per decoder).
        os.symlink(shard.resolve(), out / shard.name)
        with safe_open(str(shard), "pt") as f:
            weight_map.update({name: shard.name for name in f.keys()})
    tensors = {}
    for shard in _shards(decoder):
        with safe_open(str(shard), "pt") as f:
            tensors.update({"decoder." + name: f.get_tensor(name).contiguous() for name in f.keys()})
    save_file(tensors, str(out / "decoder.safetensors"), metadata={"format": "pt"})
    weight_map.update({name: "decoder.safetensors" for name in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    # The tokenizer writes the files it is loaded from (tokenizer.json, a sentencepiece model, named chat templates in
    # additional_chat_templates/, custom code, ...): no list of file names to fall behind the tokenizers there are.
    tokenizer.save_pretrained(out)
    if (full / GENERATION_CONFIG_NAME).is_file():  # vLLM's default sampling settings
        shutil.copy2(full / GENERATION_CONFIG_NAME, out / GENERATION_CONFIG_NAME)
    config = dict(full_config, architectures=[ARCH])
    config["overfill"] = {
        "format": FORMAT,
        "decoder": {
            "hidden_size": decoder_config["hidden_size"],
            "intermediate_size": decoder_config["intermediate_size"],
            "tie_word_embeddings": decoder_config.get("tie_word_embeddings", full_config.get("tie_word_embeddings", False)),
            "rms_norm_eps": decoder_config.get("rms_norm_eps", full_config.get("rms_norm_eps")),
        },
        "full_fingerprint": full_fingerprint,
        "decoder_fingerprint": decoder_fingerprint,
    }
    (out / DONE).write_text(json.dumps(config, indent=1) + "\n")
