import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Tiny models gain nothing from intra-op threads, and competing threads make them many times slower.
torch.set_num_threads(1)


# Where the bundled models live for the tests: OVERFILL_TEST_HOME, else the user's own OVERFILL_HOME (read before any
# test sets its own; default ~/.cache/overfill).
BUNDLED_HOME = Path(os.environ.get("OVERFILL_TEST_HOME") or os.environ.get("OVERFILL_HOME") or Path.home() / ".cache" / "overfill")


def _link_bundled(home: Path) -> None:
    """Link the bundled models already materialised in BUNDLED_HOME into `home`'s models/ (read there, never written)."""
    from overfill.zoo import ZOO

    for name in ZOO:
        source, link = BUNDLED_HOME / "models" / name, home / "models" / name
        if (source / "config.json").is_file() and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source.resolve(), target_is_directory=True)


def pytest_collection_modifyitems(config, items):
    """Files with vLLM engines or the bundled model first: under `make test`'s two workers (a file each at a time),
    the long files start early and the short ones fill in behind them, so both workers finish together."""
    def long(item) -> bool:
        return any(item.get_closest_marker(m) for m in ("vllm", "slow"))

    long_files = {item.path for item in items if long(item)}
    items.sort(key=lambda item: item.path not in long_files)  # stable: each file's own order is kept


@pytest.fixture(scope="session")
def _test_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("overfill-home")
    _link_bundled(home)
    return home


@pytest.fixture(autouse=True)
def _isolated_home(_test_home, monkeypatch):
    """Tests never write to the user's cache (but for a first materialisation of the bundled model, see smollm_folder):
    OVERFILL_HOME is one temporary folder per session (vLLM exports, measured decoder speeds, ...), whose models/
    links to the bundled models in BUNDLED_HOME. A test that checks what goes into OVERFILL_HOME sets its own on top."""
    monkeypatch.setenv("OVERFILL_HOME", str(_test_home))
    yield


@pytest.fixture(scope="session")
def smollm_folder(_test_home):
    """The bundled SmolLM2, as the zoo name resolves it under the tests' OVERFILL_HOME. On a machine where it was never
    materialised, it is materialised once into BUNDLED_HOME (where any command would put it: the one thing the
    tests write there, so later sessions skip the half minute of dequantising) and linked from the tests' home."""
    from overfill.loading import resolve_model
    from overfill.zoo import DEFAULT_MODEL

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OVERFILL_HOME", str(BUNDLED_HOME))
        resolve_model(DEFAULT_MODEL, quiet=True)
    _link_bundled(_test_home)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OVERFILL_HOME", str(_test_home))
        return resolve_model(DEFAULT_MODEL, quiet=True)


@pytest.fixture
def vllm_wiring(monkeypatch):
    """For tests of what runs around vLLM engines in child processes (bench, eval, distill), not of the engine:
    vLLM's own CPU-CI setting. The model is still traced once by Dynamo, as vLLM runs it by default, but run by
    the eager backend with no warm-up, so each engine starts in seconds instead of compiling with Inductor.
    tests/test_vllm.py checks the compiled engine itself."""
    monkeypatch.setenv("VLLM_CPU_CI_ENV", "1")
