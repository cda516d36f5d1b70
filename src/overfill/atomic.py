"""Files and folders that appear whole or not at all: write into a temporary sibling, then rename it into place.

Every folder overfill writes for later loading (pruned decoders, OverFill checkpoints, training
step checkpoints, the zoo's materialised models) goes through `atomic_folder`, so an interrupted
write never leaves a half-written folder under the name a reader would load. `check_writable`
is what every command calls on its output location before the expensive work starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from overfill.errors import OverfillError


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any worker thread exists.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file: 0644 under the usual umask
FOLDER_MODE = 0o777 & ~_UMASK  # 0755


def publish_modes(folder: Path) -> None:
    """Give `folder` and everything in it the modes of ordinary new files and folders.

    mkdtemp makes the folder private, and safetensors writes its weight files 0600 (through a
    temporary file of its own): without this, weights would be the only unreadable files in a
    model folder shared with other users.
    """
    os.chmod(folder, FOLDER_MODE)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), FOLDER_MODE)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, FILE_MODE)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _read_only_mount(folder: Path) -> bool:
    return bool(hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY)


def check_writable(path: str | Path, flag: str = "--out", *, staged_beside: bool = False) -> Path:
    """Refuse an output folder that cannot be created or written, before any work is done; create nothing.

    `staged_beside`: the folder is written as a temporary sibling and renamed into place
    (`atomic_folder`), so its parent folder must be writable too.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OverfillError(f"{flag} {path} is a file, not a folder: pick a folder for {flag}")
    places = [_nearest_existing(path)]
    if staged_beside:
        places.append(_nearest_existing(path.parent))
    for place in places:
        if not place.is_dir():
            raise OverfillError(f"{flag} {path} cannot be created: {place} is a file, not a folder: pick another {flag}")
        # os.access answers as a write would (permissions, ACLs, read-only file systems), and writes nothing.
        if not os.access(place, os.W_OK | os.X_OK):
            why = "it is on a read-only file system" if _read_only_mount(place) else "no write permission"
            raise OverfillError(f"{flag} {path} cannot be written in {place} ({why}): pick a writable {flag}")
    return path


@contextlib.contextmanager
def atomic_folder(target: str | Path, *, done_marker: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; when the block ends, it replaces `target`.

    On an exception the temporary folder is deleted and `target` is left as it was. With
    `done_marker`, a `target` that holds that file when the block ends was completed by another
    process meanwhile: it is kept and ours is discarded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        publish_modes(tmp)  # mkdtemp and safetensors make things private; these are ordinary files
        if done_marker is not None and (target / done_marker).is_file():
            shutil.rmtree(tmp)
            return
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary sibling, so a crash leaves the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.chmod(tmp, FILE_MODE)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON object from one of the record files we write (overfill.json, pruning.json), or one error line with `fix`."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OverfillError(f"{path} is corrupt ({getattr(err, 'msg', err)}): {fix}") from None
    if not isinstance(value, dict):
        raise OverfillError(f"{path} is corrupt (not a JSON object): {fix}")
    return value
