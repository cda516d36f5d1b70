"""The output of `overfill distill`: a chat JSONL appended batch by batch, and the settings it was made with.

Records are written in prompt order, one per usable prompt; each batch is flushed and fsynced
before the next one starts, so a killed run leaves whole records and at most a partial last line.
OUT.settings.json, written before the first record, holds what the replies depend on
(DistillConfig.settings, the model's fingerprint and its chat template's hash). A run on an
existing output refuses it, in one line naming --force or another --out, when it has no settings
file, other settings, or a record that does not answer the prompt at its place (other data);
otherwise it drops a partial last line and continues after the last whole record.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from overfill.atomic import atomic_write_text, read_json_object
from overfill.data.prompts import Prompt
from overfill.errors import OverfillError

FORMAT = 1
FIX = "pass --force to start over, or another --out"
LABELS = {"full_fingerprint": "the model's weights, fingerprint", "chat_template": "its chat template, sha256"}


def settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".settings.json")


def _show(key: str, value) -> str:
    return f"{LABELS[key]} {str(value)[:12]}" if key in LABELS else f"--{key.replace('_', '-')} {value}"


def check_settings(out: Path, settings: dict) -> None:
    """Refuse an existing output made with other values of `settings` (only these keys are compared)."""
    sidecar = settings_path(out)
    if not sidecar.is_file():
        if out.exists():
            raise OverfillError(f"--out {out} exists but has no {sidecar.name} beside it (it was not written by "
                                f"overfill distill, or its settings file was removed): pass --force to replace it, or another --out")
        return
    stored = read_json_object(sidecar, FIX).get("settings")
    stored = stored if isinstance(stored, dict) else {}
    for key, value in settings.items():
        if stored.get(key, "(none)") != value:
            was = _show(key, stored.get(key, "(none)"))
            fix = FIX if key in LABELS or key not in stored else f"pass {was} to continue it, --force to start over, or another --out"
            raise OverfillError(f"--out {out} was made with other settings ({was} there, {_show(key, value)} now): {fix}")


def write_settings(out: Path, settings: dict, **info) -> None:
    atomic_write_text(settings_path(out), json.dumps({"format": FORMAT, "settings": settings, **info}, indent=1) + "\n")


@dataclass
class Resume:
    done: int  # whole records in the output: the replies to prompts 0 .. done-1
    keep_bytes: int  # where they end; anything after is a partial line left by a killed run


def resume_point(out: Path, prompts: list[Prompt], *, limited: bool) -> Resume:
    """Where an existing output stops, after checking that each whole record answers the prompt at its place."""
    if not out.exists():
        return Resume(0, 0)
    done = keep = 0
    try:
        with open(out, "rb") as file:
            for line in file:
                if not line.endswith(b"\n"):
                    break  # a partial last line: dropped, its prompt answered again
                if done < len(prompts):
                    _check_record(out, done, line, prompts[done])
                elif not limited:
                    raise OverfillError(f"--out {out} holds more records than --data has usable prompts ({len(prompts)}): "
                                        f"it was made from other data; {FIX}")
                done, keep = done + 1, keep + len(line)
    except OSError as err:
        raise OverfillError(f"--out {out} cannot be read ({err.strerror}): check its permissions, or {FIX}") from None
    return Resume(done, keep)


def _check_record(out: Path, index: int, line: bytes, prompt: Prompt) -> None:
    try:
        messages = json.loads(line)["messages"]
        answers = messages[:-1] == prompt.turns and messages[-1]["role"] == "assistant"
    except (ValueError, TypeError, KeyError, IndexError):
        answers = False
    if not answers:
        raise OverfillError(f"--out {out} line {index + 1} does not answer prompt {index + 1} of --data (record "
                            f"{prompt.number}): it was made from other data, or edited; {FIX}")


class Appender:
    """The output opened for appending whole records, after dropping a partial last line."""

    def __init__(self, out: Path, resume: Resume):
        out.parent.mkdir(parents=True, exist_ok=True)
        self.dropped = max(out.stat().st_size - resume.keep_bytes, 0) if out.exists() else 0  # bytes of a partial line
        if self.dropped:
            os.truncate(out, resume.keep_bytes)
        self.file = open(out, "ab")

    def write(self, records: list[dict]) -> None:
        """Append records, one JSON line each; on disk (flushed and fsynced) when this returns."""
        self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
