"""Write the folder vLLM loads for an OverFill pair (full model + width-pruned decoder).

Layout (all names relative to the output folder):

    config.json                  the full model's config, architectures = ["OverFillForCausalLM"],
                                 plus "overfill": {"format", "decoder": {hidden_size, intermediate_size,
                                 tie_word_embeddings, rms_norm_eps}, "full_model", "decoder_source"}
    <full shards>.safetensors    the full model's own files, names unchanged ("model.layers.0...."),
                                 symlinked (default) or copied
    decoder.safetensors          the decoder's tensors, every name prefixed with "decoder."
    model.safetensors.index.json weight_map over both (vLLM drops *.safetensors files an index omits)
    tokenizer*, chat_template.jinja, generation_config.json, special_tokens_map.json  from the full model

Usage: python -m overfill.vllm.export FULL_DIR DECODER_DIR OUT_DIR [--copy]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")
CACHE_FIELDS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "rope_parameters", "rope_theta", "rope_scaling")


def _shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise SystemExit(f"{folder} has no .safetensors weights")
    return shards


def export(full: str, decoder: str, out: str, *, copy: bool = False) -> Path:
    full, decoder, out = Path(full), Path(decoder), Path(out)
    fcfg = json.loads((full / "config.json").read_text())
    dcfg = json.loads((decoder / "config.json").read_text())
    for field in CACHE_FIELDS:
        if fcfg.get(field) != dcfg.get(field):
            raise SystemExit(f"decoder is not cache-compatible: {field} {dcfg.get(field)} != {fcfg.get(field)}")
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for shard in _shards(full):
        target = out / shard.name
        if shard.name == "decoder.safetensors":
            raise SystemExit("the full model has a shard named decoder.safetensors: rename needed")
        if target.exists() or target.is_symlink():
            target.unlink()
        if copy:
            shutil.copy2(shard, target)
        else:
            os.symlink(shard.resolve(), target)
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                weight_map[name] = shard.name
    tensors = {}
    for shard in _shards(decoder):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                tensors["decoder." + name] = f.get_tensor(name).contiguous()
    save_file(tensors, str(out / "decoder.safetensors"), metadata={"format": "pt"})
    weight_map.update({name: "decoder.safetensors" for name in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))

    cfg = dict(fcfg)
    cfg["architectures"] = ["OverFillForCausalLM"]
    pruning = {}
    if (decoder / "pruning.json").is_file():
        pruning = json.loads((decoder / "pruning.json").read_text())
    cfg["overfill"] = {
        "format": FORMAT,
        "decoder": {
            "hidden_size": dcfg["hidden_size"],
            "intermediate_size": dcfg["intermediate_size"],
            "tie_word_embeddings": dcfg.get("tie_word_embeddings", fcfg.get("tie_word_embeddings", False)),
            "rms_norm_eps": dcfg.get("rms_norm_eps", fcfg.get("rms_norm_eps")),
        },
        "full_model": str(full),
        "decoder_source": str(decoder),
        "full_fingerprint": pruning.get("source_fingerprint"),
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    for name in TOKENIZER_FILES:
        if (full / name).is_file():
            shutil.copy2(full / name, out / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("full")
    ap.add_argument("decoder")
    ap.add_argument("out")
    ap.add_argument("--copy", action="store_true", help="copy the full model's shards instead of symlinking them")
    args = ap.parse_args()
    print(export(args.full, args.decoder, args.out, copy=args.copy))


if __name__ == "__main__":
    main()
