"""Every command's `--model`, resolved and loaded: a zoo name, a local model folder, or a hub id.

`resolve_model` refuses what cannot be loaded now (no such folder, a hub id the hub cannot serve)
before anything slow runs; `load_model` and `load_config` turn a broken folder into one error
line naming it (docs/design.md, "The bundled model").
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from overfill.errors import OverfillError
from overfill.hub import hub_endpoint, hub_offline, hub_reachable
from overfill.zoo import ZOO, materialise


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
        raise OverfillError(f"{_unknown(name)}, and the hub ({hub_endpoint()}) is not reachable from this machine to "
                            f"download {name}: pass a local model folder, or connect and retry")


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
    line = text.splitlines()[0].strip() if text else ""
    # Some errors put their reason on a second line ('Validation error for field x:' / 'TypeError: ...').
    if line.endswith(":") and len(text.splitlines()) > 1:
        line = f"{line} {text.splitlines()[1].strip()}"
    return line or type(err).__name__


def _load_failed(name_or_path: str, location: str, err: BaseException) -> OverfillError:
    """Any failure to load a folder is this one line. What loading a broken folder raises is open-ended (OSError,
    SafetensorError, ValueError, KeyError, TypeError for a config.json of the wrong shape, huggingface_hub's field
    validation errors, RuntimeError for weights of another shape than config.json says, ...), so no list of them
    is kept: each means the folder cannot be loaded."""
    where = f"model folder {location}" if Path(location).exists() else f"model '{name_or_path}'"
    return OverfillError(f"could not load {where} ({_first_line(err)}): pass a zoo name ({', '.join(ZOO)}), "
                         "an intact local model folder, or a hub id reachable from this machine")


def load_config(name_or_path: str, *, trust_remote_code: bool = False, quiet: bool = False):
    """The model's config alone (cheap: no weights), through the same checks as `load_model`."""
    from transformers import AutoConfig

    return _load_part(AutoConfig, name_or_path, trust_remote_code, quiet)


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, quiet: bool = False):
    """The model's tokenizer alone (cheap: no weights), through the same checks as `load_model`."""
    from transformers import AutoTokenizer

    return _load_part(AutoTokenizer, name_or_path, trust_remote_code, quiet)


def _load_part(auto_class, name_or_path: str, trust_remote_code: bool, quiet: bool):
    location = resolve_model(name_or_path, quiet=quiet)
    try:
        return auto_class.from_pretrained(location, trust_remote_code=trust_remote_code,
                                          local_files_only=_cache_only(location))
    except OverfillError:
        raise
    except Exception as err:  # whatever it is, the folder cannot be loaded: see _load_failed
        raise _load_failed(name_or_path, location, err) from None


def _cache_only(location: str) -> bool:
    # resolve_model let a hub id through while the hub is away only because it is cached: read the cache, do not retry.
    return not Path(location).exists() and (hub_offline() or not hub_reachable())


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    quiet: bool = False,
):
    """Load (model, tokenizer) in eval mode, the weights read straight into `dtype` on `device` (one copy, never a
    float32 detour). float32 by default: the dtype every CPU computes fastest in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_model(name_or_path, quiet=quiet)
    if Path(location).is_dir():
        check_weights(location)
    cache_only = _cache_only(location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, local_files_only=cache_only)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, device_map=torch.device(device),
                                                     trust_remote_code=trust_remote_code, local_files_only=cache_only)
    except OverfillError:
        raise
    except Exception as err:  # whatever it is, the folder cannot be loaded: see _load_failed
        raise _load_failed(name_or_path, location, err) from None
    model.eval()
    return model, tokenizer


def stored_folder(name_or_path: str | None) -> Path | None:
    """The local folder holding a model's weight files as stored (a zoo name's, a folder, a hub id's cached
    snapshot), or None where there is none to read."""
    if name_or_path is None:
        return None
    try:
        location = resolve_model(name_or_path, quiet=True)
    except OverfillError:  # gone since it was loaded: fingerprints are then taken from the loaded weights
        return None
    if Path(location).is_dir():
        return Path(location)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(location, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
    except Exception:  # not cached whole: fingerprints are then taken from the loaded weights
        return None
