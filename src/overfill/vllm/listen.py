"""Where a server listens: an address checked before minutes of loading, whether it reaches past this machine,
a free port for a child server, and waiting until that child answers /health."""

from __future__ import annotations

import errno
import http.client
import ipaddress
import socket
import time
import urllib.request
from pathlib import Path

from overfill.errors import OverfillError
from overfill.processes import failure

HEALTH_TIMEOUT_S = 900  # engine start: ~25 s on an idle 2-core CPU, minutes on a busy one


def check_address(host: str, port: int) -> None:
    """Refuse an address the server could not listen on, before minutes of loading: one error line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise OverfillError(f"--host {host} is not an address of this machine: pass e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise OverfillError(f"port {port} on {host} is in use: pick another --port (or stop the other server)") from None
            if error.errno == errno.EACCES:
                raise OverfillError(f"no permission to listen on port {port}: pick a port above 1023") from None
            raise OverfillError(f"cannot listen on {host}:{port} ({error.strerror}): pick another --host or --port") from None


def exposed(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on now (for a child server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc, log: Path, what: str, report=None) -> None:
    """Until the child server `proc` answers 200 on url/health: one error line if it exits or never answers."""
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise failure(what, proc.returncode, log)
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except (OSError, http.client.HTTPException):  # no answer yet, however it fails (refused, reset, timed out, garbled)
            pass
        if report:
            report("waiting for /health")
        time.sleep(2.0)
    raise OverfillError(f"{what} did not answer /health within {HEALTH_TIMEOUT_S} s; its log is {log}")
