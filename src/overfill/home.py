"""Where overfill keeps what it makes once per machine and reuses: `$OVERFILL_HOME` (default ~/.cache/overfill).

models/   the bundled model, dequantised (zoo.py)
vllm/     folders exported for vLLM (vllm/export.py)
"""

from __future__ import annotations

import os
from pathlib import Path


def overfill_home() -> Path:
    return Path(os.environ.get("OVERFILL_HOME", Path.home() / ".cache" / "overfill")).expanduser()
