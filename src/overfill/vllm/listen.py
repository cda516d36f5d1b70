"""Where a server listens: an address checked before minutes of loading, and whether it reaches past this machine."""

from __future__ import annotations

import errno
import ipaddress
import socket

from overfill.errors import OverfillError


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
