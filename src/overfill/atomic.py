"""Files and folders that appear whole or not at all: write into a temporary sibling, then rename it into place.

Every folder overfill writes for later loading (pruned decoders, OverFill checkpoints, training
step checkpoints, the zoo's materialised models) goes through `atomic_folder`, so an interrupted
write never leaves a half-written folder under the name a reader would load. `check_writable`
is what every command calls on its output location before the expensive work starts: it tries
the write itself, rather than guessing from a list of the ways a write can fail.
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


def check_writable(path: str | Path, flag: str = "--out", *, staged_beside: bool = False) -> Path:
    """Refuse an output folder that cannot be created or written, before any work is done; leave nothing behind.

    The check is the write itself: create the folder (and any missing parents), write and delete a
    probe file in it, then remove what was created. Whatever the reason a write would fail later (a
    file in the way, permissions, a read-only or full file system, a name the file system refuses, a
    place like /proc), it fails here, as one line naming the reason.
    `staged_beside`: the folder is written as a temporary sibling and renamed into place
    (`atomic_folder`), so a probe must be written beside it too.
    """
    path = Path(path).expanduser()
    try:
        if path.is_file():
            raise OverfillError(f"{flag} {path} is a file, not a folder: pick a folder for {flag}")
        for folder in ([path.parent, path] if staged_beside else [path]):
            _probe(folder)
    except OSError as error:
        if isinstance(error, (FileExistsError, NotADirectoryError)):
            reason = f"{_in_the_way(path)} is a file, not a folder"
        else:
            reason = error.strerror or type(error).__name__
        raise OverfillError(f"{flag} {path} cannot be written ({reason}): pick another {flag}") from None
    return path


def _in_the_way(path: Path) -> Path:
    """The first part of `path` that exists but is no folder (a file, or a link to nowhere)."""
    for part in reversed(path.parents):
        if part.is_symlink() and not part.exists() or part.exists() and not part.is_dir():
            return part
    return path


def _probe(folder: Path) -> None:
    """Create `folder`, write and delete a file in it, and remove every folder this made (OSError on failure)."""
    created = []
    place = folder
    while not place.exists() and place != place.parent:
        created.append(place)
        place = place.parent
    try:
        for made in reversed(created):
            made.mkdir()
        handle, probe = tempfile.mkstemp(prefix=".overfill-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    finally:
        for made in created:  # deepest first
            with contextlib.suppress(OSError):
                made.rmdir()


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
    except OSError as err:
        raise OverfillError(f"{path} cannot be read ({err.strerror or type(err).__name__}): {fix}") from None
    except ValueError as err:  # what json.loads raises for any text that is not JSON, UnicodeDecodeError included
        raise OverfillError(f"{path} is corrupt ({getattr(err, 'msg', err)}): {fix}") from None
    if not isinstance(value, dict):
        raise OverfillError(f"{path} is corrupt (not a JSON object): {fix}")
    return value
