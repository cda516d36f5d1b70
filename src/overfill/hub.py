"""Whether the Hugging Face hub can serve a model now: offline settings and a short reachability probe.

Asked before transformers is, because transformers retries an unreachable hub for most of a
minute before failing; a command that cannot load its model should say so at once.
"""

from __future__ import annotations

import functools
import os
import threading


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as huggingface_hub reads them, but at call time (it reads them at import)."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or any(
        os.environ.get(name, "").upper() in constants.ENV_VARS_TRUE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
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
            get_session().head(hub_endpoint(), timeout=timeout)
            answers.append(True)
        except Exception:  # any failure to get an answer (DNS, refused, TLS, proxy) means: not reachable
            pass
        finally:
            done.set()  # a quick failure ends the wait at once

    threading.Thread(target=ask, daemon=True, name="overfill-hub-check").start()
    done.wait(timeout)
    return bool(answers)
