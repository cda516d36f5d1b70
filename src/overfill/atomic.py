"""Files and folders that appear whole or not at all: write into a temporary sibling, then rename it into place.

Every folder overfill writes for later loading (pruned decoders, OverFill checkpoints, training
step checkpoints, the zoo's materialised models) goes through `atomic_folder`, so an interrupted
write never leaves a half-written folder under the name a reader would load.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


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
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; these are ordinary folders
        yield tmp
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
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
