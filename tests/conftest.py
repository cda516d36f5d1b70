import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Tiny models gain nothing from intra-op threads, and competing threads make them many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Tiny-model tests never touch the user's cache; slow tests share one per session (see below)."""
    if "OVERFILL_TEST_HOME" in os.environ:
        monkeypatch.setenv("OVERFILL_HOME", os.environ["OVERFILL_TEST_HOME"])
    yield


@pytest.fixture(scope="session")
def smollm_folder():
    """The bundled SmolLM2 materialised once (in OVERFILL_HOME, default ~/.cache/overfill)."""
    from overfill.loading import resolve_model
    from overfill.zoo import DEFAULT_MODEL

    return resolve_model(DEFAULT_MODEL, quiet=True)


@pytest.fixture
def vllm_wiring(monkeypatch):
    """For tests of what runs around vLLM engines in child processes (bench, eval, distill), not of the engine:
    vLLM's own CPU-CI setting. The model is still traced once by Dynamo, as vLLM runs it by default, but run by
    the eager backend with no warm-up, so each engine starts in seconds instead of compiling with Inductor.
    tests/test_vllm.py checks the compiled engine itself."""
    monkeypatch.setenv("VLLM_CPU_CI_ENV", "1")
