"""The ports ``deft serve`` listens on, checked before anything binds one.

gRPC's own bind failure says "Failed to bind … set GRPC_VERBOSITY=debug" (and its C core logs a line of
its own); prometheus_client and uvicorn raise ``OSError``. Each of those, hit half-way through start-up,
leaves a started server behind. Checking every port first turns a taken one into one message naming the
flag that moves it, before anything has started.
"""

from __future__ import annotations

import errno
import socket

from deft_runtime.errors import DeftError


class StartupError(DeftError):
    """The server cannot start (port in use, unreadable TLS files, ...)."""


def _addresses(host: str, port: int) -> list[tuple[int, tuple[object, ...]]]:
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartupError(f"--host {host}: cannot resolve it: {e.strerror or e}") from e
    return [(family, address) for family, _, _, _, address in infos]


def in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (bound as gRPC and uvicorn bind: with
    SO_REUSEADDR, so a port left in TIME_WAIT by a previous server counts as free)."""
    for family, address in _addresses(host, port):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


def port_in_use_message(port: int, flag: str, off: bool = False) -> str:
    hint = f"pass {flag} PORT to use another" + (f" (or {flag} 0 to turn it off)" if off else "")
    return f"port {port} is in use (another server is listening on it); {hint}"


def check_ports(host: str, ports: list[tuple[int, str]]) -> None:
    """Raise :class:`StartupError` for the first of ``ports`` (port, flag) taken on ``host``; port 0 is
    off; the flags other than ``--port`` can be 0."""
    for port, flag in ports:
        if port and in_use(host, port):
            raise StartupError(port_in_use_message(port, flag, off=flag != "--port"))
